"""OpenAI Responses requests: the schema, and its translation into the shared Chat,
sampling settings and tool plan. Pure functions of the request (plus the stored history a
`previous_response_id` continues); the routes live in llamad.api.responses.routes.

`input` items are checked one by one, so an error names the item (`input[3].call_id`).
A `reasoning` item's text becomes the reasoning of the assistant turn that follows it
(rendered by the templates that show earlier reasoning; never answer text). Item and tool
types llamad has no use for are accepted and left out of the prompt: tools llamad cannot run
(`web_search`, `namespace`, `custom`, `local_shell`, `mcp`, …), which are logged once per
type per process. A `function_call_output` answers the call with its `call_id`; one
without a `call_id` (Codex's injected context) is a tool result named by its `name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

import msgspec
import structlog

from llamad.engine import Sampling
from llamad.engine.chat import Chat, ChatMessage, ToolCall, ToolSpec
from llamad.serve.request import InvalidRequest, ModelRequest, ToolUse

CHAT_MAX = 20  # top_logprobs, as in Chat Completions

log = structlog.get_logger("llamad.responses")

# -- request schema (unknown fields such as include, store, metadata are accepted) ----------


class InputText(msgspec.Struct, tag="input_text", tag_field="type"):
    text: str


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    text: str


class Refusal(msgspec.Struct, tag="refusal", tag_field="type"):
    refusal: str


class InputImage(msgspec.Struct, tag="input_image", tag_field="type"):
    pass


class InputFile(msgspec.Struct, tag="input_file", tag_field="type"):
    pass


class InputAudio(msgspec.Struct, tag="input_audio", tag_field="type"):
    pass


Content = Union[InputText, OutputText, Refusal, InputImage, InputFile, InputAudio]


class MessageItem(msgspec.Struct, kw_only=True):
    role: str
    content: Union[str, list[Content]]


class FunctionCallItem(msgspec.Struct, kw_only=True):
    call_id: str
    name: str
    # A JSON string by the spec; some clients send the object itself.
    arguments: Any = ""


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    # None: an output that answers no call. Codex sends these to hand the model context as a
    # tool's result (after create_goal: name "goal_objective", namespace "agent", no call_id).
    call_id: Union[str, None] = None
    output: Union[str, list[Content]] = ""
    name: Union[str, None] = None


class FunctionTool(msgspec.Struct, kw_only=True):
    name: str
    description: Union[str, None] = None
    parameters: Union[dict[str, Any], None] = None
    strict: Union[bool, None] = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: Union[dict[str, Any], None] = None
    verbosity: Union[str, None] = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    input: Union[str, list[dict[str, Any]], None] = None
    model: str = ""
    instructions: Union[str, list[dict[str, Any]], None] = None
    max_output_tokens: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    tools: Union[list[dict[str, Any]], None] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Union[bool, None] = None
    text: Union[TextConfig, None] = None
    reasoning: Union[dict[str, Any], None] = None
    stream: bool = False
    store: Union[bool, None] = None
    previous_response_id: Union[str, None] = None
    metadata: Union[dict[str, Any], None] = None
    include: Union[list[str], None] = None
    top_logprobs: Union[int, None] = None
    prompt_cache_key: Union[str, None] = None
    truncation: Union[str, None] = None
    user: Union[str, None] = None
    service_tier: Union[str, None] = None


ROLES = {"user", "assistant", "system", "developer"}
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def top_logprobs_of(req: ResponsesRequest) -> int | None:
    """How many alternatives per token the answer's `logprobs` list, or None for none:
    asked by `include: ["message.output_text.logprobs"]` or by `top_logprobs` (0..20)."""
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= CHAT_MAX:
        raise InvalidRequest(f"'top_logprobs' must be between 0 and {CHAT_MAX}, got {req.top_logprobs}", param="top_logprobs")
    if LOGPROBS_INCLUDE in (req.include or []) or req.top_logprobs is not None:
        return req.top_logprobs or 0
    return None

# Types llamad has already said it leaves out (tools and input items), so each is logged once.
_logged_types: set[str] = set()


def _log_once(what: str, kind: str) -> None:
    key = f"{what}:{kind}"
    if key not in _logged_types:
        _logged_types.add(key)
        log.info(f"{what}_left_out", type=kind, reason="llamad cannot run or show it; it is not in the prompt")


# -- input items -> chat messages -------------------------------------------------------------

_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def _convert(raw: Any, struct: type, where: str) -> Any:
    """`raw` as `struct`; a mismatch is a 400 that names the field inside `where`."""
    try:
        return msgspec.convert(raw, struct)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        inner = match.group(1) if match else ""
        param = f"{where}.{inner}" if inner and not inner.startswith("[") else f"{where}{inner}"
        missing = _MISSING.search(text)
        if missing:  # msgspec names the missing field in the text, not in the path
            param = f"{param}.{missing.group(1)}"
        raise InvalidRequest(f"invalid request: {_PATH.sub('', text)} at '{param}'", param=param) from None


def _part_text(part: Any) -> str | None:
    """A content part's text; None for a part that is not text (an image, a file, audio)."""
    if isinstance(part, (InputText, OutputText)):
        return part.text
    if isinstance(part, Refusal):
        return part.refusal
    return None


def _text_of(content: Union[str, list[Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        text = _part_text(part)
        if text is None:
            kind = part.__struct_config__.tag
            raise InvalidRequest(
                f"content parts of type '{kind}' are not supported by this text-only model; send the content as text",
                param=f"{where}[{index}]",
            )
        texts.append(text)
    return "\n".join(texts)


def _tool_output_text(output: Union[str, list[Any]]) -> str:
    """A function_call_output's text. An image or file in it (Codex's view_image answers
    with one) becomes a line saying it was left out, where a message's would be refused:
    the model asked for it, and a 400 would end the client's session."""
    if isinstance(output, str):
        return output
    texts = []
    for part in output:
        text = _part_text(part)
        if text is None:
            kind = part.__struct_config__.tag
            _log_once("tool_output_part", kind)
            text = f"[{kind} left out: this model reads text only]"
        texts.append(text)
    return "\n".join(texts)


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return msgspec.json.encode(arguments if arguments is not None else {}).decode()


def input_messages(items: Union[str, list[dict[str, Any]], None], history: list[ChatMessage]) -> list[ChatMessage]:
    """The request's `input` as chat messages, continuing `history` (whose tool calls a
    `function_call_output` may answer)."""
    if items is None:
        return []
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    calls = {call.id: call.name for message in history for call in message.tool_calls}
    out: list[ChatMessage] = []
    thought: list[str] = []  # `reasoning` items since the last assistant turn: that turn's reasoning
    for index, raw in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(raw, dict):
            raise InvalidRequest(f"'{where}' must be an object (a message or another input item)", param=where)
        kind = raw.get("type", "message")  # EasyInputMessage: {role, content} without a type
        if kind == "message":
            item = _convert({k: v for k, v in raw.items() if k != "type"}, MessageItem, where)
            if item.role not in ROLES:
                raise InvalidRequest(
                    f"unknown role '{item.role}'; expected one of: user, assistant, system, developer",
                    param=f"{where}.role",
                )
            role = "system" if item.role == "developer" else item.role
            reasoning = "\n".join(thought) if role == "assistant" else ""
            thought = [] if role == "assistant" else thought
            out.append(ChatMessage(role=role, content=_text_of(item.content, f"{where}.content"), reasoning=reasoning))
        elif kind == "function_call":
            call = _convert({k: v for k, v in raw.items() if k != "type"}, FunctionCallItem, where)
            tool_call = ToolCall(id=call.call_id, name=call.name, arguments=_arguments_text(call.arguments))
            calls[call.call_id] = call.name
            # Calls right after an assistant message (or after each other) belong to that turn.
            if out and out[-1].role == "assistant" and not thought:
                out[-1].tool_calls.append(tool_call)
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=[tool_call], reasoning="\n".join(thought)))
                thought = []
        elif kind == "function_call_output":
            result = _convert({k: v for k, v in raw.items() if k != "type"}, FunctionCallOutputItem, where)
            if result.call_id is not None and result.call_id not in calls:
                raise InvalidRequest(
                    f"this function_call_output answers call_id '{result.call_id}', but no earlier function_call "
                    "item (in this input or the previous response) has that call_id",
                    param=f"{where}.call_id",
                )
            out.append(
                ChatMessage(
                    role="tool",
                    content=_tool_output_text(result.output),
                    tool_call_id=result.call_id,
                    name=result.name if result.call_id is None else calls[result.call_id],
                )
            )
        elif kind == "reasoning":
            text = reasoning_text(raw)
            if text:
                thought.append(text)
        else:
            _log_once("input_item", str(kind))
    return out


def instructions_text(req: ResponsesRequest) -> str:
    if req.instructions is None or isinstance(req.instructions, str):
        return req.instructions or ""
    # Instructions as a list of messages (the newer form): their text, in order.
    return "\n\n".join(m.content for m in input_messages(req.instructions, []) if m.content)


# -- tools ------------------------------------------------------------------------------------

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def function_tools(req: ResponsesRequest) -> list[ToolSpec]:
    """The `function` tools, as the shared ToolSpec; every other type is left out."""
    specs = []
    for index, raw in enumerate(req.tools or []):
        if not isinstance(raw, dict):
            raise InvalidRequest(f"'tools[{index}]' must be an object", param=f"tools[{index}]")
        kind = raw.get("type")
        if kind != "function":
            _log_once("tool", str(kind))
            continue
        tool = _convert({k: v for k, v in raw.items() if k != "type"}, FunctionTool, f"tools[{index}]")
        specs.append(
            ToolSpec(name=tool.name, description=tool.description or "", parameters=tool.parameters or EMPTY_PARAMETERS)
        )
    return specs


@dataclass
class Choice:
    mode: str = "auto"  # auto | none | required
    name: str | None = None
    # allowed_tools: only these may be offered (None: all).
    allowed: list[str] | None = None


def tool_choice_of(req: ResponsesRequest) -> Choice:
    choice = req.tool_choice
    if choice is None:
        return Choice()
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest(
                "'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...}",
                param="tool_choice",
            )
        return Choice(choice)
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str):
            raise InvalidRequest("'tool_choice' of type function needs a 'name'", param="tool_choice.name")
        return Choice("required", name=choice["name"])
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        tools = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(tools, list):
            raise InvalidRequest(
                "'tool_choice' of type allowed_tools needs 'mode' (auto or required) and a list of 'tools'",
                param="tool_choice",
            )
        names = [t.get("name") for t in tools if isinstance(t, dict) and t.get("type") == "function"]
        return Choice(mode, allowed=[n for n in names if isinstance(n, str)])
    if isinstance(kind, str):
        # A hosted tool (web_search, file_search, custom, mcp, …): left out like the tool itself.
        _log_once("tool_choice", kind)
        return Choice()
    raise InvalidRequest("'tool_choice' must be a string or an object with a 'type'", param="tool_choice")


def response_format_of(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("'text.format' of type json_schema needs a 'schema' object", param="text.format.schema")
        return {"type": "json_schema", "schema": schema, "strict": bool(fmt.get("strict"))}
    raise InvalidRequest(
        f"unsupported text.format type '{fmt.get('type')}'; use text, json_object or json_schema",
        param="text.format",
    )


# -- sampling and limits ----------------------------------------------------------------------


def _check_range(value: float | None, name: str, low: float, high: float) -> None:
    if value is not None and not (low <= value <= high):
        raise InvalidRequest(f"'{name}' must be between {low} and {high}, got {value}", param=name)


def sampling_of(req: ResponsesRequest) -> Sampling:
    _check_range(req.temperature, "temperature", 0, 2)
    _check_range(req.top_p, "top_p", 0, 1)
    return Sampling(
        temperature=req.temperature,
        top_p=req.top_p,
    )


def max_output_tokens_of(req: ResponsesRequest) -> int | None:
    """What the request asks for (None: the server's default); the pipeline clamps it."""
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise InvalidRequest(
            f"'max_output_tokens' must be at least 1, got {req.max_output_tokens}", param="max_output_tokens"
        )
    return req.max_output_tokens


# -- the whole translation --------------------------------------------------------------------


def to_request(
    req: ResponsesRequest, previous: list[ChatMessage], max_messages: int, counting: bool = False
) -> tuple[ModelRequest, list[ChatMessage]]:
    """The request for the one request path (pure: no engine, no HTTP), and the conversation
    without instructions, which a follow-up request continues. `previous` is the stored
    conversation `previous_response_id` names (empty without one). `counting`: for
    input_tokens, which generates nothing."""
    history = previous + input_messages(req.input, previous)
    if not any(m.role in ("user", "assistant", "tool") for m in history):
        raise InvalidRequest("'input' must hold at least one message (a string, or a list of input items)", param="input")
    instructions = instructions_text(req)
    messages = ([ChatMessage(role="system", content=instructions)] if instructions else []) + history
    if len(messages) > max_messages:
        raise InvalidRequest(f"too many messages: {len(messages)} (the limit is {max_messages})", param="input")
    choice = tool_choice_of(req)
    offered = function_tools(req)
    if choice.allowed is not None:
        offered = [t for t in offered if t.name in choice.allowed]
    ask = ModelRequest(
        model=req.model or None,
        chat=Chat(messages=messages, tools=offered),
        sampling=Sampling() if counting else sampling_of(req),
        max_tokens=None if counting else max_output_tokens_of(req),
        tools=ToolUse(
            mode=choice.mode,
            name=choice.name,
            parallel=req.parallel_tool_calls is not False,
            response_format=response_format_of(req),
        ),
        # The shared history check names chat messages; here they are input items.
        history_param="input",
        # Reasoning is always kept: it becomes `reasoning` output items, which clients that
        # do not show it skip, and it is never fed back as answer text.
        keep_reasoning=True,
        logprobs=None if counting else top_logprobs_of(req),
        reasoning_effort=effort_of(req.reasoning),
    )
    return ask, history


def reasoning_text(item: dict[str, Any]) -> str:
    """A `reasoning` item's text: its `reasoning_text` content (what llamad writes), else its
    summary; an item with only `encrypted_content` (another server's) has none."""
    def texts(parts: Any, kind: str) -> list[str]:
        if not isinstance(parts, list):
            return []
        return [p["text"] for p in parts if isinstance(p, dict) and p.get("type") == kind and isinstance(p.get("text"), str)]

    return "\n".join(texts(item.get("content"), "reasoning_text") or texts(item.get("summary"), "summary_text"))


def effort_of(reasoning: dict[str, Any] | None) -> str | None:
    """`reasoning.effort` ("low", "medium", "high"), for the template's reasoning_effort."""
    effort = (reasoning or {}).get("effort")
    return effort if isinstance(effort, str) else None
