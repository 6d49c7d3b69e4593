"""Tool formats per family: detection from the published templates (tests/data/templates,
copied from llama.cpp's models/templates), grammar round trips and streamed parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.tools.formats import HARMONY_REASONING, MISTRAL_REASONING, THINK_REASONING, detect

TEMPLATES = Path(__file__).parent / "data" / "templates"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize(
    "name,expected,reasoning",
    [
        ("Qwen-Qwen2.5-7B-Instruct", "hermes", None),
        ("Qwen-Qwen3-0.6B", "hermes", THINK_REASONING),
        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes", None),
        ("Qwen3-Coder", "qwen3-coder", None),
        ("Qwen3.5-4B", "qwen3-coder", THINK_REASONING),
        ("meta-llama-Llama-3.1-8B-Instruct", "llama3", None),
        ("meta-llama-Llama-3.2-3B-Instruct", "llama3", None),
        ("mistralai-Mistral-Nemo-Instruct-2407", "mistral", None),
        ("unsloth-mistral-Devstral-Small-2507", "mistral-args", None),
        ("Mistral-Small-3.2-24B-Instruct-2506", "mistral-args", None),
        ("mistralai-Ministral-3-14B-Reasoning-2512", "mistral-args", MISTRAL_REASONING),
        ("openai-gpt-oss-120b", "harmony", HARMONY_REASONING),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "hermes", THINK_REASONING),
        ("google-gemma-2-2b-it", "hermes", None),
        ("GLM-4.6", "glm", THINK_REASONING),
        ("GLM-4.7-Flash", "glm", THINK_REASONING),
    ],
)
def test_detects_each_published_template(name, expected, reasoning):
    fmt = detect(template(name))
    assert (fmt.name, fmt.reasoning) == (expected, reasoning)


def test_no_template_is_hermes_and_think_comes_from_the_vocabulary():
    assert detect(None).name == "hermes"
    assert detect("", {"<think>", "</think>"}).reasoning == THINK_REASONING
    assert detect("{{ messages }} {{ tools }}").name == "json"


# -- grammars in each family's format, generated calls parsed back ---------------------------

import json  # noqa: E402
import random  # noqa: E402

import jsonschema  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gbnf_walk import Walker  # noqa: E402
from llamad.engine.chat import ToolSpec  # noqa: E402
from llamad.serve.answer import TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart  # noqa: E402
from llamad.tools.formats import FORMATS  # noqa: E402
from llamad.tools.plan import ToolChoice, plan  # noqa: E402
from test_tools_grammar import checker  # noqa: E402,F401  (the llama.cpp grammar sampler fixture)

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
SEARCH = ToolSpec(
    "search",
    "Web search",
    {
        "type": "object",
        "properties": {
            "q": {"type": "string"},
            "n": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
            "exact": {"type": "boolean"},
            "where": {"$ref": "#/$defs/place"},
        },
        "required": ["q"],
        "$defs": {"place": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}},
    },
)
TOOLS = [WEATHER, SEARCH]
SCHEMAS = {t.name: t.parameters for t in TOOLS}
FAMILIES = ["hermes", "qwen3-coder", "glm", "llama3", "mistral", "mistral-args", "harmony", "json"]

# One call to get_weather(city="Paris", unit="c") as each family writes it.
GOLDEN = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
    "qwen3-coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>",
    "glm": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>unit</arg_key>\n<arg_value>c</arg_value>\n</tool_call>",
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}, "id": "a1b2c3d4e"}]',
    "mistral-args": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}',
    "harmony": ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris", "unit": "c"}',
    "json": '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}',
}


def family_plan(name: str, mode: str = "required", parallel: bool = True, tools=TOOLS):
    return plan(tools, ToolChoice(mode), parallel=parallel, template_supports_tools=True, tool_format=FORMATS[name])


def run_parser(planned, chunks: list[str]) -> list:
    parser = planned.parser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def summary(events: list) -> tuple[str, list[tuple[str, dict]]]:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: list[list] = []
    open_index = None
    for event in events:
        if isinstance(event, ToolCallStart):
            assert open_index is None and event.index == len(calls)
            calls.append([event.name, ""])
            open_index = event.index
        elif isinstance(event, ToolCallDelta):
            assert event.index == open_index
            calls[event.index][1] += event.arguments
        elif isinstance(event, ToolCallEnd):
            assert event.index == open_index
            open_index = None
    assert open_index is None, "a call was never ended"
    return text, [(name, json.loads(arguments)) for name, arguments in calls]


def split_at(text: str, borders: list[int]) -> list[str]:
    cuts = sorted({b % (len(text) + 1) for b in borders} | {0, len(text)})
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_call_is_allowed_by_the_family_grammar_and_parses_back(checker, family):
    planned = family_plan(family)
    assert checker.compiles(planned.grammar)
    assert checker.accepts(planned.grammar, GOLDEN[family]), family
    expected = ("", [("get_weather", {"city": "Paris", "unit": "c"})])
    assert summary(run_parser(planned, [GOLDEN[family]])) == expected
    assert summary(run_parser(planned, list(GOLDEN[family]))) == expected
    # another family's shape is not this family's call
    other = GOLDEN["hermes" if family != "hermes" else "qwen3-coder"]
    assert not checker.accepts(planned.grammar, other)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_grammar_refuses_invalid_arguments(checker, family):
    grammar = family_plan(family).grammar
    for bad in ("Paris", "kelvin"):
        text = GOLDEN[family].replace('"unit": "c"', '"unit": "kelvin"').replace("\nc\n", "\nkelvin\n").replace(">c<", ">kelvin<")
        if bad == "Paris":
            text = GOLDEN[family].replace("get_weather", "delete_all")
        assert not checker.accepts(grammar, text), (family, text)


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_walked_from_the_grammar_parse_back_to_schema_valid_arguments(checker, family):
    planned = family_plan(family)
    rng = random.Random(family)
    walker = Walker(planned.grammar, rng, budget=160)
    for _ in range(25):
        text = walker.text()
        assert checker.accepts(planned.grammar, text), text
        cuts = sorted(rng.sample(range(len(text) + 1), min(6, len(text) + 1)))
        for chunks in ([text], split_at(text, cuts)):
            got_text, calls = summary(run_parser(planned, chunks))
            assert calls, text
            for name, arguments in calls:
                jsonschema.validate(arguments, SCHEMAS[name])
            if family != "harmony":  # harmony's analysis message is split off before the parser
                assert got_text.strip() == "", text


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_grammar_is_lazy_on_the_family_trigger(family):
    grammar = family_plan(family, "auto").grammar
    if family == "hermes":
        assert grammar.startswith("# lazy: <tool_call>")
    else:
        assert grammar.startswith("# lazy: ")
        assert GOLDEN[family].find(FORMATS[family].trigger) >= 0


PARSE_CASES = [
    # (family, text, expected text, expected calls)
    ("qwen3-coder", "Let me look.\n" + GOLDEN["qwen3-coder"], "Let me look.\n", [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("qwen3-coder", GOLDEN["qwen3-coder"] + "\n" + GOLDEN["qwen3-coder"].replace("Paris", "Oslo"), "",
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("qwen3-coder", "<tool_call>\n<function=search>\n<parameter=q>\nline one\n<b>two</b>?\n</parameter>\n"
     "<parameter=n>\n3\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n</function>\n</tool_call>", "",
     [("search", {"q": "line one\n<b>two</b>?", "n": 3, "tags": ["a", "b"]})]),
    ("qwen3-coder", "<function=search>\n<parameter=q>\n42\n</parameter>\n</function>", "", [("search", {"q": "42"})]),
    ("qwen3-coder", "<function=search>\n<parameter=q>\nx\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n</function>", "",
     [("search", {"q": "x", "exact": True})]),
    ("qwen3-coder", "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>", []),
    ("qwen3-coder", "a < b </function> <parameter=x>", "a < b </function> <parameter=x>", []),
    # GLM 4.7 writes no newlines; GLM 4.6 does
    ("glm", "Let me look.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", "Let me look.",
     [("get_weather", {"city": "Paris"})]),
    ("glm", GOLDEN["glm"] + "\n" + GOLDEN["glm"].replace("Paris", "Oslo"), "",
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("glm", "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>\nline one\n<b>two</b> 42 </arg_value>\n<arg_key>n</arg_key>\n"
     "<arg_value>3</arg_value>\n<arg_key>tags</arg_key>\n<arg_value>[\"a\", \"b\"]</arg_value>\n<arg_key>exact</arg_key>\n"
     "<arg_value>true</arg_value>\n</tool_call>", "",
     [("search", {"q": "\nline one\n<b>two</b> 42 ", "n": 3, "tags": ["a", "b"], "exact": True})]),
    ("glm", "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>42</arg_value>\n</tool_call>", "", [("search", {"q": "42"})]),
    ("glm", "<tool_call>search\n</tool_call>", "", [("search", {})]),
    ("glm", "<tool_call>rm_rf\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
     "<tool_call>rm_rf\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>", []),
    ("glm", GOLDEN["hermes"], GOLDEN["hermes"], []),  # a Hermes JSON call is not a GLM call
    ("glm", "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>x</arg_value>\nthen some words",
     "then some words", [("search", {"q": "x"})]),
    ("glm", "x <tool_call> y", "x <tool_call> y", []),
    ("glm", "a <tool_call is not </tool_call> <arg_key>", "a <tool_call is not </tool_call> <arg_key>", []),
    ("harmony", '<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"q": "x"}', "", [("search", {"q": "x"})]),
    ("harmony", '<|start|>assistant<|channel|>final<|message|>Hello there.', "Hello there.", []),
    ("harmony", '<|channel|>final<|message|>It is 5°.<|return|>', "It is 5°.", []),
    ("harmony", ' to=functions.rm<|channel|>commentary json<|message|>{"a": 1}', '{"a": 1}', []),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"q": "llama"}}', "", [("search", {"q": "llama"})]),
    ("mistral-args", GOLDEN["mistral-args"] + '[TOOL_CALLS]search[ARGS]{"q": "x"}', "",
     [("get_weather", {"city": "Paris", "unit": "c"}), ("search", {"q": "x"})]),
    ("mistral", '[{"name": "search", "arguments": {"q": "x"}, "id": "abcdefghi"}]', "", [("search", {"q": "x"})]),
]


@pytest.mark.parametrize("family,text,expected_text,expected_calls", PARSE_CASES)
def test_family_parsers_whole_and_char_by_char(family, text, expected_text, expected_calls):
    planned = family_plan(family, "auto")
    for chunks in ([text], list(text)):
        assert summary(run_parser(planned, chunks)) == (expected_text, expected_calls), chunks


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(PARSE_CASES), borders=st.lists(st.integers(0, 400), max_size=12))
def test_family_parsers_any_chunk_borders(case, borders):
    family, text, expected_text, expected_calls = case
    planned = family_plan(family, "auto")
    assert summary(run_parser(planned, split_at(text, borders))) == (expected_text, expected_calls)


@pytest.mark.parametrize("family,cut", [("qwen3-coder", c) for c in range(11, len(GOLDEN["qwen3-coder"]), 5)]
                         + [("glm", c) for c in range(12, len(GOLDEN["glm"]), 4)])
def test_xml_call_cut_off_anywhere_has_json_arguments(family, cut):
    planned = family_plan(family)
    text, calls = summary(run_parser(planned, [GOLDEN[family][:cut]]))
    assert text == ""
    for name, arguments in calls:
        assert name == "get_weather" and set(arguments) <= {"city", "unit"}


def two_calls(family: str) -> str:
    one = GOLDEN[family]
    if family == "mistral":
        item = one[len("[TOOL_CALLS][") : -1]
        return f"[TOOL_CALLS][{item}, {item.replace('Paris', 'Oslo')}]"
    return one + ("" if family == "mistral-args" else "\n") + one.replace("Paris", "Oslo")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "harmony"])
def test_parallel_calls_only_when_allowed(checker, family):
    text = two_calls(family)
    assert checker.accepts(family_plan(family, parallel=True).grammar, text), text
    assert not checker.accepts(family_plan(family, parallel=False).grammar, text), text
    _, calls = summary(run_parser(family_plan(family, parallel=True), list(text)))
    assert [c[1]["city"] for c in calls] == ["Paris", "Oslo"]


def test_qwen_string_parameters_take_any_text_but_the_closing_tag(checker):
    grammar = family_plan("qwen3-coder").grammar
    def with_q(q: str) -> str:
        return f"<tool_call>\n<function=search>\n<parameter=q>\n{q}\n</parameter>\n</function>\n</tool_call>"
    for good in ("<div>a</div>", "x </param y", "a < b", "</parameters>", "multi\nline\n\ntext"):
        assert checker.accepts(grammar, with_q(good)), good
        assert summary(run_parser(family_plan("qwen3-coder"), list(with_q(good))))[1] == [("search", {"q": good})]
    for bad in ("a</parameter>b", "<</parameter>"):
        assert not checker.accepts(grammar, with_q(bad)), bad


def test_glm_string_arguments_take_any_text_but_the_closing_tag(checker):
    grammar = family_plan("glm").grammar
    def with_q(q: str) -> str:
        return f"<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>{q}</arg_value>\n</tool_call>"
    for good in ("<div>a</div>", "x </arg_val y", "a < b", "</arg_values>", "multi\nline\n\ntext", "</tool_call>"):
        assert checker.accepts(grammar, with_q(good)), good
    for good in ("<div>a</div>", "x </arg_val y", "a < b", "</arg_values>", "multi\nline\n\ntext"):
        assert summary(run_parser(family_plan("glm"), list(with_q(good))))[1] == [("search", {"q": good})]
    for bad in ("a</arg_value>b", "<</arg_value>"):
        assert not checker.accepts(grammar, with_q(bad)), bad


def test_glm_grammar_takes_both_generations_and_only_schema_typed_json(checker):
    grammar = family_plan("glm").grammar
    glm47 = "<tool_call>search<arg_key>q</arg_key><arg_value>x</arg_value><arg_key>n</arg_key><arg_value>2</arg_value></tool_call>"
    assert checker.accepts(grammar, glm47)
    assert checker.accepts(grammar, "\n" + GOLDEN["glm"])  # GLM 4.6 writes a newline after its reasoning
    assert not checker.accepts(grammar, glm47.replace(">2<", ">two<"))  # n is an integer
    assert not checker.accepts(grammar, glm47.replace(">2<", ">0<"))  # ... of at least 1
    assert not checker.accepts(grammar, GOLDEN["glm"].replace("<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n", ""))
    # properties in schema order
    swapped = "<tool_call>search<arg_key>n</arg_key><arg_value>2</arg_value><arg_key>q</arg_key><arg_value>x</arg_value></tool_call>"
    assert not checker.accepts(grammar, swapped)


# -- the family's control tokens reach the parser as text ---------------------------------

from llamad.tools.formats import shown_markers, special_markers  # noqa: E402


def test_markers_asked_of_the_vocabulary_and_shown_per_family():
    vocabulary = {"[TOOL_CALLS]": [7], "[ARGS]": [8], "<think>": [1, 2]}
    found = special_markers(lambda text: vocabulary.get(text, [0, 0, 0]))
    assert found == {"[TOOL_CALLS]", "[ARGS]"}
    assert detect("{{ tools }}", found).name == "json"  # the template decides the format
    assert set(shown_markers(FORMATS["mistral-args"])) == {"[TOOL_CALLS]", "[ARGS]"}
    assert "<|channel|>" in shown_markers(FORMATS["harmony"]) and "<|message|>" in shown_markers(FORMATS["harmony"])
    assert shown_markers(FORMATS["hermes"]) == ()


def test_the_backend_decodes_shown_control_tokens_as_their_text(checker):
    import codecs
    import ctypes
    from types import SimpleNamespace

    from llamad.engine.llama_slots import LlamaSlotsBackend

    ll = checker.ll
    token = next(t for t in range(ll.llama_vocab_n_tokens(checker.vocab)) if ll.llama_vocab_is_control(checker.vocab, t))
    backend = SimpleNamespace(ll=ll, vocab=checker.vocab, _piece=ctypes.create_string_buffer(256), shown_tokens=frozenset())
    sampler = SimpleNamespace(decoder=codecs.getincrementaldecoder("utf-8")(), constraint=None)
    assert LlamaSlotsBackend.accept(backend, sampler, token) == ""  # hidden, as before
    backend.shown_tokens = frozenset({token})
    shown = LlamaSlotsBackend.accept(backend, sampler, token)
    assert shown.startswith("<") and shown.endswith(">")


THINKING = {"hermes": THINK_REASONING, "qwen3-coder": THINK_REASONING, "glm": THINK_REASONING, "mistral-args": MISTRAL_REASONING}


@pytest.mark.parametrize("family", sorted(THINKING))
def test_a_required_call_may_follow_the_reasoning_the_model_opens(checker, family):
    """Qwen3 (Hermes calls), Qwen3-Coder and GLM think in `<think>` before a call, Magistral
    in `[THINK]`: under tool_choice required the grammar lets the model finish its reasoning
    first (before, it had to write the call at once), and still forces the call after it."""
    opening, closing = THINKING[family]
    planned = plan(TOOLS, ToolChoice("required"), template_supports_tools=True, tool_format=FORMATS[family].with_reasoning(THINKING[family]))
    assert checker.compiles(planned.grammar)
    thought = f"{opening}\nThe user wants Paris; x << 2 and a</b> are fine in here.\n{closing}\n\n"
    assert checker.accepts(planned.grammar, thought + GOLDEN[family])
    assert checker.accepts(planned.grammar, GOLDEN[family])  # or no reasoning at all
    assert not checker.accepts(planned.grammar, thought)  # reasoning alone is no call
    assert not checker.accepts(planned.grammar, thought + "It is sunny.")  # nor an answer after it
    assert not checker.accepts(planned.grammar, f"{opening}\nnever closed " + GOLDEN[family])
    assert not checker.accepts(planned.grammar, thought.replace(closing, f"{closing} more {closing}") + GOLDEN[family])
    # A family without reasoning markers still starts with the call.
    assert not checker.accepts(family_plan(family).grammar, thought + GOLDEN[family])


def test_raw_string_values_may_hold_runs_of_the_tags_first_character(checker):
    """`cat <<EOF` in a Qwen3-Coder shell command: a run of `<` before anything but the
    closing tag is text (before, `<` had to be followed by something other than `<` or `/`)."""
    planned = family_plan("qwen3-coder")
    heredoc = GOLDEN["qwen3-coder"].replace("\nParis\n", "\ncat <<EOF\n<</p>\nEOF\n")
    assert checker.accepts(planned.grammar, heredoc)
    assert not checker.accepts(planned.grammar, GOLDEN["qwen3-coder"].replace("\nParis\n", "\nParis</parameter>x\n"))
