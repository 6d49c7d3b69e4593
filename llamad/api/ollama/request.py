"""Ollama's /api/chat and /api/generate requests: schema, and translation into the neutral
request (chat or raw prompt, sampling, limits, response format). Unknown fields are accepted (clients send
extras); values the model cannot honour are refused with a message that says why."""

from __future__ import annotations

import json
from typing import Any, Union

import msgspec

from llamad.engine import Sampling
from llamad.engine.chat import Chat, ChatMessage, ToolCall, ToolSpec
from llamad.serve.models import keep_alive_of
from llamad.serve.request import UNLIMITED, InvalidRequest, ModelRequest, RawPrompt, ToolUse, check_range, thinking_switch


class FunctionCall(msgspec.Struct):
    name: str
    # Ollama sends an object; a string (OpenAI habit) is accepted too.
    arguments: Union[dict[str, Any], str, None] = None


class ToolCallIn(msgspec.Struct):
    function: FunctionCall
    id: str = ""


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str = ""
    thinking: Union[str, None] = None
    images: Union[list[Any], None] = None
    tool_calls: Union[list[ToolCallIn], None] = None
    tool_name: Union[str, None] = None
    tool_call_id: Union[str, None] = None


class Options(msgspec.Struct, kw_only=True):
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    top_k: Union[int, None] = None
    min_p: Union[float, None] = None
    repeat_penalty: Union[float, None] = None
    presence_penalty: Union[float, None] = None
    frequency_penalty: Union[float, None] = None
    seed: Union[int, None] = None
    num_predict: Union[int, None] = None
    num_ctx: Union[int, None] = None
    stop: Union[list[str], str, None] = None


class FunctionDef(msgspec.Struct):
    name: str
    description: str = ""
    parameters: Union[dict[str, Any], None] = None


class ToolDef(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class Common(msgspec.Struct, kw_only=True):
    model: str = ""
    stream: bool = True
    options: Union[Options, None] = None
    format: Union[str, dict[str, Any], None] = None
    think: Union[bool, str, None] = None
    # How long the model stays loaded after this request (llamad.models.pool): "5m", seconds,
    # 0 (unload now), negative (keep it).
    keep_alive: Union[float, str, None] = None
    logprobs: bool = False
    top_logprobs: Union[int, None] = None


class ChatRequest(Common, kw_only=True):
    messages: list[Message] = []
    tools: Union[list[ToolDef], None] = None


class GenerateRequest(Common, kw_only=True):
    prompt: str = ""
    suffix: Union[str, None] = None
    system: Union[str, None] = None
    template: Union[str, None] = None
    raw: bool = False
    images: Union[list[Any], None] = None
    context: Union[list[int], None] = None


ROLES = {"system", "user", "assistant", "tool"}


def to_chat(req: ChatRequest, max_messages: int) -> Chat:
    if len(req.messages) > max_messages:
        raise InvalidRequest(f"too many messages: {len(req.messages)} (the limit is {max_messages})")
    messages: list[ChatMessage] = []
    for index, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{index}]: unknown role '{message.role}'; expected system, user, assistant or tool")
        if message.images:
            raise InvalidRequest(f"messages[{index}]: images are not supported by this text-only model")
        calls = []
        for n, call in enumerate(message.tool_calls or []):
            arguments = call.function.arguments
            text = arguments if isinstance(arguments, str) else json.dumps(arguments or {}, ensure_ascii=False)
            calls.append(ToolCall(id=call.id or f"call_{index}_{n}", name=call.function.name, arguments=text))
        messages.append(
            ChatMessage(
                role=message.role,
                content=message.content,
                tool_calls=calls if message.role == "assistant" else [],
                tool_call_id=message.tool_call_id if message.role == "tool" else None,
                name=message.tool_name if message.role == "tool" else None,
                reasoning=(message.thinking or "") if message.role == "assistant" else "",
            )
        )
    tools = [
        ToolSpec(
            name=t.function.name,
            description=t.function.description,
            parameters=t.function.parameters or {"type": "object", "properties": {}},
        )
        for t in (req.tools or [])
    ]
    return Chat(messages=messages, tools=tools)


def generate_chat(req: GenerateRequest) -> Chat:
    """/api/generate without `raw`: the prompt is one user turn in the model's template."""
    if req.images:
        raise InvalidRequest("images are not supported by this text-only model")
    if req.template:
        raise InvalidRequest(
            "a custom 'template' is not supported; render the prompt yourself and send it with \"raw\": true"
        )
    messages = [ChatMessage(role="system", content=req.system)] if req.system else []
    messages.append(ChatMessage(role="user", content=req.prompt))
    return Chat(messages=messages)


def sampling_of(options: Options | None) -> Sampling:
    o = options or Options()
    check_range(o.temperature, "temperature", 0, 2, prefix="options.")
    check_range(o.top_p, "top_p", 0, 1, prefix="options.")
    check_range(o.min_p, "min_p", 0, 1, prefix="options.")
    check_range(o.top_k, "top_k", 0, 1_000_000, prefix="options.")
    check_range(o.repeat_penalty, "repeat_penalty", 0, 10, prefix="options.")
    check_range(o.presence_penalty, "presence_penalty", -2, 2, prefix="options.")
    check_range(o.frequency_penalty, "frequency_penalty", -2, 2, prefix="options.")
    return Sampling(
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        repeat_penalty=o.repeat_penalty,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
        # Ollama's default seed -1 means "random".
        seed=None if o.seed is None or o.seed < 0 else o.seed % (2**32),
    )


def stops_of(options: Options | None) -> list[str]:
    stop = (options or Options()).stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


def max_tokens_of(options: Options | None) -> int | None:
    """num_predict: absent -> the server's default (None); -1 (endless) and -2 (fill the
    context) -> as many as allowed (UNLIMITED); the pipeline clamps every value."""
    wanted = (options or Options()).num_predict
    if wanted is not None and wanted <= 0:
        return UNLIMITED
    return wanted


def context_of(options: Options | None) -> int | None:
    """num_ctx bounds prompt + answer within the loaded context (None: the loaded one); a
    larger one cannot grow it (the context is sized when the model loads)."""
    wanted = (options or Options()).num_ctx
    return wanted if wanted is not None and wanted > 0 else None


def to_request(req: Common, chat: Chat | None, prompts: list[RawPrompt] | None = None) -> ModelRequest:
    """The request for the one request path (pure: no engine, no HTTP): `chat` for
    /api/chat and a templated /api/generate, `prompts` for a raw or fill-in-the-middle one."""
    return ModelRequest(
        model=req.model or None,
        keep_alive=keep_alive_of(req.keep_alive),
        chat=chat,
        prompts=prompts or [],
        sampling=sampling_of(req.options),
        max_tokens=max_tokens_of(req.options),
        stop=stops_of(req.options),
        stop_param="options.stop",
        tools=ToolUse(response_format=response_format_of(req.format)),
        keep_reasoning=wants_thinking(req.think),
        template_kwargs=thinking_switch(None if req.think is None else wants_thinking(req.think)),
        reasoning_effort=req.think if req.think in ("low", "medium", "high") else None,
        logprobs=logprobs_of(req),
        n_ctx=context_of(req.options),
    )


def response_format_of(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """format: "json" (any JSON object) or a JSON schema -> the tools layer's response_format."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "schema": fmt}
    raise InvalidRequest(f"'format' must be \"json\" or a JSON schema object, got {fmt!r}")


def logprobs_of(req: Common) -> int | None:
    """How many alternatives per token (`top_logprobs`, 0..20), or None without `logprobs`."""
    top = req.top_logprobs
    if top is not None and not 0 <= top <= 20:
        raise InvalidRequest(f"'top_logprobs' must be between 0 and 20, got {top}")
    return (top or 0) if req.logprobs else None


def wants_thinking(think: bool | str | None) -> bool:
    # gpt-oss style levels ("low", "medium", "high") also ask for the reasoning.
    return bool(think) and think not in ("false", "none")
