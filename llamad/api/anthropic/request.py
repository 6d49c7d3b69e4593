"""Anthropic Messages requests: the schema, and its translation into the neutral request
(chat, sampling, limits, tool use). Pure functions of the request; the routes live in
llamad.api.anthropic.messages.

What Claude Code sends, field by field, and what happens to it (README, "Claude Code"):
- the system block `x-anthropic-billing-header: cc_version=…; cc_entrypoint=…; [cch=…;]`
  is a billing tag, not instructions: left out of the prompt (it would change every request
  with `cch` and break prefix reuse);
- `role: "system"` messages after the conversation has begun stay where they stand (the
  shared Chat renders them in place), so earlier turns keep the same prompt prefix;
- `thinking` (`enabled` / `adaptive`, `display: "omitted"`): decides whether reasoning is
  sent back; `context_management`, `output_config.effort`, `metadata`, `cache_control`,
  `anthropic-beta`: accepted and ignored (the prompt cache works on prefixes by itself);
- `max_tokens: 32000`: clamped to `limits.max_tokens_hard_cap` and to what the context has left.
"""

from __future__ import annotations

import re
from typing import Any, Union

import msgspec

from llamad.engine import Sampling
from llamad.engine.chat import Chat, ChatMessage, ToolCall, ToolSpec
from llamad.serve.request import InvalidRequest, ModelRequest, ToolUse, check_range, thinking_switch

# -- request schema (unknown fields such as cache_control are accepted and ignored) --------


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    source: Any = None


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type"):
    source: Any = None


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Any = msgspec.field(default_factory=dict)


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: Union[str, list[Union[TextBlock, ImageBlock, DocumentBlock]], None] = None
    is_error: bool = False


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


Block = Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock]


class InputMessage(msgspec.Struct):
    role: str
    # Required; optional here only so that to_chat can say which message lacks it.
    content: Union[str, list[Block], None] = None


class Tool(msgspec.Struct, kw_only=True):
    name: str
    description: str = ""
    input_schema: Union[dict[str, Any], None] = None
    # Absent or "custom" for client tools; server tools carry a versioned type.
    type: Union[str, None] = None


class ToolChoiceAuto(msgspec.Struct, tag="auto", tag_field="type"):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(msgspec.Struct, tag="any", tag_field="type"):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(msgspec.Struct, tag="tool", tag_field="type"):
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(msgspec.Struct, tag="none", tag_field="type"):
    pass


AnyToolChoice = Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool, ToolChoiceNone]


class ThinkingEnabled(msgspec.Struct, tag="enabled", tag_field="type"):
    budget_tokens: Union[int, None] = None
    display: Union[str, None] = None  # "summarized" | "omitted"


class ThinkingAdaptive(msgspec.Struct, tag="adaptive", tag_field="type"):
    display: Union[str, None] = None


class ThinkingDisabled(msgspec.Struct, tag="disabled", tag_field="type"):
    pass


class OutputFormat(msgspec.Struct, kw_only=True):
    type: str
    schema: Union[dict[str, Any], None] = None


class OutputConfig(msgspec.Struct, kw_only=True):
    format: Union[OutputFormat, None] = None
    effort: Union[str, None] = None  # accepted; a local model has one effort


class MessagesRequest(msgspec.Struct, kw_only=True):
    messages: list[InputMessage]
    model: str = ""
    # Required by /v1/messages, not by count_tokens: checked by the route, so the 400 says so.
    max_tokens: Union[int, None] = None
    system: Union[str, list[TextBlock], None] = None
    stop_sequences: Union[list[str], None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    top_k: Union[int, None] = None
    stream: bool = False
    tools: Union[list[Tool], None] = None
    tool_choice: Union[AnyToolChoice, None] = None
    thinking: Union[ThinkingEnabled, ThinkingAdaptive, ThinkingDisabled, None] = None
    output_format: Union[OutputFormat, None] = None
    # Newer SDKs send the output schema as output_config.format (effort etc. ignored).
    output_config: Union[OutputConfig, None] = None
    metadata: Union[dict[str, Any], None] = None
    # Claude Code's edits of older turns (clearing thinking, tool results): ignored, the
    # client sends the history it wants seen.
    context_management: Union[dict[str, Any], None] = None


# -- translation ----------------------------------------------------------------------------

UNSUPPORTED_BLOCKS = (ImageBlock, DocumentBlock)


def _unsupported(block: Any, where: str) -> InvalidRequest:
    kind = block.__struct_config__.tag
    return InvalidRequest(
        f"{kind} blocks are not supported: this server runs a text-only model; send the content as text",
        param=where,
    )


def _texts(content: Union[str, list[Any], None], where: str) -> str:
    """Text of a string or a list of text blocks (system prompts, tool results)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for index, block in enumerate(content):
        if isinstance(block, UNSUPPORTED_BLOCKS):
            raise _unsupported(block, f"{where}[{index}]")
        if not isinstance(block, TextBlock):
            raise InvalidRequest(
                f"a {block.__struct_config__.tag} block is not allowed here; only text blocks", param=f"{where}[{index}]"
            )
        parts.append(block.text)
    return "\n".join(parts)


# Claude Code's first system block: `x-anthropic-billing-header: cc_version=…; cc_entrypoint=…;`
# and in some builds a per-request `cch=<nonce>;`.
BILLING_HEADER = re.compile(r"^\s*x-anthropic-billing-header:[^\n]*(\n|$)")


def is_billing_header(text: str) -> bool:
    return BILLING_HEADER.match(text) is not None and not BILLING_HEADER.sub("", text, count=1).strip()


def _system_text(system: Union[str, list[TextBlock], None]) -> str:
    """The system prompt without Claude Code's billing tag, which is not meant for the model."""
    if isinstance(system, str):
        return BILLING_HEADER.sub("", system, count=1) if BILLING_HEADER.match(system) else system
    return _texts([b for b in system or [] if not (isinstance(b, TextBlock) and is_billing_header(b.text))], "system")


def _arguments(value: Any) -> str:
    return msgspec.json.encode(value if value is not None else {}).decode()


def to_chat(req: MessagesRequest, max_messages: int) -> Chat:
    """The request as the shared Chat. The system prompt and `role: system` messages before
    the first turn become one system message; later `role: system` messages stay in place."""
    if not req.messages:
        raise InvalidRequest("'messages' must hold at least one message", param="messages")
    if len(req.messages) > max_messages:
        raise InvalidRequest(f"too many messages: {len(req.messages)} (the limit is {max_messages})", param="messages")
    system = [_system_text(req.system)]
    turns: list[ChatMessage] = []
    tool_names: dict[str, str] = {}
    for index, message in enumerate(req.messages):
        where = f"messages[{index}].content"
        if message.content is None:
            raise InvalidRequest(
                f"messages[{index}] has no 'content': every message needs content, a string or a list of content blocks",
                param=where,
            )
        if message.role == "system" and not turns:
            system.append(_texts(message.content, where))
        elif message.role == "system":
            text = _texts(message.content, where)
            if text:
                turns.append(ChatMessage(role="system", content=text))
        elif message.role == "assistant":
            turns.append(_assistant_turn(message, where, tool_names))
        elif message.role == "user":
            turns.extend(_user_turns(message, where, tool_names))
        else:
            raise InvalidRequest(
                f"unknown role '{message.role}'; expected user, assistant or system", param=f"messages[{index}].role"
            )
    system_text = "\n\n".join(s for s in system if s)
    messages = ([ChatMessage(role="system", content=system_text)] if system_text else []) + turns
    if not any(turn.role != "system" for turn in turns):
        raise InvalidRequest("'messages' must hold at least one user or assistant message", param="messages")
    return Chat(messages=messages, tools=tool_specs(req.tools))


def _assistant_turn(message: InputMessage, where: str, tool_names: dict[str, str]) -> ChatMessage:
    if isinstance(message.content, str):
        return ChatMessage(role="assistant", content=message.content)
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for index, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append(ToolCall(id=block.id, name=block.name, arguments=_arguments(block.input)))
            tool_names[block.id] = block.name
        elif isinstance(block, ThinkingBlock):
            # The turn's reasoning, for the templates that render it (not the answer's text).
            thoughts.append(block.thinking)
        elif isinstance(block, RedactedThinkingBlock):
            continue  # encrypted by another server: nothing a template could show
        elif isinstance(block, UNSUPPORTED_BLOCKS):
            raise _unsupported(block, f"{where}[{index}]")
        else:
            raise InvalidRequest("tool_result blocks belong in user turns", param=f"{where}[{index}]")
    return ChatMessage(role="assistant", content="\n".join(texts), tool_calls=calls, reasoning="\n".join(t for t in thoughts if t))


def _user_turns(message: InputMessage, where: str, tool_names: dict[str, str]) -> list[ChatMessage]:
    if isinstance(message.content, str):
        return [ChatMessage(role="user", content=message.content)]
    turns: list[ChatMessage] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            turns.append(ChatMessage(role="user", content="\n".join(texts)))
            texts.clear()

    for index, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if block.tool_use_id not in tool_names:
                raise InvalidRequest(
                    f"this tool_result answers tool_use_id '{block.tool_use_id}', but no earlier assistant "
                    "turn has a tool_use block with that id",
                    param=f"{where}[{index}].tool_use_id",
                )
            flush()
            turns.append(
                ChatMessage(
                    role="tool",
                    content=_texts(block.content, f"{where}[{index}].content"),
                    tool_call_id=block.tool_use_id,
                    name=tool_names.get(block.tool_use_id),
                    is_error=block.is_error,
                )
            )
        elif isinstance(block, UNSUPPORTED_BLOCKS):
            raise _unsupported(block, f"{where}[{index}]")
        elif isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):
            continue
        else:
            raise InvalidRequest("tool_use blocks belong in assistant turns", param=f"{where}[{index}]")
    flush()
    if not turns:
        # An empty user turn still holds the alternation the templates need.
        turns.append(ChatMessage(role="user", content=""))
    return turns


def tool_specs(tools: list[Tool] | None) -> list[ToolSpec]:
    specs = []
    for index, tool in enumerate(tools or []):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(
                f"tool '{tool.name}' is a server tool of type '{tool.type}', which this server does not run; "
                "offer it as a custom tool with an input_schema",
                param=f"tools[{index}].type",
            )
        if tool.input_schema is None:
            raise InvalidRequest(f"tool '{tool.name}' has no input_schema", param=f"tools[{index}].input_schema")
        specs.append(ToolSpec(name=tool.name, description=tool.description, parameters=tool.input_schema))
    return specs


def sampling_of(req: MessagesRequest) -> Sampling:
    check_range(req.temperature, "temperature", 0, 2)
    check_range(req.top_p, "top_p", 0, 1)
    check_range(req.top_k, "top_k", 0, 1_000_000)
    return Sampling(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
    )


def max_tokens_of(req: MessagesRequest) -> int:
    """Required here (the pipeline clamps it to the server's cap and the context)."""
    if req.max_tokens is None:
        raise InvalidRequest("'max_tokens' is required: the most tokens the reply may have", param="max_tokens")
    if req.max_tokens < 1:
        raise InvalidRequest(f"'max_tokens' must be at least 1, got {req.max_tokens}", param="max_tokens")
    return req.max_tokens


def stop_sequences_of(req: MessagesRequest) -> list[str]:
    return [s for s in (req.stop_sequences or []) if s]


def wants_thinking(req: MessagesRequest) -> bool:
    """Reasoning goes back to the client when `thinking` asks for it and does not ask for
    it to be omitted (`display: "omitted"`, which Claude Code sends: there is no signed
    reasoning to hand back, so the block is left out)."""
    thinking = req.thinking
    return isinstance(thinking, (ThinkingEnabled, ThinkingAdaptive)) and thinking.display != "omitted"


def response_format_of(req: MessagesRequest) -> dict[str, Any] | None:
    fmt, param = req.output_format, "output_format"
    if fmt is None and req.output_config is not None:
        fmt, param = req.output_config.format, "output_config.format"
    if fmt is None:
        return None
    if fmt.type != "json_schema" or not isinstance(fmt.schema, dict):
        raise InvalidRequest(f"'{param}' must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}", param=param)
    return {"type": "json_schema", "schema": fmt.schema}


def tool_use_of(req: MessagesRequest) -> ToolUse:
    """tool_choice and output_format as the request path's tool use."""
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceNone):
        mode, name = "none", None
    elif isinstance(choice, ToolChoiceAny):
        mode, name = "required", None
    elif isinstance(choice, ToolChoiceTool):
        mode, name = "required", choice.name
    else:
        mode, name = "auto", None
    return ToolUse(
        mode=mode,
        name=name,
        parallel=not getattr(choice, "disable_parallel_tool_use", False),
        response_format=response_format_of(req),
        id_prefix="toolu_",
    )


def to_request(req: MessagesRequest, max_messages: int, keep_reasoning: bool, counting: bool = False) -> ModelRequest:
    """The request for the one request path (pure: no engine, no HTTP). `counting`: for
    count_tokens, which sends no max_tokens and generates nothing."""
    return ModelRequest(
        model=req.model or None,
        chat=to_chat(req, max_messages),
        sampling=Sampling() if counting else sampling_of(req),
        max_tokens=None if counting else max_tokens_of(req),
        stop=stop_sequences_of(req),
        stop_param="stop_sequences",
        tools=tool_use_of(req),
        keep_reasoning=keep_reasoning,
        template_kwargs=thinking_switch(thinking_of(req)),
        thinking_budget=req.thinking.budget_tokens if isinstance(req.thinking, ThinkingEnabled) else None,
    )


def thinking_of(req: MessagesRequest) -> bool | None:
    """`thinking` as the template's enable_thinking: enabled or adaptive is on, disabled
    off, absent is the template's own default."""
    if req.thinking is None:
        return None
    return not isinstance(req.thinking, ThinkingDisabled)
