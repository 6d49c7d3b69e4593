"""OpenAI Responses routes: POST /v1/responses (streamed or not), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items, and POST
/v1/responses/input_tokens (the prompt's size, without generating).

A request is translated into the shared Chat (llamad.api.responses.request); the reply is the
answer events of llamad.serve.answer run through the `ResponseStream` state machine
(llamad.api.responses.stream): framed for a stream, folded for a plain response — one code
path. Answers are kept in a bounded in-memory store (llamad.api.responses.store) unless the
request says `store: false`.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

import structlog
from litestar import Request, Response, Router, delete, get, post
from litestar.response import Stream

from llamad.serve import sse
from llamad.serve.answer import AnswerEvent, Finish, Keepalive, PlainText, admitted, answer_events
from llamad.engine.chat import ChatMessage, ToolCall
from llamad.config import LimitsConfig
from llamad.engine import ContextOverflow, Engine, Generation, Sampling
from llamad.serve.errors import ApiError, from_exception
from llamad.serve.observe import engine_of, record_of
from llamad.serve.body import decode_body, read_body, unless_disconnected
from llamad.api.responses.request import ResponsesRequest, max_output_tokens_of, sampling_of, top_logprobs_of, translate
from llamad.api.responses.items import input_items_of, page
from llamad.api.responses.store import ResponseStore, StoredResponse
from llamad.api.responses.stream import TERMINAL, ResponseStream, WireEvent, final_response

log = structlog.get_logger("llamad.api.responses.routes")


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
    """The response's output as the assistant turn a follow-up request continues
    (reasoning is not fed back)."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for item in response["output"]:
        if item["type"] == "message":
            texts.extend(part["text"] for part in item["content"] if part["type"] == "output_text")
        elif item["type"] == "function_call":
            calls.append(ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"]))
    return ChatMessage(role="assistant", content="".join(texts), tool_calls=calls)


async def wire_events(
    events: AsyncIterator[AnswerEvent],
    machine: ResponseStream,
    request: Request,
    on_done: Callable[[dict[str, Any]], None],
) -> AsyncIterator[WireEvent]:
    record = record_of(request)
    async with aclosing(events) as stream:
        for wire in machine.start():
            yield wire
        admission = True
        async for event in stream:
            if isinstance(event, Keepalive):
                # The first one only says the request was admitted; response.in_progress has
                # just told the client that.
                if admission:
                    admission = False
                    continue
            elif isinstance(event, Finish):
                record.finish(event)
            else:
                record.first_token()
            admission = False
            for wire in machine.feed(event):
                if wire[0] in TERMINAL:
                    on_done(wire[1]["response"])
                yield wire


async def stream_frames(wire: AsyncIterator[WireEvent], machine: ResponseStream, request: Request) -> AsyncIterator[bytes]:
    async with aclosing(wire) as stream:
        try:
            async for kind, payload in stream:
                yield sse.event_frame(kind, payload)
                if kind in TERMINAL:  # resumed: the client has the terminal event
                    record_of(request).answer_sent = True
        except Exception as exc:  # after the headers: the error travels in the stream
            error = from_exception(exc, "openai")
            if error.kind == "server":
                log.exception("stream_failed")
            record_of(request).fail(error)
            for kind, payload in machine.fail(error):
                yield sse.event_frame(kind, payload)


async def collect(wire: AsyncIterator[WireEvent]) -> list[WireEvent]:
    async with aclosing(wire) as stream:
        return [item async for item in stream]


def previous_of(store: ResponseStore, req: ResponsesRequest) -> StoredResponse | None:
    """The stored response `previous_response_id` continues (None without one)."""
    if req.previous_response_id is None:
        return None
    stored = store.get(req.previous_response_id)
    if stored is None:
        raise not_found(req.previous_response_id, param="previous_response_id")
    return stored


async def create_response(request: Request) -> Response:
    engine: Engine = engine_of(request)
    limits: LimitsConfig = request.app.state.config.limits
    req = decode_body(await read_body(request), ResponsesRequest)
    store = store_of(request)
    previous = previous_of(store, req)
    sampling = sampling_of(req)
    top_n = top_logprobs_of(req)
    max_tokens = max_output_tokens_of(req, limits.default_max_tokens, limits.max_tokens_hard_cap)
    translated = translate(req, previous.history if previous else [], engine, limits.max_messages)

    prompt = await engine.prepare(translated.chat, translated.grammar)
    record_of(request).prompt_tokens = len(prompt.tokens)
    generation = Generation(
        prompt=prompt,
        max_tokens=engine.clamp_max_tokens(max_tokens, prompt),
        sampling=sampling,
        grammar=translated.grammar,
        logprobs=top_n,
    )
    # Reasoning is always kept: it becomes `reasoning` output items, which clients that do
    # not show it skip, and it is never fed back as answer text.
    events = await admitted(answer_events(engine, generation, True, translated.parser or PlainText()))
    machine = ResponseStream(
        echo=echo_of(req, engine.model_id, sampling.resolved(engine.default_sampling), max_tokens),
        count_tokens=engine.count_tokens,
        with_logprobs=top_n is not None,
    )

    def keep(response: dict[str, Any]) -> None:
        if req.store is not False:
            continued = previous.input_items + previous.body["output"] if previous else []
            store.put(response, translated.history + [answer_turn(response)], input_items_of(req.input, continued))

    wire = wire_events(events, machine, request, keep)
    if req.stream:
        return Stream(stream_frames(wire, machine, request), media_type="text/event-stream", headers=sse.HEADERS)
    return Response(final_response(await unless_disconnected(request, collect(wire))))


# -- routes ----------------------------------------------------------------------------------


@post("/v1/responses", status_code=200)
async def responses(request: Request) -> Response:
    return await create_response(request)


@post("/v1/responses/input_tokens", status_code=200)
async def count_input_tokens(request: Request) -> dict[str, Any]:
    """The prompt a POST /v1/responses with this body would give the model (instructions,
    input items, tools, the `previous_response_id` history), counted; nothing is generated
    or stored."""
    engine: Engine = engine_of(request)
    req = decode_body(await read_body(request), ResponsesRequest)
    previous = previous_of(store_of(request), req)
    translated = translate(req, previous.history if previous else [], engine, request.app.state.config.limits.max_messages)
    try:
        prompt = await engine.prepare(translated.chat)
    except ContextOverflow as exc:  # still a count: the client asked how big it is
        return {"object": "response.input_tokens", "input_tokens": exc.prompt_tokens}
    return {"object": "response.input_tokens", "input_tokens": len(prompt.tokens)}


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
