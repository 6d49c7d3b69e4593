"""OpenAI Chat Completions: the request schema, its translation into the neutral request,
and the framing of answer events (chunks, or the folded completion); the request path is
llamad.serve.pipeline."""

from __future__ import annotations

import secrets
import time
from typing import Any, AsyncIterator, Union

import msgspec
from litestar import Request, Response, Router, post

from llamad.api.openai import logprobs as openai_logprobs
from llamad.api.sampling import SamplingFields, sampling_of, stop_list
from llamad.engine.chat import Chat, ChatMessage, ToolCall, ToolSpec
from llamad.serve import pipeline, sse
from llamad.serve.answer import AnswerEvent, Finish, Keepalive, ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart, fold, Answer
from llamad.serve.body import decode_body, read_body
from llamad.serve.errors import ApiError, openai_body
from llamad.serve.pipeline import Prepared
from llamad.serve.request import InvalidRequest, ModelRequest, ToolUse

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
    # An assistant turn's reasoning, as llamad's /think route (and DeepSeek, vLLM,
    # llama-server) returns it, sent back.
    reasoning_content: Union[str, None] = None


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
    # The chat template's switches (llama-server's names): e.g. {"enable_thinking": false}.
    chat_template_kwargs: Union[dict[str, Any], None] = None
    reasoning_effort: Union[str, None] = None


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
            raise InvalidRequest(
                f"content parts of type '{kind}' are not supported by this text-only model",
                param=f"messages[{index}].content[{part_index}]",
            )
        texts.append(part.text)
    return "\n".join(texts)


def to_chat(req: ChatRequest, max_messages: int) -> Chat:
    if not req.messages:
        raise InvalidRequest("'messages' must hold at least one message", param="messages")
    if len(req.messages) > max_messages:
        raise InvalidRequest(f"too many messages: {len(req.messages)} (the limit is {max_messages})", param="messages")
    messages: list[ChatMessage] = []
    for index, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"unknown role '{message.role}'; expected one of: system, developer, user, assistant, tool",
                param=f"messages[{index}].role",
            )
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise InvalidRequest(
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
                reasoning=(message.reasoning_content or "") if role == "assistant" else "",
            )
        )
    tools = [
        ToolSpec(name=t.function.name, description=t.function.description, parameters=t.function.parameters)
        for t in (req.tools or [])
    ]
    return Chat(messages=messages, tools=tools)


def requested_max_tokens(req: ChatRequest) -> int | None:
    """What the request asks for (None: the server's default); the pipeline clamps it."""
    wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if wanted is not None and wanted < 1:
        raise InvalidRequest(f"'{name}' must be at least 1, got {wanted}", param=name)
    return wanted


def tool_choice_of(req: ChatRequest) -> tuple[str, str | None]:
    """(mode, named tool) of `tool_choice`."""
    choice = req.tool_choice
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or a function object", param="tool_choice")
        return choice, None
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest(
            "'tool_choice' object must be {\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice"
        )
    return "required", name


def response_format_of(req: ChatRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("'response_format.json_schema' must be an object with a 'schema'", param="response_format")
        # strict: refuse a schema the grammar cannot fully enforce instead of serving it
        # with those keywords as advice (llamad.tools.grammar).
        return {"type": "json_schema", "schema": spec.get("schema") or {}, "strict": spec.get("strict") is True}
    raise InvalidRequest(
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


class ChatReply:
    """Chat Completions framing: one `chat.completion.chunk` per event, or the folded
    `chat.completion`."""

    family = "openai"
    media_type = "text/event-stream"

    def __init__(self, completion: Completion, include_usage: bool, keep_reasoning: bool, with_logprobs: bool):
        self.completion = completion
        self.include_usage = include_usage
        self.keep_reasoning = keep_reasoning
        self.with_logprobs = with_logprobs

    async def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        completion, include_usage = self.completion, self.include_usage
        yield sse.data_frame(completion.chunk({"role": "assistant", "content": ""}, usage=include_usage))
        async for event in events:
            if isinstance(event, Keepalive):
                yield sse.comment_frame()
            elif isinstance(event, Finish):
                yield sse.data_frame(completion.chunk({}, event.reason, usage=include_usage))
                if include_usage:
                    final = completion.chunk({}, usage=True)
                    final["choices"] = []
                    final["usage"] = usage_of(event)
                    yield sse.data_frame(final)
                yield sse.done_frame()
            else:
                delta = delta_of(event)
                if delta is not None:
                    logprobs = None
                    if self.with_logprobs and isinstance(event, TextDelta):
                        logprobs = openai_logprobs.chat(event.logprobs)
                    yield sse.data_frame(completion.chunk(delta, usage=include_usage, logprobs=logprobs))

    def error_frames(self, error: ApiError) -> list[bytes]:
        return [sse.data_frame(openai_body(error))]

    async def body(self, events: AsyncIterator[AnswerEvent]) -> dict[str, Any]:
        return completion_body(await fold(events), self.completion, self.keep_reasoning, self.with_logprobs)


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


def to_request(req: ChatRequest, max_messages: int, keep_reasoning: bool) -> ModelRequest:
    """The request for the one request path (pure: no engine, no HTTP)."""
    if req.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    choice = tool_choice_of(req)
    return ModelRequest(
        model=req.model or None,
        chat=to_chat(req, max_messages),
        sampling=sampling_of(req),
        max_tokens=requested_max_tokens(req),
        stop=stop_list(req.stop),
        tools=ToolUse(
            mode=choice[0], name=choice[1], parallel=req.parallel_tool_calls, response_format=response_format_of(req)
        ),
        keep_reasoning=keep_reasoning,
        logprobs=openai_logprobs.chat_top_n(req.logprobs, req.top_logprobs),
        ignore_eos=req.ignore_eos,
        template_kwargs=dict(req.chat_template_kwargs or {}),
        reasoning_effort=req.reasoning_effort,
    )


async def complete(request: Request, keep_reasoning: bool) -> Response:
    req = decode_body(await read_body(request), ChatRequest)
    ask = to_request(req, request.app.state.config.limits.max_messages, keep_reasoning)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def reply(prepared: Prepared) -> ChatReply:
        return ChatReply(Completion(prepared.model_id), include_usage, keep_reasoning, ask.logprobs is not None)

    return await pipeline.serve(request, ask, reply, stream=req.stream)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Response:
    return await complete(request, keep_reasoning=False)


@post("/v1/chat/completions/think", status_code=200)
async def chat_completions_think(request: Request) -> Response:
    return await complete(request, keep_reasoning=True)


router = Router(
    path="/",
    route_handlers=[chat_completions, chat_completions_think],
)
