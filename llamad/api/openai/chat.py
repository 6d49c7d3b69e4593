"""OpenAI Chat Completions: request schema, translation to and from the shared pipeline,
and the routes. Streamed and non-streamed answers come from the same answer events."""

from __future__ import annotations

import os
import secrets
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Union

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.response import Stream

from llamad.api.openai import logprobs as openai_logprobs

from llamad.serve import sse
from llamad.serve.answer import (
    Answer,
    AnswerEvent,
    Finish,
    Keepalive,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    admitted,
    answer_events,
    fold,
)
from llamad.engine.chat import Chat, ChatMessage, ToolCall, ToolSpec
from llamad.engine import Engine, Generation
from llamad.serve.errors import bad_request, from_exception, openai_body
from llamad.serve.observe import engine_of, record_of, with_content_logged
from llamad.api.openai.sampling import SamplingFields, sampling_of, stop_list
from llamad.serve.body import decode_body, read_body, unless_disconnected

# -- request schema (unknown fields are accepted: clients send extras) ---------------------


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: Any = None


class InputAudioPart(msgspec.Struct, tag="input_audio", tag_field="type"):
    input_audio: Any = None


class FilePart(msgspec.Struct, tag="file", tag_field="type"):
    file: Any = None


ContentPart = Union[TextPart, ImagePart, InputAudioPart, FilePart]


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = ""


class ToolCallIn(msgspec.Struct):
    function: FunctionCall
    id: str = ""
    type: str = "function"


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Union[str, None] = None
    tool_calls: Union[list[ToolCallIn], None] = None
    tool_call_id: Union[str, None] = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class FunctionDef(msgspec.Struct):
    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class ChatRequest(SamplingFields, kw_only=True):
    messages: list[Message]
    model: str = ""
    max_tokens: Union[int, None] = None
    max_completion_tokens: Union[int, None] = None
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    user: Union[str, None] = None
    n: int = 1
    tools: Union[list[ToolDef], None] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    response_format: Union[dict[str, Any], None] = None
    logprobs: Union[bool, None] = None
    top_logprobs: Union[int, None] = None


ROLES = {"system", "developer", "user", "assistant", "tool"}


# -- translation ---------------------------------------------------------------------------


def _content_text(message: Message, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part_index, part in enumerate(message.content):
        if not isinstance(part, TextPart):
            kind = part.__struct_config__.tag
            raise bad_request(
                f"content parts of type '{kind}' are not supported by this text-only model",
                param=f"messages[{index}].content[{part_index}]",
            )
        texts.append(part.text)
    return "\n".join(texts)


def to_chat(req: ChatRequest, max_messages: int) -> Chat:
    if not req.messages:
        raise bad_request("'messages' must hold at least one message", param="messages")
    if len(req.messages) > max_messages:
        raise bad_request(f"too many messages: {len(req.messages)} (the limit is {max_messages})", param="messages")
    messages: list[ChatMessage] = []
    for index, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise bad_request(
                f"unknown role '{message.role}'; expected one of: system, developer, user, assistant, tool",
                param=f"messages[{index}].role",
            )
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise bad_request(
                f"messages[{index}] has no 'content': a {message.role} message needs content"
                + (" (an assistant message may leave it out only when it carries tool_calls)" if message.role == "assistant" else ""),
                param=f"messages[{index}].content",
            )
        role = "system" if message.role == "developer" else message.role
        calls = [
            ToolCall(id=c.id or f"call_{index}_{n}", name=c.function.name, arguments=c.function.arguments)
            for n, c in enumerate(message.tool_calls or [])
        ]
        messages.append(
            ChatMessage(
                role=role,
                content=_content_text(message, index),
                tool_calls=calls if role == "assistant" else [],
                tool_call_id=message.tool_call_id if role == "tool" else None,
                name=message.name if role == "tool" else None,
            )
        )
    tools = [
        ToolSpec(name=t.function.name, description=t.function.description, parameters=t.function.parameters)
        for t in (req.tools or [])
    ]
    return Chat(messages=messages, tools=tools)


def requested_max_tokens(req: ChatRequest, default: int, cap: int) -> int:
    wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if wanted is None:
        return min(default, cap)
    if wanted < 1:
        raise bad_request(f"'{name}' must be at least 1, got {wanted}", param=name)
    return min(wanted, cap)


def tool_choice_of(req: ChatRequest):
    from llamad.tools.plan import ToolChoice

    choice = req.tool_choice
    if choice is None:
        return ToolChoice("auto")
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or a function object", param="tool_choice")
        return ToolChoice(choice)
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request(
            "'tool_choice' object must be {\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice"
        )
    return ToolChoice("required", name=name)


def response_format_of(req: ChatRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("'response_format.json_schema' must be an object with a 'schema'", param="response_format")
        # strict: refuse a schema the grammar cannot fully enforce instead of serving it
        # with those keywords as advice (llamad.tools.grammar).
        return {"type": "json_schema", "schema": spec.get("schema") or {}, "strict": spec.get("strict") is True}
    raise bad_request(
        f"unsupported response_format type '{fmt.get('type')}'; use text, json_object or json_schema",
        param="response_format",
    )


# -- answers -------------------------------------------------------------------------------


class Completion:
    """Ids and framing constants for one answer."""

    def __init__(self, model: str):
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        usage: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if usage:
            payload["usage"] = None
        return payload


def usage_of(finish: Finish) -> dict[str, Any]:
    u = finish.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def delta_of(event: AnswerEvent) -> dict[str, Any] | None:
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolCallStart):
        return {
            "tool_calls": [
                {"index": event.index, "id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
            ]
        }
    if isinstance(event, ToolCallDelta):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]}
    return None


async def stream_frames(
    events: AsyncIterator[AnswerEvent],
    completion: Completion,
    include_usage: bool,
    request: Request,
    with_logprobs: bool = False,
) -> AsyncIterator[bytes]:
    record = record_of(request)
    async with aclosing(events) as stream:
        try:
            yield sse.data_frame(completion.chunk({"role": "assistant", "content": ""}, usage=include_usage))
            admission = True
            async for event in stream:
                if isinstance(event, Keepalive):
                    # The first one only says the request was queued or admitted; the role
                    # chunk already told the client the stream is alive.
                    if not admission:
                        yield sse.comment_frame()
                    admission = False
                    continue
                admission = False
                if isinstance(event, Finish):
                    record.finish(event)
                    yield sse.data_frame(completion.chunk({}, event.reason, usage=include_usage))
                    if include_usage:
                        final = completion.chunk({}, usage=True)
                        final["choices"] = []
                        final["usage"] = usage_of(event)
                        yield sse.data_frame(final)
                    yield sse.done_frame()
                    return
                delta = delta_of(event)
                if delta is not None:
                    record.first_token()
                    logprobs = None
                    if with_logprobs and isinstance(event, TextDelta):
                        logprobs = openai_logprobs.chat(event.logprobs)
                    yield sse.data_frame(completion.chunk(delta, usage=include_usage, logprobs=logprobs))
        except Exception as exc:  # after the headers: the error travels in the stream
            error = from_exception(exc, "openai")
            record.fail(error)
            yield sse.data_frame(openai_body(error))


def message_of(answer: Answer, keep_reasoning: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text if (answer.text or not answer.tool_calls) else None}
    if keep_reasoning and answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in answer.tool_calls
        ]
    return message


def completion_body(
    answer: Answer, completion: Completion, keep_reasoning: bool, with_logprobs: bool = False
) -> dict[str, Any]:
    assert answer.finish is not None
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message_of(answer, keep_reasoning),
                "logprobs": openai_logprobs.chat(answer.logprobs) if with_logprobs else None,
                "finish_reason": answer.finish.reason,
            }
        ],
        "usage": usage_of(answer.finish),
    }


# -- routes --------------------------------------------------------------------------------


async def complete(request: Request, keep_reasoning: bool) -> Response:
    engine: Engine = engine_of(request)
    limits = request.app.state.config.limits
    req = decode_body(await read_body(request), ChatRequest)
    if req.n != 1:
        raise bad_request("only n=1 is supported", param="n")
    chat = to_chat(req, limits.max_messages)
    sampling = sampling_of(req)
    top_n = openai_logprobs.chat_top_n(req.logprobs, req.top_logprobs)
    stops = stop_list(req.stop)
    max_tokens = requested_max_tokens(req, limits.default_max_tokens, limits.max_tokens_hard_cap)
    response_format = response_format_of(req)
    from llamad import tools

    grammar, parser = tools.apply(
        chat,
        tool_choice_of(req),
        parallel=req.parallel_tool_calls,
        response_format=response_format,
        template_supports_tools=engine.template_supports_tools,
        id_prefix="call_",
    )
    record = record_of(request)
    prompt = await engine.prepare(chat, grammar)
    record.prompt_tokens = len(prompt.tokens)
    generation = Generation(
        prompt=prompt,
        max_tokens=engine.clamp_max_tokens(max_tokens, prompt),
        sampling=sampling,
        stop=stops,
        grammar=grammar,
        logprobs=top_n,
        ignore_eos=req.ignore_eos,
    )
    completion = Completion(engine.model_id)
    events = await admitted(answer_events(engine, generation, keep_reasoning, parser))
    events = with_content_logged(request, prompt.text, events)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Stream(
            stream_frames(events, completion, include_usage, request, with_logprobs=top_n is not None),
            media_type="text/event-stream",
            headers=sse.HEADERS,
        )
    answer = await unless_disconnected(request, fold(events))
    record.finish(answer.finish)
    return Response(completion_body(answer, completion, keep_reasoning, with_logprobs=top_n is not None))


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Response:
    return await complete(request, keep_reasoning=False)


@post("/v1/chat/completions/think", status_code=200)
async def chat_completions_think(request: Request) -> Response:
    return await complete(request, keep_reasoning=True)


@get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    # Both families list models at this path: OpenAI's list fields and Anthropic's
    # pagination fields side by side (each SDK ignores the other's).
    card = model_card(request.app.state.engine)
    return {"object": "list", "data": [card], "has_more": False, "first_id": card["id"], "last_id": card["id"]}


@get("/v1/models/{model_id:path}")
async def get_model(request: Request) -> dict[str, Any]:
    # Clients ask for names of their own (also "org/model"); there is one model, so every
    # name resolves to it.
    return model_card(request.app.state.engine)


def model_card(engine: Engine) -> dict[str, Any]:
    """The served model in OpenAI's shape, with Anthropic's fields too. `created` is the
    GGUF file's modification time."""
    try:
        created = int(os.stat(str(engine.info.get("path", ""))).st_mtime)
    except OSError:
        created = 0
    return {
        "id": engine.model_id,
        "object": "model",
        "created": created,
        "owned_by": "llamad",
        "type": "model",
        "display_name": engine.model_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
    }


router = Router(
    path="/",
    route_handlers=[chat_completions, chat_completions_think, list_models, get_model],
)
