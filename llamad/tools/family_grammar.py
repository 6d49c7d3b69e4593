"""GBNF for tool calls in each family's own format (llamad.tools.formats), around the same
schema-valid arguments as the Hermes grammar (llamad.tools.grammar).

`calls_rule(builder, tools, parallel, fmt)` adds the rules of a call block and returns the
rule that matches the whole block; the block starts with `fmt.trigger` wherever a lazy
grammar (tool_choice auto) needs it to. What each format writes:

- `json`, `llama3`: `{"name": "n", "arguments"|"parameters": {…}}`, further calls on new lines.
- `mistral`: `[TOOL_CALLS][{"name": "n", "arguments": {…}}, …]` (an `"id"` of 9 letters or
  digits may follow the arguments, as the template renders them).
- `mistral-args`: `[TOOL_CALLS]n[ARGS]{…}`, repeated for parallel calls.
- `qwen3-coder`: `<tool_call>\\n<function=n>\\n<parameter=k>\\nv\\n</parameter>\\n…</function>\\n</tool_call>`;
  a string value is raw text (anything but `</parameter>`; enum and const strings as
  the exact text), any other value is JSON matching the property's schema. The properties come in
  schema order, required ones always, optional ones each optional; only declared
  properties are written.
- `glm`: `<tool_call>n\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n…</tool_call>` (GLM 4.5/4.6;
  GLM 4.7 writes the same without the newlines, so each newline is optional). Values as in
  `qwen3-coder`: raw text for a string (anything but `</arg_value>`), JSON otherwise, the
  properties in schema order. Parallel calls follow on (after a newline, optionally).
  Under a required call the block may begin with the newline GLM 4.6 writes after its
  reasoning.
- `harmony`: ` to=functions.n<|channel|>commentary json<|message|>{…}` (also accepted:
  `<|channel|>commentary to=functions.n <|constrain|>json<|message|>`), after an optional
  analysis message when the call is required. One call per turn: the model ends a call
  with `<|call|>`, an end-of-generation token the grammar leaves to the model.
"""

from __future__ import annotations

import json
from typing import Any

from llamad.engine.chat import ToolSpec
from llamad.grammar.pattern import gbnf_literal
from llamad.grammar.schema import MalformedSchema, normalise
from llamad.tools.formats import ToolFormat



def _class_char(c: str) -> str:
    return "\\" + c if c in "[]\\" else c


def text_without(word: str) -> str:
    """GBNF for any text in which `word` does not occur (`word`'s first character must not
    occur again in it). Runs of that first character are text too (`cat <<EOF` in a shell
    command, `x << 2` in reasoning), and the text may end with the beginning of `word`
    (`a</p`, then `</parameter>`)."""
    first, rest = word[0], word[1:]
    run = f"{gbnf_literal(first)}+"

    def other_than(c: str) -> str:
        return f"[^{_class_char(c)}{_class_char(first)}]"

    breaks = [other_than(rest[0])] + [f"{gbnf_literal(rest[:k])} {other_than(rest[k])}" for k in range(1, len(rest))]
    partials = " | ".join(gbnf_literal(rest[:k]) for k in range(1, len(rest)))
    # A run that stops at a beginning of `rest` is text only before another run, or at the end.
    lead = f"( {run} ( {partials} ) )* " if partials else ""
    tail = f"{lead}{run} ( {partials} )?" if partials else run
    return f"( [^{_class_char(first)}] | {lead}{run} ( {' | '.join(breaks)} ) )* ( {tail} )?"


XML_TEXT = text_without("</parameter>")  # a string parameter's raw text
GLM_TEXT = text_without("</arg_value>")  # a string argument's raw text
HARMONY_TEXT = text_without("<|")  # an analysis message


def _args(builder: Any, tool: ToolSpec, i: int) -> str:
    return builder.schema_rule(tool.parameters, f"tc{i}-args", f"tool '{tool.name}' parameters", object_only=True)


def _json_calls(builder: Any, tools: list[ToolSpec], parallel: bool, key: str) -> str:
    alternatives = []
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name) + f', "{key}": '
        alternatives.append(f'{gbnf_literal(head)} {_args(builder, tool, i)} "}}"')
    builder.add("tc-call", " | ".join(alternatives))
    builder.add("tc-more", '("\\n" tc-call tc-more)?' if parallel else '""')
    return builder.add("tc-block", "tc-call tc-more")


def _mistral_calls(builder: Any, tools: list[ToolSpec], parallel: bool) -> str:
    alternatives = []
    for i, tool in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
        alternatives.append(f'{gbnf_literal(head)} {_args(builder, tool, i)} tc-id? "}}"')
    builder.add("tc-id", '", \\"id\\": \\"" [a-zA-Z0-9]{9} "\\""')
    builder.add("tc-call", " | ".join(alternatives))
    more = '(", " tc-call)*' if parallel else ""
    return builder.add("tc-block", f'"[TOOL_CALLS][" tc-call {more} "]"')


def _mistral_args_calls(builder: Any, tools: list[ToolSpec], parallel: bool) -> str:
    alternatives = []
    for i, tool in enumerate(tools):
        alternatives.append(f'{gbnf_literal(tool.name + "[ARGS]")} {_args(builder, tool, i)}')
    builder.add("tc-call", '"[TOOL_CALLS]" (' + " | ".join(alternatives) + ")")
    return builder.add("tc-block", "tc-call+" if parallel else "tc-call")


def _string_literals(schema: Any) -> list[str] | None:
    """The exact strings a string-only schema allows (enum / const), or None."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema and isinstance(schema["const"], str):
        return [schema["const"]]
    values = schema.get("enum")
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return values
    return None


def is_string_schema(schema: Any) -> bool:
    """A property whose value Qwen3-Coder and GLM write as raw text (its type is only string)."""
    if not isinstance(schema, dict):
        return False
    if schema.get("type") == "string" or schema.get("type") == ["string"]:
        return True
    return _string_literals(schema) is not None and "type" not in schema


def _xml_params(builder: Any, tool: ToolSpec, i: int, text: str, member) -> str:
    """The properties of `tool` in schema order, each as `member(name, value)` GBNF where a
    string value is `text` and any other a JSON value of the property's schema."""
    try:
        canonical = normalise(tool.parameters, object_only=True).schema
    except MalformedSchema:
        _args(builder, tool, i)  # raises the ToolSchemaError naming the keyword
        raise
    properties = canonical.get("properties") or {}
    required = set(canonical.get("required") or [])
    defs = {k: canonical[k] for k in ("$defs", "definitions") if k in canonical}
    parts = []
    for j, (name, schema) in enumerate(properties.items()):
        if schema is False:
            continue
        original = (tool.parameters.get("properties") or {}).get(name, schema) if isinstance(tool.parameters, dict) else schema
        literals = _string_literals(original)
        if literals is not None and is_string_schema(original):
            value = " | ".join(gbnf_literal(v) for v in literals)
        elif is_string_schema(original):
            value = text
        else:
            where = f"tool '{tool.name}' parameters.properties.{name}"
            value = builder.schema_rule({**schema, **defs} if isinstance(schema, dict) else schema, f"tc{i}-p{j}", where)
        rule = builder.add(f"tc{i}-p{j}-kv", member(name, value))
        parts.append(rule if name in required else f"{rule}?")
    return " ".join(parts) or '""'


def _qwen_calls(builder: Any, tools: list[ToolSpec], parallel: bool) -> str:
    alternatives = []
    for i, tool in enumerate(tools):
        params = _xml_params(builder, tool, i, XML_TEXT, _qwen_member)
        alternatives.append(f'{gbnf_literal(f"<function={tool.name}>")} "\\n" {params} "</function>"')
    builder.add("tc-call", " | ".join(alternatives))
    builder.add("tc-body", '"\\n" tc-call "\\n" "</tool_call>" tc-more')
    builder.add("tc-more", '("\\n" "<tool_call>" tc-body)?' if parallel else '""')
    return builder.add("tc-block", '"<tool_call>" tc-body')


def _qwen_member(name: str, value: str) -> str:
    return f'{gbnf_literal(f"<parameter={name}>")} "\\n" ({value}) "\\n" "</parameter>" "\\n"'


def _glm_member(name: str, value: str) -> str:
    return f'{gbnf_literal(f"<arg_key>{name}</arg_key>")} "\\n"? "<arg_value>" ({value}) "</arg_value>" "\\n"?'


def _glm_calls(builder: Any, tools: list[ToolSpec], parallel: bool, required: bool) -> str:
    alternatives = []
    for i, tool in enumerate(tools):
        params = _xml_params(builder, tool, i, GLM_TEXT, _glm_member)
        alternatives.append(f'{gbnf_literal(tool.name)} "\\n"? {params}')
    builder.add("tc-call", " | ".join(alternatives))
    builder.add("tc-body", 'tc-call "</tool_call>" tc-more')
    builder.add("tc-more", '("\\n"? "<tool_call>" tc-body)?' if parallel else '""')
    # a lazy grammar starts at the trigger itself; a forced call may follow GLM 4.6's newline
    return builder.add("tc-block", ('"\\n"? ' if required else "") + '"<tool_call>" tc-body')


def _harmony_calls(builder: Any, tools: list[ToolSpec], required: bool) -> str:
    alternatives = []
    for i, tool in enumerate(tools):
        alternatives.append(f'{gbnf_literal(tool.name)} tc-mid {_args(builder, tool, i)}')
    builder.add("tc-mid", '"<|channel|>commentary"? " "? "<|constrain|>"? "json"? "<|message|>"')
    builder.add("tc-call", '" to=functions." (' + " | ".join(alternatives) + ")")
    if not required:
        return builder.add("tc-block", "tc-call")
    builder.add("tc-analysis", f'"<|channel|>analysis<|message|>" {HARMONY_TEXT} "<|end|>" "<|start|>assistant"')
    return builder.add("tc-block", 'tc-analysis? "<|channel|>commentary"? tc-call')


def reasoning_first(builder: Any, fmt: ToolFormat | None) -> str:
    """Under a required call, what may come before it: the reasoning a model opens itself
    (`<think>…</think>`, Magistral's `[THINK]…[/THINK]`), then whitespace; "" for a family
    without reasoning markers, and for harmony, whose analysis message is in its block. A
    prompt that opened the reasoning already is the constraint's `after` instead
    (llamad.grammar.constraint)."""
    if fmt is None or fmt.reasoning is None or fmt.name == "harmony":
        return ""
    opening, closing = fmt.reasoning
    builder.add("tc-reasoning", f"{gbnf_literal(opening)} {text_without(closing)} {gbnf_literal(closing)} [ \\t\\r\\n]*")
    return "tc-reasoning? "


def calls_rule(builder: Any, tools: list[ToolSpec], parallel: bool, fmt: ToolFormat, required: bool) -> str:
    """The rule for a block of calls in `fmt` (see the module doc)."""
    if fmt.name in ("json", "llama3"):
        return _json_calls(builder, tools, parallel, "parameters" if fmt.name == "llama3" else "arguments")
    if fmt.name == "mistral":
        return _mistral_calls(builder, tools, parallel)
    if fmt.name == "mistral-args":
        return _mistral_args_calls(builder, tools, parallel)
    if fmt.name == "qwen3-coder":
        return _qwen_calls(builder, tools, parallel)
    if fmt.name == "glm":
        return _glm_calls(builder, tools, parallel, required)
    if fmt.name == "harmony":
        return _harmony_calls(builder, tools, required)
    raise ValueError(f"no grammar for tool format {fmt.name!r}")
