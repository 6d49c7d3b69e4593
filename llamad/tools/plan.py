"""Tool calling and structured output: what to tell the model, how to constrain it, how
to read its calls back. Both API families translate their requests into `plan(...)`.

The prompt format (used when the GGUF's chat template has no tool support of its own) is
Hermes-style, the format Qwen and Hermes models are trained on. Appended to the system
prompt:

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    </tools>

    For each function call, return a json object with function name and arguments within
    <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

followed by a line for the tool choice ("You must call a function." / "You must call the
function get_weather." / "Call at most one function."). Earlier calls in the history are
rendered the same way, and tool results as `<tool_response>…</tool_response>` in a user
turn (llamad.engine.chat.messages_as_text).

Decoding is constrained by a GBNF grammar (llamad.tools.grammar): with tool_choice
required/any/named the whole output is one (or, with parallel calls, several) call block
whose arguments match the tool's schema; with auto the model writes free text, and once it
writes `<tool_call>` the rest is constrained the same way. Calls are parsed back by
llamad.tools.parse, which also reads Llama 3, Mistral and bare-JSON calls.

When the template renders the tools itself, the model's family format (`tool_format`,
detected by the engine at load: llamad.tools.formats) replaces Hermes: the grammar wraps
the family's markers around the arguments (llamad.tools.family_grammar) and the parser
reads that format (llamad.tools.family_parse for Qwen3-Coder's and GLM's XML and harmony).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from llamad.serve.answer import PlainText, ToolParser
from llamad.engine.chat import Chat, ToolCall, ToolSpec
from llamad.tools.formats import HERMES, ToolFormat
from llamad.tools.grammar import ToolSchemaError, build_grammar
from llamad.tools.json_repair import close_json
from llamad.tools.parse import ToolCallParser, new_call_id

__all__ = ["ToolChoice", "ToolHistoryError", "ToolPlan", "ToolSchemaError", "apply", "check_history", "new_call_id", "plan", "tools_prompt"]


@dataclass
class ToolChoice:
    mode: str = "auto"  # "auto" | "none" | "required"  (Anthropic "any" -> "required")
    name: str | None = None  # a named tool: mode "required" with this name


@dataclass
class ToolPlan:
    grammar: str | None  # GBNF for the whole output, or None (free text)
    system_suffix: str  # appended to the system prompt ("" when not needed)
    # The tools the prompt should present (empty with tool_choice none).
    tools: list[ToolSpec] = field(default_factory=list)
    # The tools a call may name (the named one only, with a named tool choice).
    callable: list[str] = field(default_factory=list)
    parallel: bool = True
    # The family's call format (llamad.tools.formats): grammar, parser and history follow it.
    fmt: ToolFormat = HERMES
    schemas: dict = field(default_factory=dict)  # callable tool name -> parameters schema

    def parser(self, id_prefix: str = "call_") -> ToolParser:
        """A fresh parser for one request's answer."""
        if not self.callable:
            return PlainText()
        if self.fmt.name in ("qwen3-coder", "glm", "harmony"):
            from llamad.tools.family_parse import GlmParser, HarmonyParser, QwenXmlParser

            kind = {"qwen3-coder": QwenXmlParser, "glm": GlmParser, "harmony": HarmonyParser}[self.fmt.name]
            return kind(self.schemas, id_prefix=id_prefix, parallel=self.parallel)
        return ToolCallParser(self.callable, id_prefix=id_prefix, parallel=self.parallel, live=self.grammar is not None)


def tools_prompt(tools: list[ToolSpec], choice: ToolChoice, parallel: bool) -> str:
    """The tool instructions for templates without tool support (format in the module doc)."""
    lines = [
        "# Tools",
        "",
        "You may call one or more functions to assist with the user query.",
        "",
        "You are provided with function signatures within <tools></tools> XML tags:",
        "<tools>",
    ]
    for tool in tools:
        function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        lines.append(json.dumps({"type": "function", "function": function}, ensure_ascii=False))
    lines += [
        "</tools>",
        "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        "<tool_call>",
        '{"name": <function-name>, "arguments": <args-json-object>}',
        "</tool_call>",
    ]
    if choice.name:
        lines.append(f"You must call the function {choice.name}.")
    elif choice.mode == "required":
        lines.append("You must call a function.")
    if not parallel:
        lines.append("Call at most one function.")
    return "\n".join(lines)


def _answer_schema(response_format: dict | None) -> tuple[dict | None, bool, str]:
    """(schema, strict, prompt line) for a response_format, or (None, False, "")."""
    if not response_format:
        return None, False, ""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None, False, ""
    if kind == "json_object":
        return {"type": "object"}, False, "Answer with a single JSON object."
    if kind == "json_schema":
        schema = response_format.get("schema")
        if schema is None:
            schema = {}
        if not isinstance(schema, dict):
            raise ToolSchemaError("response_format schema: must be a JSON object", param="response_format")
        text = json.dumps(schema, ensure_ascii=False)
        return schema, bool(response_format.get("strict")), (
            f"Answer with a single JSON object that matches this JSON schema:\n{text}"
        )
    raise ToolSchemaError(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


def plan(
    tools: list[ToolSpec],
    choice: ToolChoice,
    *,
    parallel: bool = True,
    template_supports_tools: bool = False,
    response_format: dict | None = None,
    tool_format: ToolFormat | None = None,
) -> ToolPlan:
    """Prompt text, grammar and parser for a request. Raises ToolSchemaError (-> 400).
    `tool_format`: the model's family format; used only when the template renders the
    tools (llamad's own prompt asks for Hermes calls)."""
    fmt = tool_format if (tool_format is not None and template_supports_tools) else HERMES
    names = [tool.name for tool in tools]
    for i, tool in enumerate(tools):
        if not tool.name or not isinstance(tool.name, str):
            raise ToolSchemaError(f"tools[{i}]: a tool needs a non-empty name", param="tools")
        if names.count(tool.name) > 1:
            raise ToolSchemaError(f"tools[{i}]: the tool name {tool.name!r} is used twice", param="tools")
        if not isinstance(tool.parameters, dict):
            raise ToolSchemaError(f"tool {tool.name!r} parameters: must be a JSON schema object", param="tools")
    mode = choice.mode
    if mode not in ("auto", "none", "required"):
        raise ToolSchemaError(f"tool_choice {mode!r} is not supported", param="tool_choice")
    if choice.name is not None:
        if choice.name not in names:
            raise ToolSchemaError(
                f"tool_choice names the tool {choice.name!r}, which is not among the offered tools "
                f"({', '.join(names) or 'none'})",
                param="tool_choice",
            )
        mode = "required"
    if mode == "required" and not tools:
        raise ToolSchemaError("tool_choice requires a tool call, but no tools are offered", param="tool_choice")
    schema, strict, answer_line = _answer_schema(response_format)

    offered = [] if mode == "none" else tools
    callable_tools = [t for t in offered if choice.name is None or t.name == choice.name]
    grammar = build_grammar(callable_tools, mode if offered else "none", parallel, schema, strict, fmt=fmt)
    parts = []
    if offered and not template_supports_tools:
        parts.append(tools_prompt(offered, ToolChoice(mode, choice.name), parallel))
    if answer_line and mode != "required":
        parts.append(answer_line)
    return ToolPlan(
        grammar=grammar,
        system_suffix="\n\n".join(parts),
        tools=offered,
        callable=[t.name for t in callable_tools],
        parallel=parallel,
        fmt=fmt,
        schemas={t.name: t.parameters for t in callable_tools},
    )


def apply(
    chat: Chat,
    choice: ToolChoice,
    *,
    parallel: bool,
    response_format: dict | None,
    template_supports_tools: bool,
    id_prefix: str,
    tool_format: ToolFormat | None = None,
) -> tuple[str | None, Callable[[], ToolParser]]:
    """What the request path does with every translated request: check the history's tool
    parts, then, when tools, a forced call or a response format are asked for, add the tool
    prompt to `chat` and return the grammar and what makes a parser for one answer.
    Raises ToolHistoryError or ToolSchemaError (each a 400 naming the field)."""
    check_history(chat, chat.tools)  # history holds tool parts even when no tools are offered now
    if not chat.tools and response_format is None and choice.mode != "required":
        if tool_format is not None and tool_format.name == "harmony" and template_supports_tools:
            from llamad.tools.family_parse import HarmonyParser  # drops the message headers

            return None, lambda: HarmonyParser({}, id_prefix=id_prefix)
        return None, PlainText
    offered = chat.tools if choice.mode != "none" else []
    try:
        planned = plan(
            offered,
            choice,
            parallel=parallel,
            template_supports_tools=template_supports_tools,
            response_format=response_format,
            tool_format=tool_format,
        )
    except ToolSchemaError as exc:
        exc.param = exc.param or ("tools" if offered else "response_format")
        raise
    chat.system_suffix = planned.system_suffix
    return planned.grammar, lambda: planned.parser(id_prefix=id_prefix)


class ToolHistoryError(ValueError):
    """The conversation's tool parts do not hold together (-> 400 naming the history)."""


def check_history(chat: Chat, offered: list[ToolSpec]) -> None:
    """Checks and repairs the tool parts of a conversation before it is rendered.

    - A call with cut-off JSON arguments is closed (`{"city": "Par` -> `{"city": "Par"}`);
      arguments that are not a JSON object at all are kept, as text, in the assistant turn
      (the call itself is dropped, its id still answers a later tool result).
    - A call to a tool that is not offered (any more) stays: it is what happened.
    - A tool result whose tool_call_id answers no earlier call -> ToolHistoryError naming the message.
    - A call without a name -> ToolHistoryError naming it.
    """
    seen_ids: set[str] = set()
    for m_index, message in enumerate(chat.messages):
        if message.role == "assistant" and message.tool_calls:
            kept: list[ToolCall] = []
            as_text: list[str] = []
            for c_index, call in enumerate(message.tool_calls):
                where = f"messages[{m_index}].tool_calls[{c_index}]"
                if not call.name:
                    raise ToolHistoryError(f"{where}: a tool call needs a function name")
                if call.id:
                    seen_ids.add(call.id)
                arguments = _repaired_arguments(call.arguments)
                if arguments is None:
                    name = json.dumps(call.name, ensure_ascii=False)
                    as_text.append(f'<tool_call>\n{{"name": {name}, "arguments": {call.arguments}}}\n</tool_call>')
                else:
                    call.arguments = arguments
                    kept.append(call)
            if as_text:
                message.tool_calls = kept
                message.content = "\n".join([message.content, *as_text]).strip()
        elif message.role == "tool":
            if message.tool_call_id and message.tool_call_id not in seen_ids:
                raise ToolHistoryError(
                    f"messages[{m_index}]: the tool result for tool_call_id {message.tool_call_id!r} "
                    "answers no tool call in an earlier assistant message"
                )


def _repaired_arguments(arguments: str) -> str | None:
    """Arguments as a JSON object text (cut-off JSON closed), or None if they are not one."""
    if arguments is None or not str(arguments).strip():
        return "{}"
    text = str(arguments)
    try:
        value = json.loads(text)
        return text if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    closed = close_json(text.strip())
    if closed is None:
        return None
    try:
        return closed if isinstance(json.loads(closed), dict) else None
    except json.JSONDecodeError:
        return None
