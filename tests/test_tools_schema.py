"""No valid tool schema is refused: every JSON Schema keyword gives a grammar llama.cpp
compiles, each keyword is enforced or loosened as the table in llamad.tools.grammar says,
and what the grammar lets through is valid JSON that satisfies every enforced keyword.

llama.cpp itself decides: `check_grammar` compiles each grammar, and its grammar sampler
checks texts byte by byte over the byte tokens of a tiny GGUF vocabulary
(tests/tiny_gguf.py, loaded vocabulary-only), so this runs without the demo model.
"""

from __future__ import annotations

import ctypes
import json
import math
import random
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gbnf_walk import Walker
from llamad.engine.chat import ToolSpec
from llamad.tools.plan import ToolChoice, ToolSchemaError, plan
from llamad.grammar.constraint import check_grammar
from llamad.grammar.schema import normalise
from tiny_gguf import write_tiny_llama

CAPTURES = Path(__file__).parent / "data" / "captures"


class ByteVocab:
    """llama.cpp's grammar sampler over the 256 byte tokens of the tiny vocabulary."""

    FIRST_BYTE_TOKEN = 3  # tiny_gguf: <unk>, <s>, </s>, then <0x00>..<0xFF>

    def __init__(self, path: Path):
        import llama_cpp

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)

    def _allowed(self, sampler, token: int) -> bool:
        data = (self.ll.llama_token_data * 1)()
        data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
        candidates = self.ll.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
        self.ll.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def accepts(self, grammar: str, text: str) -> bool:
        """True when the grammar allows `text`, byte by byte, and then the end."""
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not compile"
        try:
            for byte in text.encode():
                token = self.FIRST_BYTE_TOKEN + byte
                if not self._allowed(sampler, token):
                    return False
                self.ll.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            self.ll.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> ByteVocab:
    path = write_tiny_llama(tmp_path_factory.mktemp("vocab") / "tiny.gguf", n_embd=64, n_layer=1, n_head=1, n_ff=64)
    return ByteVocab(path)


def call_text(arguments) -> str:
    return '<tool_call>\n{"name": "t", "arguments": ' + json.dumps(arguments, ensure_ascii=False) + "}\n</tool_call>"


def grammar_of(parameters, *more: ToolSpec) -> str:
    grammar = plan([ToolSpec("t", "", parameters), *more], ToolChoice("required", "t"), parallel=False).grammar
    assert grammar is not None
    return grammar


def prop(schema, required=True) -> dict:
    """A tool whose one argument `x` has `schema`."""
    return {"type": "object", "properties": {"x": schema}, **({"required": ["x"]} if required else {})}


ANY_VALUES = [1, -2.5, "s", "quo\"te\\", None, True, [1, {"a": None}], {"k": [True]}]
TREE = {
    "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                       "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["v"]}},
    "type": "object", "properties": {"x": {"$ref": "#/$defs/node"}}, "required": ["x"],
}  # fmt: skip

# (case, parameters, arguments the grammar must allow, arguments it must refuse, loosened keywords)
CASES = [
    ("empty schema", prop({}), ANY_VALUES, [], []),
    ("true", prop(True), ANY_VALUES, [], []),
    ("description only (Claude Code's Workflow.args)", prop({"description": "Optional input value"}), ANY_VALUES, [], []),
    ("title, default, examples", prop({"title": "X", "default": 3, "examples": [1]}), ANY_VALUES, [], []),
    ("annotations", {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:t", "$comment": "c",
                     "type": "object", "properties": {"x": {"type": "integer", "deprecated": True, "readOnly": True,
                                                            "writeOnly": False, "x-vendor": 1}},
                     "required": ["x"]}, [3], ["3"], []),
    ("parameters {}", {}, None, [], []),
    ("$ref to $defs", {"$defs": {"n": {"type": "integer"}}, **prop({"$ref": "#/$defs/n"})}, [7], ["7"], []),
    ("$ref to definitions (draft-07)", {"definitions": {"n": {"type": "string"}}, **prop({"$ref": "#/definitions/n"})},
     ["a"], [7], []),
    ("$ref with siblings (2020-12)", {"$defs": {"s": {"type": "string"}}, **prop({"$ref": "#/$defs/s", "maxLength": 2})},
     ["ab"], ["abc", 1], []),
    ("$ref by $anchor and pointer escapes", {"$defs": {"a/b": {"$anchor": "here", "type": "boolean"}},
                                             **prop({"anyOf": [{"$ref": "#here"}, {"$ref": "#/$defs/a~1b"}]})},
     [True], [1], []),
    ("recursive $ref", TREE, [{"v": 1}, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}], [{"v": 1, "kids": [{}]}], []),
    ("recursive to the root", {"type": "object", "properties": {"x": {"type": "integer"}, "more": {"$ref": "#"}}},
     None, [], []),
    ("remote $ref", prop({"$ref": "https://example.com/s.json"}), ANY_VALUES, [], ["properties.x.$ref"]),
    ("type list", prop({"type": ["string", "null"], "maxLength": 3}), ["abc", None], ["abcd", 1], []),
    ("const with JSON escapes", prop({"const": "a\"b\\c\fd\né"}), ["a\"b\\c\fd\né"], ["abcd"], []),
    ("enum of mixed types", prop({"enum": ["a", 1, None, True, {"k": [1]}, 2.5]}), ["a", 1, None, True, {"k": [1]}, 2.5],
     ["b", 2, False], []),
    ("enum filtered by its type", prop({"type": "string", "enum": ["a", 1]}), ["a"], [1], []),
    ("anyOf", prop({"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "string"}}]}), [1, ["a"]],
     ["a", [1]], []),
    ("anyOf with sibling keywords", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                     "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, None, [], []),
    ("oneOf", prop({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}), [1, False], ["1"], ["properties.x.oneOf"]),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, None, [], []),
    ("allOf of strings", prop({"allOf": [{"type": "string", "minLength": 2}, {"maxLength": 3}]}), ["ab", "abc"],
     ["a", "abcd"], []),
    ("additionalProperties false", prop({"type": "object", "properties": {"a": {"type": "integer"}},
                                         "additionalProperties": False}), [{"a": 1}, {}], [{"a": 1, "b": 2}], []),
    ("additionalProperties schema", prop({"type": "object", "additionalProperties": {"type": "integer"}}),
     [{"p": 1, "q": 2}, {}], [{"p": "1"}], []),
    ("additionalProperties true", prop({"type": "object", "properties": {"a": {"type": "integer"}},
                                        "additionalProperties": True}), [{"a": 1, "z": [None]}], [{"a": "1"}], []),
    ("pattern", prop({"type": "string", "pattern": "^wf_[a-z0-9-]{6,}$"}), ["wf_abc-12"], ["wf_abc", "xwf_abcdefg"], []),
    ("unanchored pattern", prop({"type": "string", "pattern": "\\d{2}"}), ["a12b", "99"], ["a1b2"], []),
    ("pattern with quotes and any character", prop({"type": "string", "pattern": '^"[^"]*"$'}), ['"hi\\n"', '""'],
     ['"a"b"'], []),
    ("pattern the grammar cannot say", prop({"type": "string", "pattern": "^(?!x)\\w+$"}), ["abc", "yx"], [1],
     ["properties.x.pattern"]),
    ("format date", prop({"type": "string", "format": "date"}), ["2024-02-29"], ["29.02.2024"], []),
    ("format date-time", prop({"type": "string", "format": "date-time"}), ["2024-02-29T10:00:00Z"], ["now"], []),
    ("format uuid", prop({"type": "string", "format": "uuid"}), ["123e4567-e89b-12d3-a456-426614174000"], ["x"], []),
    ("format email", prop({"type": "string", "format": "email"}), ["a@b.c", "no"], [1], ["properties.x.format"]),
    ("minLength and maxLength", prop({"type": "string", "minLength": 2, "maxLength": 3}), ["ab", "a\"c"], ["a", "abcd"], []),
    ("maxLength past 1000 (Claude Code's Workflow.script)", prop({"type": "string", "maxLength": 524288}), ["x" * 1200],
     [1], ["properties.x.maxLength"]),
    ("minItems and maxItems", prop({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}),
     [[1], [1, 2]], [[], [1, 2, 3], ["a"]], []),
    ("prefixItems", prop({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}), [["a", 1]],
     [[1, "a"]], []),
    ("draft-07 tuple items", {"$schema": "http://json-schema.org/draft-07/schema#",
                              **prop({"type": "array", "items": [{"type": "boolean"}], "additionalItems": False})},
     [[True]], [[1]], []),
    ("numbers with bounds", prop({"type": "integer", "minimum": 0, "maximum": 9, "exclusiveMinimum": -1,
                                  "exclusiveMaximum": 10, "multipleOf": 3}), [0, 9], ["3", 1.5, -3],
     ["properties.x.maximum", "properties.x.exclusiveMaximum", "properties.x.multipleOf"]),
    ("positive integer (Claude Code's Read.limit)", prop({"type": "integer", "exclusiveMinimum": 0}), [1, 20],
     [0, -1, "1", 1.5], []),
    ("non-negative number", prop({"type": "number", "minimum": 0}), [0, 2.5, 1e-3], [-1, -0.5], []),
    ("bounds the grammar cannot say", prop({"type": "number", "minimum": 2, "exclusiveMinimum": 0}), [2.5], ["2"],
     ["properties.x.minimum", "properties.x.exclusiveMinimum"]),
    ("allOf keeps a lower bound", prop({"allOf": [{"type": "number", "minimum": 0}, {"type": "integer"}]}), [0, 7],
     [-1, 0.5], []),
    ("patternProperties", prop({"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                                "additionalProperties": {"type": "string"}}), [{"n_a": 1, "b": "c"}], [{"b": None}],
     ["properties.x.patternProperties"]),
    ("propertyNames, min/maxProperties, dependentRequired",
     prop({"type": "object", "propertyNames": {"maxLength": 3}, "minProperties": 1, "maxProperties": 2,
           "dependentRequired": {"a": ["b"]}}), [{"a": 1, "b": 2}], [[]],
     ["properties.x.propertyNames", "properties.x.minProperties", "properties.x.maxProperties",
      "properties.x.dependentRequired"]),
    ("not, if/then/else", prop({"type": "integer", "not": {"const": 3}, "if": {"minimum": 0}, "then": {"maximum": 5},
                                "else": {"minimum": -5}}), [1], ["1"],
     ["properties.x.not", "properties.x.if", "properties.x.then", "properties.x.else"]),
    ("uniqueItems and contains", prop({"type": "array", "uniqueItems": True, "contains": {"type": "integer"}}),
     [[1, 2]], [{}], ["properties.x.contains", "properties.x.uniqueItems"]),
    ("false property", {"type": "object", "properties": {"a": False, "b": {"type": "integer"}}}, [{"b": 1}],
     [{"a": 1}], []),
    ("items false", prop({"type": "array", "items": False}), [[]], [[1]], []),
    ("property names with quotes", {"type": "object", "properties": {"we\"ird\\key": {"type": "integer"}},
                                    "required": ["we\"ird\\key"]}, None, [], []),
    ("deep nesting", None, None, [], ["(nesting)"]),
]


def _deep(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    return schema


CASES[-1] = ("deep nesting", _deep(60), None, [], [".".join(["properties.x"] * 41) + ".(nesting)"])


def _arguments(parameters, given):
    """The argument objects a case tries: `given` are values of x, or whole objects."""
    if given is None:
        return []
    if parameters.get("properties", {}).keys() == {"x"} and "x" in parameters.get("required", []):
        return [{"x": value} for value in given]
    return given


def _check_example(arguments, parameters) -> None:
    """The example itself is right (where jsonschema can tell: it fetches no remote $ref)."""
    try:
        jsonschema.validate(arguments, parameters)
    except jsonschema.ValidationError:
        raise
    except Exception as exc:  # noqa: BLE001
        assert "Unresolvable" in str(exc), exc


@pytest.mark.parametrize("case,parameters,good,bad,loosened", CASES, ids=[c[0] for c in CASES])
def test_every_keyword_gives_a_grammar_llama_cpp_compiles(vocab, case, parameters, good, bad, loosened):
    assert normalise(parameters, object_only=True).loosened == loosened
    grammar = grammar_of(parameters)
    check_grammar(vocab.vocab, grammar)  # raises if llama.cpp cannot compile it
    for arguments in _arguments(parameters, good):
        _check_example(arguments, parameters)
        assert vocab.accepts(grammar, call_text(arguments)), arguments
    for arguments in _arguments(parameters, bad):
        assert not vocab.accepts(grammar, call_text(arguments)), arguments


def test_a_generated_call_of_each_case_validates(vocab):
    """Random walks through each case's grammar: llama.cpp allows them, and the arguments
    satisfy the enforced keywords (the normalised schema; the client's own when nothing
    was loosened)."""
    rng = random.Random(7)
    for case, parameters, *_ in CASES:
        normalised = normalise(parameters, object_only=True)
        grammar = grammar_of(parameters)
        walker = Walker(grammar, rng)
        for _ in range(5):
            text = walker.text()
            assert vocab.accepts(grammar, text), (case, text)
            arguments = _arguments_of(text)
            jsonschema.validate(arguments, normalised.schema)
            if not normalised.loosened:
                jsonschema.validate(arguments, parameters)


def _arguments_of(text: str):
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>"), text
    call = json.loads(text[len("<tool_call>") : -len("</tool_call>")])  # valid JSON, always
    assert list(call) == ["name", "arguments"]
    return call["arguments"]


def test_two_tools_with_same_named_definitions_keep_their_own(vocab):
    first = {"$defs": {"item": {"type": "integer"}}, **prop({"$ref": "#/$defs/item"})}
    second = ToolSpec("u", "", {"$defs": {"item": {"type": "string"}}, **prop({"$ref": "#/$defs/item"})})
    grammar = plan([ToolSpec("t", "", first), second], ToolChoice("required"), parallel=False).grammar
    check_grammar(vocab.vocab, grammar)
    assert vocab.accepts(grammar, call_text({"x": 1}))
    assert not vocab.accepts(grammar, call_text({"x": "a"}))
    assert vocab.accepts(grammar, call_text({"x": "a"}).replace('"t"', '"u"'))
    assert not vocab.accepts(grammar, call_text({"x": 1}).replace('"t"', '"u"'))


def test_arguments_are_an_object_whatever_the_schema_says(vocab):
    for parameters in ({}, {"description": "any"}, {"type": "string"}, {"anyOf": [{"type": "null"}, {"type": "object"}]}):
        grammar = grammar_of(parameters)
        assert vocab.accepts(grammar, call_text({"a": 1})), parameters
        assert not vocab.accepts(grammar, call_text("text")), parameters


@pytest.mark.parametrize(
    "schema,strict_error",
    [
        ({"type": "object", "properties": {"a": {"description": "anything"}}}, None),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$"}}}, None),
        ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "null"}]}}}, "properties.a.oneOf"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "email"}}}, "properties.a.format"),
    ],
)
def test_strict_refuses_only_what_the_grammar_would_loosen(schema, strict_error):
    response_format = {"type": "json_schema", "schema": schema, "strict": True}
    if strict_error is None:
        assert plan([], ToolChoice("none"), response_format=response_format).grammar
        return
    with pytest.raises(ToolSchemaError, match=f"response_format schema.{strict_error}: this keyword cannot be enforced"):
        plan([], ToolChoice("none"), response_format=response_format)
    assert plan([], ToolChoice("none"), response_format={**response_format, "strict": False}).grammar


# -- the corpus: the tool lists real agents send ---------------------------------------------
def captured_tools() -> list[tuple[str, list[ToolSpec]]]:
    """(capture, tools) for each captured request; Responses `namespace` tools hold functions."""
    found = []
    for path in sorted(CAPTURES.glob("*/*.json")):
        body = json.loads(path.read_text())["body"]
        tools = []
        for tool in body.get("tools") or []:
            for function in tool.get("tools") or [tool]:
                function = function.get("function", function)  # chat completions nest it
                schema = function.get("input_schema", function.get("parameters"))
                if isinstance(schema, dict) and function.get("name"):
                    tools.append(ToolSpec(function["name"], function.get("description", ""), schema))
        found.append((f"{path.parent.name}/{path.name}", tools))
    return found


def test_the_captures_hold_both_agents_tool_lists():
    names = {capture.split("/")[0]: {t.name for t in tools} for capture, tools in captured_tools()}
    assert {"Workflow", "Bash", "Read"} <= names.get("claude_code", set())
    assert {"exec_command", "close_agent"} <= names.get("codex", set())


@pytest.mark.parametrize("capture,tools", captured_tools(), ids=[c for c, _ in captured_tools()])
def test_every_captured_tool_list_gives_a_grammar(vocab, capture, tools):
    rng = random.Random(capture)
    assert tools
    for mode in ("required", "auto"):
        grammar = plan(tools, ToolChoice(mode)).grammar
        check_grammar(vocab.vocab, grammar)
    for tool in tools:  # and each tool alone: its calls validate against its schema
        normalised = normalise(tool.parameters, object_only=True)
        grammar = plan([tool], ToolChoice("required"), parallel=False).grammar
        walker = Walker(grammar, rng)
        for _ in range(3):
            text = walker.text()
            assert vocab.accepts(grammar, text), (tool.name, text)
            assert text.startswith(f'<tool_call>{{"name": {json.dumps(tool.name)}') or text.startswith(
                f'<tool_call>\n{{"name": {json.dumps(tool.name)}'
            )
            jsonschema.validate(_arguments_of(text), normalised.schema)


# -- the generator: random schemas over the keyword list ------------------------------------
NAMES = ["a", "b_c", "d-e", "we\"ird", "é"]
PATTERNS = ["^[a-z]+$", "^\\d{3}-\\d{2}$", "ab", "^(foo|bar)", "[^\"\\\\]$", "^\\w*$", "^.{2,5}$", "(?=x)y",
            "^a|b$", "\\s", "^[^\\d\\s]+$"]  # fmt: skip
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(alphabet="ab\"\\\né", max_size=3))


def _leaves():
    return st.one_of(
        st.sampled_from([{}, True, False, {"description": "any"}, {"title": "t", "default": None},
                         {"$comment": "c", "deprecated": True}]),
        st.sampled_from(["null", "boolean", "integer", "number", "string", "object", "array"]).map(lambda t: {"type": t}),
        st.lists(st.sampled_from(["null", "integer", "string", "array"]), min_size=1, max_size=3, unique=True)
        .map(lambda ts: {"type": ts}),
        SCALARS.map(lambda v: {"const": v}),
        st.lists(SCALARS, min_size=1, max_size=4).map(lambda vs: {"enum": vs}),
        st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
                  st.integers(0, 3), st.integers(0, 3)),
        st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
        st.sampled_from(["date", "time", "date-time", "uuid", "email", "uri"]).map(lambda f: {"type": "string", "format": f}),
        st.fixed_dictionaries({}, optional={"minimum": st.integers(-3, 3), "maximum": st.integers(4, 9),
                                            "exclusiveMinimum": st.integers(-9, -4), "multipleOf": st.integers(1, 3)})
        .map(lambda d: {"type": "integer", **d}),
        st.sampled_from([{"$ref": "#/$defs/leaf"}, {"$ref": "#/$defs/list"}, {"$ref": "#/definitions/old"},
                         {"$ref": "#"}, {"$ref": "#/$defs/leaf", "minLength": 2}]),
    )


def _extend(children):
    objects = st.builds(
        lambda props, required, extra, more: {"type": "object", "properties": props,
                                              "required": [n for n in required if n in props], **extra, **more},
        st.dictionaries(st.sampled_from(NAMES), children, max_size=3),
        st.lists(st.sampled_from(NAMES), max_size=3, unique=True),
        st.one_of(st.just({}), st.booleans().map(lambda b: {"additionalProperties": b}),
                  children.map(lambda c: {"additionalProperties": c})),
        st.fixed_dictionaries({}, optional={
            "patternProperties": st.dictionaries(st.sampled_from(["^x", "y$"]), children, max_size=1),
            "propertyNames": st.just({"maxLength": 4}), "minProperties": st.integers(0, 2),
            "maxProperties": st.integers(2, 4), "dependentRequired": st.just({"a": ["b_c"]})}),
    )
    arrays = st.builds(
        lambda items, lo, extra, more: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra, **more},
        children, st.integers(0, 2), st.integers(0, 2),
        st.fixed_dictionaries({}, optional={"uniqueItems": st.booleans(), "contains": children,
                                            "prefixItems": st.lists(children, min_size=1, max_size=2)}),
    )
    combined = st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda cs: {"anyOf": cs}),
        st.lists(children, min_size=1, max_size=3).map(lambda cs: {"oneOf": cs}),
        st.lists(children, min_size=1, max_size=3).map(lambda cs: {"allOf": cs}),
        st.builds(lambda c, d: {**c, "not": d} if isinstance(c, dict) else c, children, children),
        st.builds(lambda i, t, e: {"if": i, "then": t, "else": e}, children, children, children),
        st.builds(lambda cs, base: {"anyOf": cs, "type": "object", "properties": {"a": base}},
                  st.lists(children, min_size=1, max_size=2), children),
        st.builds(lambda c: {"type": ["object", "null"], "properties": {"a": c}, "required": ["a"]}, children),
    )
    return st.one_of(objects, arrays, combined)


SCHEMAS = st.recursive(_leaves(), _extend, max_leaves=8)
DEFS = {
    "leaf": {"type": "string", "maxLength": 4},
    "list": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/list"},
                                                                                            {"type": "null"}]}},
             "required": ["v"]},
}  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=SCHEMAS, seed=st.integers(0, 2**32 - 1))
def test_generated_schemas_give_grammars_whose_calls_validate(vocab, body, seed):
    parameters = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                  "properties": {"p": body}, "required": ["p"], "$defs": DEFS, "definitions": {"old": {"type": "boolean"}}}
    jsonschema.Draft202012Validator.check_schema(parameters)  # the generator writes only valid schemas
    normalised = normalise(parameters, object_only=True)
    grammar = grammar_of(parameters)
    check_grammar(vocab.vocab, grammar)
    walker = Walker(grammar, random.Random(seed))
    for _ in range(4):
        text = walker.text()
        assert vocab.accepts(grammar, text), text
        arguments = _arguments_of(text)
        jsonschema.validate(arguments, normalised.schema)
        if not normalised.loosened:
            jsonschema.validate(arguments, parameters)


# -- through the API: what the agents send is served, malformed schemas are a 400 ------------
async def test_claude_codes_captured_first_request_is_served(make_client):
    """The request that failed with `400 tool 'Workflow' parameters: cannot be turned into a
    grammar`, replayed as captured (fake engine; the grammar is built and kept)."""
    from fake_engine import FakeEngine, pieces

    body = json.loads((CAPTURES / "claude_code" / "01_post_v1_messages.json").read_text())["body"]
    engine = FakeEngine(script=lambda generation: pieces("OK", 2), n_ctx=32768)  # 4096 cannot hold it
    async with make_client(engine) as client:
        response = await client.post("/v1/messages?beta=true", json={**body, "stream": False, "max_tokens": 8,
                                                                     "tool_choice": {"type": "any"}})
    assert response.status_code == 200, response.text
    assert '\\"Workflow\\"' in engine.generations[0].grammar  # its call is one the grammar allows


async def test_a_malformed_schema_is_a_400_naming_the_keyword(make_client):
    tool = {"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "date"}}}}
    async with make_client() as client:
        response = await client.post("/v1/messages", json={
            "model": "llama-local", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], "tools": [tool]})
    assert response.status_code == 400
    assert response.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": (
        "tool 'f' parameters.properties.a.type: unknown type 'date'; "
        "use one of null, boolean, object, array, number, integer, string")}}
