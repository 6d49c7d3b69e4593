"""GBNF grammars for tool calls and JSON answers, built from the clients' JSON schemas.

A grammar constrains decoding so the output is valid by construction: a tool call is
always `<tool_call>\\n{"name": "<offered tool>", "arguments": <object matching that tool's
schema>}\\n</tool_call>`, a structured answer always matches its schema.

Every valid JSON Schema (draft 2020-12, 2019-09, draft-07 and older as clients send them)
becomes a grammar. llamad.grammar.schema first rewrites it into the canonical subset that
llama-cpp-python's `SchemaConverter` turns into a correct grammar; `_Converter` below fixes
what the stock converter gets wrong (string escaping, `{}` as any value, `$ref` names,
patterns, raw control characters in strings). Each keyword is either enforced or loosened
to the nearest superset the grammar can express; the arguments are always valid JSON and
satisfy every enforced keyword:

| keyword | grammar |
|---|---|
| `{}`, `true`, annotations only (`description`, `title`, `default`, `examples`, `$schema`, `$id`, `$comment`, `deprecated`, `readOnly`, `writeOnly`, unknown keywords) | enforced: any JSON value |
| `type` (a name or a list), `const`, `enum` (mixed types; values that fail the sibling keywords are dropped) | enforced |
| `properties`, `required`, `additionalProperties` (bool or schema) | enforced; without `additionalProperties` only declared properties are written (narrower, on purpose) |
| `$ref` (`#`, `#/json/pointer`, `#anchor`, an embedded `$id`) to `$defs` / `definitions` / anywhere, recursive too | enforced |
| `$ref` to a remote schema | loosened: any value (never fetched) |
| `anyOf` | enforced; sibling keywords are merged into each alternative |
| `oneOf` | loosened to `anyOf` ("exactly one" is not checked) |
| `allOf` | enforced by merging the branches; where two branches' `pattern`/`format` differ, or `additionalProperties: false` meets the other branch's properties, loosened |
| `items`, `prefixItems`, draft-07 `items: [...]` / `additionalItems`, `minItems`, `maxItems` (up to 1000) | enforced; a tuple is written at its full length (narrower) |
| `minLength`, `maxLength` (up to 1000) | enforced, unless a `pattern` or `format` on the same string is (then loosened) |
| `pattern` | enforced when it translates exactly (llamad.grammar.pattern); look-arounds, back-references, flags, `\\b` → loosened |
| `format` `date`, `time`, `date-time`, `uuid` | enforced (shape; dates are not calendar-checked) |
| other `format`s | loosened: any string |
| `minimum` / `exclusiveMinimum` that come to ≥ 0 (numbers, integers) or ≥ 1 (integers) | enforced (no minus sign; no leading zero) |
| other `minimum`, `exclusiveMinimum`, and `maximum`, `exclusiveMaximum`, `multipleOf` | loosened: any number of the type |
| `patternProperties` | loosened: extra keys (when allowed) take any of its schemas; declared properties are not checked against it |
| `propertyNames`, `minProperties`, `maxProperties`, `dependentRequired`, `dependentSchemas`, `dependencies`, `unevaluatedProperties` | loosened (ignored) |
| `contains`, `minContains`, `maxContains`, `uniqueItems`, `unevaluatedItems` | loosened (ignored) |
| `not`, `if` / `then` / `else`, `$dynamicRef`, `$recursiveRef` | loosened (ignored) |
| `false` | enforced where it can be: a property that cannot occur is never written, `items: false` is `[]`, an impossible `anyOf` branch is dropped; elsewhere loosened |
| nesting deeper than 40 levels | loosened: any value |

Numbers are written as JSON numbers, integers without fraction or exponent; whitespace is
at most one space. A malformed schema (a keyword of the wrong type, an unknown type name,
a local `$ref` that points nowhere) is a `ToolSchemaError` naming the keyword (-> 400).
With `strict` (OpenAI's `response_format.json_schema.strict`) a schema that uses any
keyword the grammar would loosen is refused with the same 400 naming it: strict promises
the whole schema holds. Tools are never strict: their schemas are loosened, logged at debug.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import structlog

from llamad.engine.chat import ToolSpec
from llamad.grammar.pattern import JSON_CHAR, gbnf_literal, pattern_gbnf, repeat as _repeat
from llamad.grammar.constraint import lazy
from llamad.grammar.schema import MalformedSchema, normalise
from llamad.tools.formats import ToolFormat

log = structlog.get_logger("llamad.tools")

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


class ToolSchemaError(ValueError):
    """A schema that is not valid JSON Schema, or a bad tool list; the message names where (-> 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param



def call_prefix(name: str) -> str:
    """The exact text a constrained call object starts with, up to its arguments."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


@functools.cache
def _converter_class():
    from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, PRIMITIVE_RULES, SchemaConverter

    class _Converter(SchemaConverter):
        """SchemaConverter, corrected for the canonical schemas of llamad.grammar.schema."""

        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._ref_rules: dict[str, str] = {}

        def visit(self, schema: dict, name: str) -> str:
            if not (schema.keys() - {"$defs"}):  # the stock converter reads {} as "any object"
                return self._add_primitive("value", PRIMITIVE_RULES["value"])
            # Counted repetitions as GBNF {m,n}, which llama.cpp expands itself; the stock
            # converter nests one parenthesis per count, too deep for large maxLength.
            kind = schema.get("type")
            if kind == "string" and ("minLength" in schema or "maxLength" in schema) and not (
                {"pattern", "format"} & schema.keys()
            ):
                char = self._add_primitive("char", PRIMITIVE_RULES["char"])
                count = _repeat(char, schema.get("minLength", 0), schema.get("maxLength"))
                return self._add_rule(name, f'"\\"" {count} "\\"" space')
            if kind in ("integer", "number") and "minimum" in schema:  # 0 or 1: no minus sign
                self._add_primitive("integral-part", PRIMITIVE_RULES["integral-part"])
                if kind == "integer":
                    digits = "integral-part" if schema["minimum"] == 0 else "[1-9] [0-9]{0,15}"
                    return self._add_rule(name, f"{digits} space")
                self._add_primitive("decimal-part", PRIMITIVE_RULES["decimal-part"])
                return self._add_rule(name, 'integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? space')
            if kind == "array" and "items" in schema:  # stock: `items: {}` is read as absent
                item = self.visit(schema["items"], f"{name}-item")
                low, high = schema.get("minItems", 0), schema.get("maxItems")
                if high == 0:
                    return self._add_rule(name, '"[" space "]" space')
                more = _repeat(f'("," space {item})', max(low - 1, 0), None if high is None else high - 1)
                body = f"{item} {more}" if low else f"({item} {more})?"
                return self._add_rule(name, f'"[" space {body} "]" space')
            return super().visit(schema, name)

        def _build_object_rule(self, properties: list, required: set, name: str, additional_properties: Any) -> str:
            # Stock, except that extra members may not reuse a declared name: `{"a": "x"}`
            # must not pass as an extra member when property `a` is an integer.
            kv_rules = {}
            declared = [k for k, _ in properties]
            properties = [(k, v) for k, v in properties if v is not False]  # a name that may not occur
            for prop_name, prop_schema in properties:
                value = self.visit(prop_schema, f"{name}-{prop_name}")
                key = self._format_literal(json.dumps(prop_name))
                kv_rules[prop_name] = self._add_rule(f"{name}-{prop_name}-kv", f'{key} space ":" space {value}')
            required_props = [k for k, _ in properties if k in required]
            optional_props = [k for k, _ in properties if k not in required]
            if additional_properties is True or isinstance(additional_properties, dict):
                value = self.visit({} if additional_properties is True else additional_properties, f"{name}-additional-value")
                key = self._other_key(name, declared)
                kv_rules["*"] = self._add_rule(f"{name}-additional-kv", f'{key} ":" space {value}')
                optional_props.append("*")

            def optional_from(keys: list, first_is_optional: bool) -> str:
                key, rest = keys[0], keys[1:]
                if key == "*":  # stock forgets the comma before extras that follow a property
                    out = self._add_rule(f"{name}-additional-kvs", f'{kv_rules["*"]} ( "," space {kv_rules["*"]} )*')
                    out = f'( "," space {out} )?' if first_is_optional else out
                elif first_is_optional:
                    out = f'( "," space {kv_rules[key]} )?'
                else:
                    out = kv_rules[key]
                if rest:
                    out += " " + self._add_rule(f"{name}-{key}-rest", optional_from(rest, first_is_optional=True))
                return out

            rule = '"{" space ' + ' "," space '.join(kv_rules[k] for k in required_props)
            if optional_props:
                alternatives = " | ".join(optional_from(optional_props[i:], False) for i in range(len(optional_props)))
                rule += f' ( "," space ( {alternatives} ) )?' if required_props else f" ( {alternatives} )?"
            return rule + ' "}" space'

        def _other_key(self, name: str, declared: list[str]) -> str:
            """A member name (with its quotes) that is none of `declared`. Written without
            escapes, so no spelling of a declared name can slip through."""
            plain = '[^"\\\\\\x00-\\x1F]'
            trie: dict = {}
            for word in declared:
                node = trie
                for ch in word:
                    node = node.setdefault(ch, {})
                node[None] = {}

            def rest(node: dict, depth: int) -> str:
                # A name with a quote, backslash or control character needs an escape, so
                # the plain characters here can never spell it.
                chars = [c for c in node if c is not None and c not in '"\\' and ord(c) >= 0x20]
                excluded = "".join(f"\\u{ord(c):04X}" if ord(c) < 0x10000 else f"\\U{ord(c):08X}" for c in chars)
                options = [f'[^"\\\\\\x00-\\x1F{excluded}] {plain}* "\\""']
                if None not in node:
                    options.append('"\\""')
                for c in chars:
                    options.append(f"{gbnf_literal(c)} {self._add_rule(f'{name}-other-key-{depth}', rest(node[c], depth + 1))}")
                return " | ".join(options)

            return self._add_rule(f"{name}-other-key", f'"\\"" ( {rest(trie, 0)} ) space')

        def _format_literal(self, literal: str) -> str:
            return gbnf_literal(literal)  # the stock one leaves backslashes unescaped

        def _generate_constant_rule(self, value: Any) -> str:
            return gbnf_literal(json.dumps(value, ensure_ascii=False))

        def _visit_pattern(self, pattern: str, name: str) -> str:
            body = pattern_gbnf(pattern)
            assert body is not None, f"pattern {pattern!r} was not loosened"
            return self._add_rule(name, f'"\\"" {body} "\\"" space')

        def _resolve_ref(self, ref: str) -> str:
            # Stock: one rule per last path segment, shared by every tool (so two tools'
            # "#/$defs/item" collide) and unusable names for recursive references.
            rule = self._ref_rules.get(ref)
            if rule is None:
                base = INVALID_RULE_CHARS_RE.sub("-", ref.replace("#/$defs/", "-ref-"))
                rule = base
                i = 0
                while rule in self._rules:
                    i += 1
                    rule = f"{base}{i}"
                self._ref_rules[ref] = rule
                self._rules[rule] = '""'  # reserved while the definition is visited
                self._rules[rule] = self.visit(self._refs[ref], f"{rule}-def")
            return rule

        def format_grammar(self) -> str:
            if "char" in self._rules:  # stock: any raw character, control characters too
                self._rules["char"] = JSON_CHAR
            return super().format_grammar()

    return _Converter


class GrammarBuilder:
    """Collects the rules of one grammar; each schema gets its own rule-name prefix."""

    def __init__(self) -> None:
        self.converter = _converter_class()()
        self.rules: dict[str, str] = {}

    def schema_rule(self, schema: Any, name: str, where: str, strict: bool = False, object_only: bool = False) -> str:
        """Adds the rules for `schema`; returns the rule name that matches it.
        `object_only`: tool arguments, a JSON object whatever the schema allows."""
        try:
            normalised = normalise(schema, object_only=object_only)
        except MalformedSchema as exc:
            raise ToolSchemaError(f"{where}.{exc}" if exc.path else f"{where}: {exc}") from None
        except RecursionError:
            raise ToolSchemaError(f"{where}: the schema nests too deeply to be read") from None
        if normalised.loosened:
            if strict:
                raise ToolSchemaError(
                    f"{where}.{normalised.loosened[0]}: this keyword cannot be enforced by the grammar; "
                    "leave out strict to have it loosened"
                )
            log.debug("schema keywords loosened", schema=where, keywords=normalised.loosened)
        canonical = json.loads(json.dumps(normalised.schema))  # resolve_refs rewrites the dict in place
        try:
            canonical = self.converter.resolve_refs(canonical, name)
            return self.converter.visit(canonical, name)
        except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
            # A canonical schema always converts; this is a bug, reported as what it is.
            log.error("canonical schema did not convert", schema=where, canonical=normalised.schema, error=repr(exc))
            raise ToolSchemaError(f"{where}: cannot be turned into a grammar ({str(exc)[:200]})") from None

    def add(self, name: str, rule: str) -> str:
        self.rules[name] = rule
        return name

    def text(self) -> str:
        return "\n".join(f"{name} ::= {rule}" for name, rule in self.rules.items()) + "\n" + self.converter.format_grammar()


def _calls_rules(builder: GrammarBuilder, tools: list[ToolSpec], parallel: bool) -> str:
    """Adds `tc-call` (one call object) and `tc-more` (what follows a call); returns the block rule."""
    alternatives = []
    for i, tool in enumerate(tools):
        args = builder.schema_rule(tool.parameters, f"tc{i}-args", f"tool '{tool.name}' parameters", object_only=True)
        alternatives.append(f"{gbnf_literal(call_prefix(tool.name))} {args} \"}}\"")
    builder.add("tc-call", " | ".join(alternatives))
    # Newlines optional: a model's token may glue "<tool_call>" to the "{" that follows.
    builder.add("tc-body", f'"\\n"? tc-call "\\n"? {gbnf_literal(CALL_CLOSE)} tc-more')
    builder.add("tc-more", f'("\\n" {gbnf_literal(CALL_OPEN)} tc-body)?' if parallel else '""')
    return "tc-body"


def build_grammar(
    tools: list[ToolSpec],
    mode: str,
    parallel: bool,
    answer_schema: dict | None,
    answer_strict: bool = False,
    fmt: "ToolFormat | None" = None,
) -> str | None:
    """The GBNF for a request, or None when the output is free text.

    mode "required": only tool calls. mode "auto": a lazy grammar (llamad.grammar.constraint):
    free text until `<tool_call>`, from there only calls; or, when `answer_schema` is set,
    the JSON answer or calls. `fmt`: the family's call format (llamad.tools.formats;
    llamad.tools.family_grammar), Hermes when None. With no
    tools (or mode "none") and an `answer_schema`: only the JSON answer.
    """
    from llamad.tools.family_grammar import calls_rule, reasoning_first

    builder = GrammarBuilder()
    # A required call may follow the reasoning a thinking model writes first (Qwen3's
    # `<think>`); under "auto" the grammar is lazy, so the reasoning is free text anyway.
    first = reasoning_first(builder, fmt) if tools and mode == "required" else ""
    if fmt is not None and fmt.name != "hermes" and tools and mode in ("required", "auto"):
        block = calls_rule(builder, tools, parallel, fmt, required=mode == "required")
        if mode == "auto" and answer_schema is not None:
            answer = builder.schema_rule(answer_schema, "answer", "response_format schema", answer_strict)
            builder.add("root", f"{answer} | {block}")
            return builder.text()
        builder.add("root", f"{first}{block}")
        return builder.text() if mode == "required" else lazy(builder.text(), fmt.trigger)
    if tools and mode == "required":
        body = _calls_rules(builder, tools, parallel)
        builder.add("root", f"{first}{gbnf_literal(CALL_OPEN)} {body}")
        # rules are emitted in insertion order; llama.cpp finds root by name
        return builder.text()
    if tools and mode == "auto":
        body = _calls_rules(builder, tools, parallel)
        if answer_schema is not None:
            answer = builder.schema_rule(answer_schema, "answer", "response_format schema", answer_strict)
            builder.add("root", f"{answer} | {gbnf_literal(CALL_OPEN)} {body}")
            return builder.text()
        builder.add("root", f"{gbnf_literal(CALL_OPEN)} {body}")
        return lazy(builder.text(), CALL_OPEN)
    if answer_schema is not None:
        answer = builder.schema_rule(answer_schema, "answer", "response_format schema", answer_strict)
        builder.add("root", answer)
        return builder.text()
    return None

