"""OpenAI Responses routes: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items, and POST
/v1/responses/input_tokens (the prompt's size, without generating).

A request is translated into the neutral request (llamad.api.responses.request) and runs on
the one request path (llamad.serve.pipeline); the answer events go through the
`ResponseStream` state machine (llamad.api.responses.stream): framed for a stream, folded
for a plain response. Answers are kept in a bounded in-memory store (llamad.api.responses.store) unless the
request says `store: false`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from litestar import Request, Response, Router, delete, get, post

from llamad.api.responses.items import input_items_of, page
from llamad.api.responses.request import ResponsesRequest, reasoning_text, to_request
from llamad.api.responses.store import ResponseStore, StoredResponse
from llamad.api.responses.stream import TERMINAL, ResponseStream, WireEvent, final_response
from llamad.engine import Sampling
from llamad.engine.chat import ChatMessage, ToolCall
from llamad.serve import pipeline, sse
from llamad.serve.answer import AnswerEvent
from llamad.serve.body import decode_body, read_body
from llamad.serve.errors import ApiError
from llamad.serve.pipeline import Prepared


def store_of(request: Request) -> ResponseStore:
    """The app's store, made on first use from the [responses] settings."""
    state = request.app.state
    store = state.get("responses_store")
    if store is None:
        settings = state.config.responses
        store = state.responses_store = ResponseStore(settings.store_max, settings.store_max_bytes)
    return store


def not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(
        404,
        f"no stored response with id '{response_id}': it was never stored (store: false), was deleted, or was "
        "evicted from the server's in-memory store (responses.store_max); send the whole conversation as input instead",
        "not_found",
        param=param,
        code="response_not_found",
    )


def echo_of(req: ResponsesRequest, model: str, sampling: Sampling, max_tokens: int) -> dict[str, Any]:
    """The request fields a response object repeats."""
    return {
        "model": model,
        "instructions": req.instructions,
        "max_output_tokens": max_tokens,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": req.reasoning or {"effort": None, "summary": None},
        "store": req.store is not False,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": req.tools or [],
        "truncation": req.truncation or "disabled",
        "user": req.user,
        "metadata": req.metadata or {},
        "prompt_cache_key": req.prompt_cache_key,
        "background": False,
        "service_tier": "default",
    }


def answer_turn(response: dict[str, Any]) -> ChatMessage:
    """The response's output as the assistant turn a follow-up request continues, its
    reasoning included (for the templates that render it)."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for item in response["output"]:
        if item["type"] == "message":
            texts.extend(part["text"] for part in item["content"] if part["type"] == "output_text")
        elif item["type"] == "function_call":
            calls.append(ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"]))
        elif item["type"] == "reasoning":
            thoughts.append(reasoning_text(item))
    return ChatMessage(role="assistant", content="".join(texts), tool_calls=calls, reasoning="\n".join(t for t in thoughts if t))


class ResponseReply:
    """Responses framing: the `response.*` events, or the folded response object; the
    finished response is stored (unless `store: false`) when its terminal event is made."""

    family = "openai"
    media_type = "text/event-stream"

    def __init__(self, machine: ResponseStream, on_done: Callable[[dict[str, Any]], None]):
        self.machine = machine
        self.on_done = on_done

    async def wire(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[WireEvent]:
        for wire in self.machine.start():
            yield wire
        async for event in events:
            for wire in self.machine.feed(event):
                if wire[0] in TERMINAL:
                    self.on_done(wire[1]["response"])
                yield wire

    async def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        async for kind, payload in self.wire(events):
            yield sse.event_frame(kind, payload)

    def error_frames(self, error: ApiError) -> list[bytes]:
        return [sse.event_frame(kind, payload) for kind, payload in self.machine.fail(error)]

    async def body(self, events: AsyncIterator[AnswerEvent]) -> dict[str, Any]:
        return final_response([wire async for wire in self.wire(events)])


def previous_of(store: ResponseStore, req: ResponsesRequest) -> StoredResponse | None:
    """The stored response `previous_response_id` continues (None without one)."""
    if req.previous_response_id is None:
        return None
    stored = store.get(req.previous_response_id)
    if stored is None:
        raise not_found(req.previous_response_id, param="previous_response_id")
    return stored


async def create_response(request: Request) -> Response:
    req = decode_body(await read_body(request), ResponsesRequest)
    store = store_of(request)
    previous = previous_of(store, req)
    ask, history = to_request(req, previous.history if previous else [], request.app.state.config.limits.max_messages)

    def keep(response: dict[str, Any]) -> None:
        if req.store is not False:
            continued = previous.input_items + previous.body["output"] if previous else []
            store.put(response, history + [answer_turn(response)], input_items_of(req.input, continued))

    def reply(prepared: Prepared) -> ResponseReply:
        generation = prepared.generations[0]
        machine = ResponseStream(
            echo=echo_of(req, prepared.model_id, generation.sampling.resolved(prepared.default_sampling), generation.max_tokens),
            count_tokens=prepared.count_tokens,
            with_logprobs=ask.logprobs is not None,
        )
        return ResponseReply(machine, keep)

    return await pipeline.serve(request, ask, reply, stream=req.stream)


# -- routes ----------------------------------------------------------------------------------


@post("/v1/responses", status_code=200)
async def responses(request: Request) -> Response:
    return await create_response(request)


@post("/v1/responses/input_tokens", status_code=200)
async def count_input_tokens(request: Request) -> dict[str, Any]:
    """The prompt a POST /v1/responses with this body would give the model (instructions,
    input items, tools, the `previous_response_id` history), counted; nothing is generated
    or stored."""
    req = decode_body(await read_body(request), ResponsesRequest)
    previous = previous_of(store_of(request), req)
    limits = request.app.state.config.limits
    ask, _ = to_request(req, previous.history if previous else [], limits.max_messages, counting=True)
    return {"object": "response.input_tokens", "input_tokens": await pipeline.count_prompt(request, ask)}


def stored_or_404(request: Request) -> Any:
    response_id = request.path_params["response_id"]
    stored = store_of(request).get(response_id)
    if stored is None:
        raise not_found(response_id)
    return stored


@get("/v1/responses/{response_id:str}")
async def get_response(request: Request) -> dict[str, Any]:
    return stored_or_404(request).body


@get("/v1/responses/{response_id:str}/input_items")
async def list_input_items(request: Request) -> dict[str, Any]:
    return page(stored_or_404(request).input_items, request.query_params)


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(request: Request) -> dict[str, Any]:
    response_id = request.path_params["response_id"]
    if not store_of(request).delete(response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


router = Router(
    path="/",
    route_handlers=[responses, count_input_tokens, get_response, list_input_items, delete_response],
)
