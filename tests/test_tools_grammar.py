"""Grammars and prompts from `tools.plan`: they compile in llama.cpp, accept exactly the
valid calls, and schemas that cannot be expressed are errors that say where.

Acceptance is checked by llama.cpp's own grammar sampler over the demo model's vocabulary
(loaded vocabulary-only, no weights), token by token, so what passes here is what the real
engine's constrained decoding allows.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.serve.answer import PlainText
from llamad.engine.chat import ToolSpec
from llamad.tools.plan import ToolChoice, ToolSchemaError, plan
from llamad.tools.parse import ToolCallParser
from llamad.grammar.constraint import GrammarConstraint

DEMO = Path.home() / ".cache/llamad/models/gemma-3-270m-q4_k_m.gguf"
MODEL = Path(os.environ.get("LLAMAD_TEST_MODEL") or DEMO)

WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
SEARCH = ToolSpec("search", "Web search", {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}, "required": ["q"]})
NOARGS = ToolSpec("now", "The time", {"type": "object", "properties": {}})


def call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(arguments)}}}\n</tool_call>'


PARIS = call("get_weather", {"city": "Paris", "unit": "c"})
QUERY = call("search", {"q": "llamas", "n": 3})


class GrammarChecker:
    """llama.cpp's grammar sampler over a vocabulary: does a grammar allow a text?"""

    def __init__(self, path: Path):
        import llama_cpp

        self.ll = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"cannot load the vocabulary of {path}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def compiles(self, grammar: str) -> bool:
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        self.ll.llama_sampler_free(sampler)
        return True

    def _tokens(self, text: str) -> list[int]:
        raw = text.encode()
        buffer = (self.ll.llama_token * (len(raw) + 8))()
        n = self.ll.llama_tokenize(self.vocab, raw, len(raw), buffer, len(buffer), False, False)
        return list(buffer[:n])

    def _allowed(self, sampler, token: int) -> bool:
        data = (self.ll.llama_token_data * 1)()
        data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
        candidates = self.ll.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
        self.ll.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def accepts(self, grammar: str, text: str) -> bool:
        """True when `text` followed by end-of-generation is allowed."""
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not compile"
        try:
            for token in self._tokens(text):
                if not self._allowed(sampler, token):
                    return False
                self.ll.llama_sampler_accept(sampler, token)  # only ever an allowed token
            return self._allowed(sampler, self.ll.llama_vocab_eos(self.vocab))
        finally:
            self.ll.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def checker() -> GrammarChecker:
    if not MODEL.is_file():
        pytest.skip("the demo GGUF is not downloaded (make model); its vocabulary checks the grammars")
    return GrammarChecker(MODEL)


def grammar_for(tools, mode="auto", name=None, **kwargs) -> str:
    grammar = plan(tools, ToolChoice(mode, name), **kwargs).grammar
    assert grammar is not None
    return grammar


def test_required_allows_only_valid_calls(checker):
    grammar = grammar_for([WEATHER, SEARCH], "required")
    assert checker.compiles(grammar)
    for good in (PARIS, QUERY, call("get_weather", {"city": "Oslo"}), PARIS + "\n" + QUERY,
                 PARIS.replace("\n", "")):
        assert checker.accepts(grammar, good), good
    for bad in (
        "Sure! " + PARIS,  # text before the call
        call("delete_all", {}),  # not an offered tool
        call("get_weather", {"unit": "c"}),  # required argument missing
        call("get_weather", {"city": "Paris", "unit": "kelvin"}),  # not in the enum
        call("get_weather", {"city": "Paris", "extra": 1}),  # additionalProperties false
        call("search", {"q": "x", "n": "three"}),  # wrong type
        PARIS[:-3],  # unfinished
        "",
    ):
        assert not checker.accepts(grammar, bad), bad


def test_no_parallel_allows_one_call(checker):
    grammar = grammar_for([WEATHER, SEARCH], "required", parallel=False)
    assert checker.accepts(grammar, PARIS)
    assert not checker.accepts(grammar, PARIS + "\n" + QUERY)


def test_named_tool_allows_only_that_tool(checker):
    grammar = grammar_for([WEATHER, SEARCH], "required", name="search")
    assert checker.accepts(grammar, QUERY)
    assert not checker.accepts(grammar, PARIS)


def decode_through(checker: GrammarChecker, grammar: str, text: str, after: str | None = None) -> bool:
    """Runs `text` token by token through GrammarConstraint, as the real engine's decode
    loop does: True if every token stays allowed (and the end, if the grammar is active)."""
    ll = checker.ll
    constraint = GrammarConstraint(checker.vocab, grammar, after=after)
    n_vocab = ll.llama_vocab_n_tokens(checker.vocab)
    buffer = ctypes.create_string_buffer(256)
    try:
        for token in checker._tokens(text) + [ll.llama_vocab_eos(checker.vocab)]:
            scores = np.random.default_rng(token).normal(size=n_vocab).astype(np.float32)
            scores[token] = 10.0  # the model's favourite
            if not np.isfinite(constraint(None, scores)[token]):
                return False
            if token == ll.llama_vocab_eos(checker.vocab):
                return True
            n = ll.llama_token_to_piece(checker.vocab, token, buffer, 256, 0, False)
            constraint.accept(token, buffer.raw[:n].decode("utf-8", "replace"))
        return True
    finally:
        constraint.close()


def test_auto_allows_text_or_calls_and_constrains_a_started_call(checker):
    grammar = grammar_for([WEATHER, SEARCH, NOARGS], "auto")
    assert grammar.startswith("# lazy: <tool_call>\n") and checker.compiles(grammar)
    for good in ("", "The weather is fine.", "a <b> tag, tool_call and <tool_ are text", "Let me look.\n" + PARIS,
                 PARIS + "\n" + QUERY, call("now", {}), "x<tool_call>\n" + PARIS[len("<tool_call>\n"):]):
        assert decode_through(checker, grammar, good), good
    for bad in ("Hm. " + call("delete_all", {}), call("get_weather", {"unit": "c"}), PARIS + "\ntrailing text",
                "Look:<tool_call>\n{\"name\": \"get_weather\", \"arguments\": 5}"):
        assert not decode_through(checker, grammar, bad), bad


def test_constraint_matches_the_grammar(checker):
    grammar = grammar_for([WEATHER], "required")
    assert decode_through(checker, grammar, PARIS)
    assert not decode_through(checker, grammar, "Sure! " + PARIS)
    assert not decode_through(checker, grammar, call("get_weather", {"city": "Paris", "unit": "kelvin"}))


def test_reasoning_is_free_and_the_grammar_starts_after_it(checker):
    required = grammar_for([WEATHER], "required")
    auto = grammar_for([WEATHER], "auto")
    thought = "The user wants weather, so I call get_weather.</think>\n\n"
    assert decode_through(checker, required, thought + PARIS, after="</think>")
    assert decode_through(checker, required, "still thinking, no call yet", after="</think>")
    assert not decode_through(checker, required, thought + "Sure! " + PARIS, after="</think>")
    # in auto mode a <tool_call> written while thinking is just reasoning text
    assert decode_through(checker, auto, "maybe <tool_call> oops</think>\nIt is sunny.", after="</think>")
    assert not decode_through(checker, auto, thought + call("get_weather", {"unit": "c"}), after="</think>")


def test_constraint_searches_the_whole_vocabulary_when_no_favourite_fits(checker):
    constraint = GrammarConstraint(checker.vocab, grammar_for([WEATHER], "required"))
    n_vocab = checker.ll.llama_vocab_n_tokens(checker.vocab)
    favourites = [t for t in range(1000, 1200) if not constraint.allows(t)][:64]
    scores = np.zeros(n_vocab, dtype=np.float32)
    scores[favourites] = 10.0
    out = constraint(None, scores)
    first = checker._tokens(PARIS)[0]
    assert np.isfinite(out[first]) and not np.isfinite(out[favourites]).any()
    assert 0 < np.isfinite(out).sum() < n_vocab / 100
    constraint.close()


def test_response_format_json_schema(checker):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    grammar = plan([], ToolChoice("none"), response_format={"type": "json_schema", "schema": schema}).grammar
    assert checker.accepts(grammar, '{"name": "Ada", "age": 36}')
    assert not checker.accepts(grammar, '{"name": "Ada"}')
    assert not checker.accepts(grammar, "Ada is 36")
    any_object = plan([], ToolChoice("none"), response_format={"type": "json_object"}).grammar
    assert checker.accepts(any_object, '{"anything": [1, {"x": null}]}')
    assert not checker.accepts(any_object, "[1, 2]")


def test_auto_with_response_format_is_the_json_answer_or_a_call(checker):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    grammar = grammar_for([WEATHER], "auto", response_format={"type": "json_schema", "schema": schema})
    assert checker.accepts(grammar, '{"answer": "sunny"}')
    assert checker.accepts(grammar, PARIS)
    assert not checker.accepts(grammar, "sunny")


def test_refs_unions_arrays_and_nested_objects_compile(checker):
    schema = {
        "type": "object",
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"]}},
        "properties": {
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1},
            "label": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "mode": {"const": "fast"},
            "tags": {"type": ["array", "null"], "items": {"type": "string", "maxLength": 8}},
        },
        "required": ["points"],
    }
    grammar = grammar_for([ToolSpec("plot", "", schema)], "required")
    assert checker.accepts(grammar, call("plot", {"points": [{"x": 1, "y": 2.5}], "label": None, "mode": "fast"}))
    assert not checker.accepts(grammar, call("plot", {"points": []}))
    assert not checker.accepts(grammar, call("plot", {"points": [{"x": 1}]}))


@pytest.mark.parametrize(
    "parameters,where",
    [
        ({"type": "object", "properties": {"a": {"type": "date"}}}, "tool 'bad' parameters.properties.a.type"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "parameters.properties.a.$ref: '#/$defs/missing' points nowhere"),
        ({"type": "object", "properties": {"a": {"$ref": "#nowhere"}}}, "properties.a.$ref: '#nowhere' names no $anchor"),
        # shapes the converter crashed on (500s before) or turned into an empty grammar
        ({"type": "object", "properties": [1, 2]}, "parameters.properties: must be an object"),
        ({"type": "object", "properties": "abc"}, "parameters.properties: must be an object"),
        ({"anyOf": 5}, "parameters.anyOf: must be a non-empty array"),
        ({"anyOf": []}, "parameters.anyOf: must be a non-empty array"),
        ({"type": {"a": 1}}, "parameters.type: unknown type"),
        ({"type": "array", "items": {"enum": {}}}, "items.enum: must be an array"),
        ({"type": "object", "properties": {"a": {"minLength": "3"}}}, "properties.a.minLength: must be a non-negative integer"),
        ({"type": "object", "properties": {"a": {"maxItems": -1}}}, "properties.a.maxItems: must be a non-negative integer"),
        ({"type": "object", "properties": {"a": {"items": 3}}}, "properties.a.items: must be a schema"),
        ({"type": "object", "additionalProperties": "no"}, "parameters.additionalProperties: must be a schema"),
        ({"$defs": {"x": {"type": "text"}}, "type": "object"}, "parameters.$defs.x.type: unknown type 'text'"),
        ({"type": "object", "properties": {"a": {"pattern": 5}}}, "properties.a.pattern: must be a string"),
        ({"type": "object", "required": "a"}, "parameters.required: must be an array"),
    ],
)
def test_malformed_schemas_are_errors_that_name_the_keyword(parameters, where):
    with pytest.raises(ToolSchemaError) as error:
        plan([ToolSpec("bad", "", parameters)], ToolChoice("required"))
    assert where in str(error.value)


def test_strict_response_format_refuses_keywords_the_grammar_cannot_enforce():
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}}}
    with pytest.raises(ToolSchemaError, match=r"response_format schema\.properties\.age\.maximum"):
        plan([], ToolChoice("none"), response_format={"type": "json_schema", "schema": schema, "strict": True})
    assert plan([], ToolChoice("none"), response_format={"type": "json_schema", "schema": schema}).grammar


@pytest.mark.parametrize(
    "tools,choice,fragment",
    [
        ([WEATHER], ToolChoice("required", "search"), "not among the offered tools"),
        ([], ToolChoice("required"), "no tools are offered"),
        ([WEATHER, WEATHER], ToolChoice("auto"), "used twice"),
        ([ToolSpec("", "", {})], ToolChoice("auto"), "non-empty name"),
    ],
)
def test_bad_tool_choices_and_tool_lists(tools, choice, fragment):
    with pytest.raises(ToolSchemaError, match=fragment):
        plan(tools, choice)


def test_prompt_lists_the_tools_in_the_documented_format():
    suffix = plan([WEATHER, SEARCH], ToolChoice("required", "search"), parallel=False).system_suffix
    assert "<tools>\n" in suffix and "</tools>" in suffix
    listed = [json.loads(line) for line in suffix.splitlines() if line.startswith('{"type": "function"')]
    assert [t["function"]["name"] for t in listed] == ["get_weather", "search"]
    assert listed[0]["function"]["parameters"] == WEATHER.parameters
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in suffix
    assert "You must call the function search." in suffix and "Call at most one function." in suffix


def test_templates_with_tool_support_get_no_tool_prompt_but_the_same_grammar():
    native = plan([WEATHER], ToolChoice("required"), template_supports_tools=True)
    plain = plan([WEATHER], ToolChoice("required"))
    assert native.system_suffix == "" and native.grammar == plain.grammar


def test_tool_choice_none_is_plain_text():
    none = plan([WEATHER], ToolChoice("none"))
    assert none.grammar is None and none.system_suffix == "" and isinstance(none.parser(), PlainText)
    auto = plan([WEATHER], ToolChoice("auto"))
    assert isinstance(auto.parser(id_prefix="toolu_"), ToolCallParser)


def test_response_format_adds_a_prompt_line():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    suffix = plan([], ToolChoice("none"), response_format={"type": "json_schema", "schema": schema}).system_suffix
    assert "JSON" in suffix and json.dumps(schema) in suffix
    with pytest.raises(ToolSchemaError, match="response_format type"):
        plan([], ToolChoice("none"), response_format={"type": "yaml"})



PROPERTY_KINDS = {
    "string": ({"type": "string"}, st.text(alphabet="abc xyz!?\"\\é", max_size=6)),
    "integer": ({"type": "integer"}, st.integers(-999, 999)),
    "number": ({"type": "number"}, st.floats(-100, 100, allow_nan=False).map(lambda f: round(f, 3))),
    "boolean": ({"type": "boolean"}, st.booleans()),
    "enum": ({"enum": ["red", "green"]}, st.sampled_from(["red", "green"])),
    "list": ({"type": "array", "items": {"type": "integer"}}, st.lists(st.integers(0, 9), max_size=3)),
    "nullable": ({"type": ["string", "null"]}, st.none() | st.just("x")),
}


@st.composite
def schema_and_arguments(draw):
    names = draw(st.lists(st.sampled_from(["a", "b_c", "d1", "e-f", "g"]), min_size=1, max_size=4, unique=True))
    kinds = [draw(st.sampled_from(sorted(PROPERTY_KINDS))) for _ in names]
    required = [n for n in names if draw(st.booleans())]
    schema = {"type": "object", "properties": {n: PROPERTY_KINDS[k][0] for n, k in zip(names, kinds)},
              "required": required}
    present = [n for n in names if n in required or draw(st.booleans())]
    values = {n: draw(PROPERTY_KINDS[k][1]) for n, k in zip(names, kinds) if n in present}
    # the grammar writes required properties first, then the optional ones, in schema order
    order = [n for n in names if n in required] + [n for n in names if n not in required]
    return schema, {n: values[n] for n in order if n in values}


@settings(max_examples=40, deadline=None)
@given(case=schema_and_arguments())
def test_generated_schemas_accept_their_valid_arguments_and_refuse_missing_required(checker, case):
    schema, arguments = case
    grammar = grammar_for([ToolSpec("tool", "", schema)], "required")
    assert checker.accepts(grammar, call("tool", arguments)), (schema, arguments)
    for name in schema["required"]:
        missing = {k: v for k, v in arguments.items() if k != name}
        assert not checker.accepts(grammar, call("tool", missing)), (schema, missing)
