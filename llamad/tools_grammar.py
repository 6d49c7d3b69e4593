"""GBNF grammars for tool calls and JSON answers, built from the clients' JSON schemas.

A grammar constrains decoding so the output is valid by construction: a tool call is
always `<tool_call>\\n{"name": "<offered tool>", "arguments": <object matching that tool's
schema>}\\n</tool_call>`, a structured answer always matches its schema. JSON schema is
turned into GBNF by llama-cpp-python's `SchemaConverter`; what it cannot express becomes a
`ToolSchemaError` that names the tool and the part of the schema.
"""

from __future__ import annotations

import json
from typing import Any

from llamad.chat import ToolSpec
from llamad.tools_sampling import lazy

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

# Keywords the converter does not enforce. With "strict" they are an error, otherwise the
# grammar still guarantees well-formed JSON of the right shape and these are advisory.
UNENFORCED_KEYWORDS = (
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "not", "if", "then", "else", "patternProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "uniqueItems", "contains",
    "minProperties", "maxProperties", "unevaluatedProperties",
)  # fmt: skip

KNOWN_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class ToolSchemaError(ValueError):
    """A schema the grammar builder cannot express; the message names where (-> 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def call_prefix(name: str) -> str:
    """The exact text a constrained call object starts with, up to its arguments."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


def _check_schema(schema: Any, where: str, strict: bool) -> None:
    """Rejects what the converter would crash on or (with strict) silently ignore."""
    if isinstance(schema, bool):
        raise ToolSchemaError(f"{where}: boolean schemas are not supported; use {{}} instead")
    if not isinstance(schema, dict):
        raise ToolSchemaError(f"{where}: a schema must be a JSON object, got {type(schema).__name__}")
    kind = schema.get("type")
    for t in kind if isinstance(kind, list) else [kind]:
        if t is not None and (not isinstance(t, str) or t not in KNOWN_TYPES):
            raise ToolSchemaError(f"{where}.type: unknown type {t!r}")
    # Shapes the converter would crash on, or turn into a grammar that matches nothing.
    for key in ("properties", "$defs", "definitions"):
        if key in schema and not isinstance(schema[key], dict):
            raise ToolSchemaError(f"{where}.{key}: must be an object")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "enum"):
        if key in schema and not (isinstance(schema[key], list) and schema[key]):
            raise ToolSchemaError(f"{where}.{key}: must be a non-empty array")
    if "required" in schema and not (
        isinstance(schema["required"], list) and all(isinstance(r, str) for r in schema["required"])
    ):
        raise ToolSchemaError(f"{where}.required: must be an array of property names")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise ToolSchemaError(f"{where}.$ref: only local references ('#/...') are supported, got {ref!r}")
    if strict:
        for keyword in UNENFORCED_KEYWORDS:
            if keyword in schema:
                raise ToolSchemaError(f"{where}.{keyword}: this keyword cannot be enforced by the grammar")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            _check_schema(sub, f"{where}.{key}.{name}", strict)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            _check_schema(sub, f"{where}.{key}[{i}]", strict)
    items = schema.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            _check_schema(sub, f"{where}.items[{i}]", strict)
    elif items is not None:
        _check_schema(items, f"{where}.items", strict)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        _check_schema(extra, f"{where}.additionalProperties", strict)


class GrammarBuilder:
    """Collects the rules of one grammar; each schema gets its own rule-name prefix."""

    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter

        self.converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.rules: dict[str, str] = {}

    def schema_rule(self, schema: dict, name: str, where: str, strict: bool = False) -> str:
        """Adds the rules for `schema`; returns the rule name that matches it."""
        _check_schema(schema, where, strict)
        schema = json.loads(json.dumps(schema))  # resolve_refs rewrites the dict in place
        try:
            schema = self.converter.resolve_refs(schema, name)
            return self.converter.visit(schema, name)
        except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ToolSchemaError(f"{where}: cannot be turned into a grammar ({detail[:200]})") from None
        except RecursionError:
            raise ToolSchemaError(f"{where}: the schema nests too deeply") from None

    def add(self, name: str, rule: str) -> str:
        self.rules[name] = rule
        return name

    def text(self) -> str:
        return "\n".join(f"{name} ::= {rule}" for name, rule in self.rules.items()) + "\n" + self.converter.format_grammar()


def _calls_rules(builder: GrammarBuilder, tools: list[ToolSpec], parallel: bool) -> str:
    """Adds `tc-call` (one call object) and `tc-more` (what follows a call); returns the block rule."""
    alternatives = []
    for i, tool in enumerate(tools):
        args = builder.schema_rule(tool.parameters, f"tc{i}-args", f"tool '{tool.name}' parameters")
        alternatives.append(f"{_literal(call_prefix(tool.name))} {args} \"}}\"")
    builder.add("tc-call", " | ".join(alternatives))
    # Newlines optional: a model's token may glue "<tool_call>" to the "{" that follows.
    builder.add("tc-body", f'"\\n"? tc-call "\\n"? {_literal(CALL_CLOSE)} tc-more')
    builder.add("tc-more", f'("\\n" {_literal(CALL_OPEN)} tc-body)?' if parallel else '""')
    return "tc-body"


def build_grammar(
    tools: list[ToolSpec],
    mode: str,
    parallel: bool,
    answer_schema: dict | None,
    answer_strict: bool = False,
) -> str | None:
    """The GBNF for a request, or None when the output is free text.

    mode "required": only tool calls. mode "auto": a lazy grammar (llamad.tools_sampling):
    free text until `<tool_call>`, from there only calls; or, when `answer_schema` is set,
    the JSON answer or calls. With no
    tools (or mode "none") and an `answer_schema`: only the JSON answer.
    """
    builder = GrammarBuilder()
    if tools and mode == "required":
        body = _calls_rules(builder, tools, parallel)
        builder.add("root", f"{_literal(CALL_OPEN)} {body}")
        # rules are emitted in insertion order; llama.cpp finds root by name
        return builder.text()
    if tools and mode == "auto":
        body = _calls_rules(builder, tools, parallel)
        if answer_schema is not None:
            answer = builder.schema_rule(answer_schema, "answer", "response_format schema", answer_strict)
            builder.add("root", f"{answer} | {_literal(CALL_OPEN)} {body}")
            return builder.text()
        builder.add("root", f"{_literal(CALL_OPEN)} {body}")
        return lazy(builder.text(), CALL_OPEN)
    if answer_schema is not None:
        answer = builder.schema_rule(answer_schema, "answer", "response_format schema", answer_strict)
        builder.add("root", answer)
        return builder.text()
    return None

