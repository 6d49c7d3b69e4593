"""Tool-call parsing: every format, any chunk borders, cut-off and malformed calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.serve.answer import TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart
from llamad.tools.json_repair import JsonPrefix, close_json
from llamad.tools.parse import ToolCallParser, new_call_id

TOOLS = ["get_weather", "search"]
WEATHER = {"city": "Paris", "unit": "c"}
HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


def parse(chunks: list[str], **kwargs) -> list:
    parser = ToolCallParser(TOOLS, **kwargs)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return events


def summary(events: list) -> tuple[str, list[tuple[str, dict]]]:
    """(text, [(name, arguments)]) and checks the event order of every call."""
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: list[list] = []
    open_index = None
    for event in events:
        if isinstance(event, ToolCallStart):
            assert open_index is None and event.index == len(calls)
            assert event.id.startswith(("call_", "toolu_"))
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


CASES = [
    # (model text, expected text, expected calls)
    (HERMES, "", [("get_weather", WEATHER)]),
    ("Let me check.\n" + HERMES, "Let me check.\n", [("get_weather", WEATHER)]),
    (HERMES + "\n" + HERMES.replace("Paris", "Oslo"), "",
     [("get_weather", WEATHER), ("get_weather", {**WEATHER, "city": "Oslo"})]),
    ('<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>', "", [("search", {"q": "x"})]),
    ('<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}\n</tool_call>', "", [("search", {"q": "x"})]),
    ('<|python_tag|>{"name": "search", "parameters": {"q": "llama"}}', "", [("search", {"q": "llama"})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [("get_weather", WEATHER)]),
    ('  {"name": "search", "arguments": {"q": "a"}}; {"name": "search", "arguments": {"q": "b"}}', "",
     [("search", {"q": "a"}), ("search", {"q": "b"})]),
    ('[TOOL_CALLS][{"name": "search", "arguments": {"q": "x"}, "id": "abc123def"}]', "", [("search", {"q": "x"})]),
    ('[TOOL_CALLS]search[ARGS]{"q": "x"}', "", [("search", {"q": "x"})]),
    ('[{"name": "search", "arguments": {"q": "x"}}]', "", [("search", {"q": "x"})]),
    ("[1] is a footnote, [2] too", "[1] is a footnote, [2] too", []),
    # look-alikes that are not calls to offered tools stay text
    ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    ('{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 36}', []),
    ('The JSON is {"name": "search", "arguments": {}} here.', 'The JSON is {"name": "search", "arguments": {}} here.', []),
    ("a < b and [TOOL_CALLS is not a tag", "a < b and [TOOL_CALLS is not a tag", []),
    ("Hello there", "Hello there", []),
    ("", "", []),
]


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("text,expected_text,expected_calls", CASES)
def test_formats_whole_and_char_by_char(text, expected_text, expected_calls, live):
    for chunks in ([text], list(text)):
        got_text, got_calls = summary(parse(chunks, live=live))
        assert got_calls == expected_calls
        assert got_text == expected_text


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), borders=st.lists(st.integers(0, 400), max_size=12), live=st.booleans())
def test_any_chunk_borders_give_the_same_answer(case, borders, live):
    text, expected_text, expected_calls = case
    assert summary(parse(split_at(text, borders), live=live)) == (expected_text, expected_calls)


def test_malformed_arguments_are_text_unless_the_call_was_already_streamed():
    text = '<tool_call>{"name": "search", "arguments": {"q": tru}}</tool_call>'
    assert summary(parse([text], live=False)) == (text, [])
    # live calls only happen under the grammar; if one still breaks, it is closed as JSON
    got_text, calls = summary(parse([text], live=True))
    assert calls == [("search", {})]  # the member whose value broke is left out, not null


def test_live_call_starts_before_its_arguments_are_complete():
    parser = ToolCallParser(TOOLS, live=True)
    head = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    events = parser.feed(head)
    assert isinstance(events[0], ToolCallStart) and events[0].name == "get_weather"
    assert "".join(e.arguments for e in events if isinstance(e, ToolCallDelta)) == '{"city": "Pa'
    assert not any(isinstance(e, ToolCallEnd) for e in events)


def test_buffered_call_is_held_until_validated():
    parser = ToolCallParser(TOOLS, live=False)
    assert parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa') == []


@pytest.mark.parametrize("cut", range(len(HERMES)))
def test_live_call_cut_off_anywhere_still_has_json_arguments(cut):
    text, calls = summary(parse([HERMES[:cut]], live=True))
    for name, arguments in calls:
        assert name == "get_weather" and isinstance(arguments, dict)
    if calls:
        assert text == ""


@pytest.mark.parametrize("cut", range(len('<tool_call>\n{"name": "get_wea')))
def test_live_call_cut_off_before_its_name_is_dropped(cut):
    """At max_tokens under the grammar, a half-written call head is neither a call nor text."""
    head = '<tool_call>\n{"name": "get_wea'[:cut]
    assert summary(parse([HERMES + "\n" + head], live=True)) == ("", [("get_weather", WEATHER)])
    if head.startswith("<tool_call>"):
        assert summary(parse(["Let me check.\n" + head], live=True)) == ("Let me check.\n", [])


def test_named_tool_prefix_is_not_reported_early():
    """`search` must not start while the name could still become a longer offered name."""
    parser = ToolCallParser(["search", "search_web"], live=True)
    assert parser.feed('<tool_call>\n{"name": "search') == []
    events = parser.feed('_web", "arguments": {}}\n</tool_call>') + parser.finish()
    assert summary(events) == ("", [("search_web", {})])


def test_single_call_only_without_parallel():
    text = '{"name": "search", "arguments": {"q": "a"}}\n{"name": "search", "arguments": {"q": "b"}}'
    got_text, calls = summary(parse([text], parallel=False))
    assert calls == [("search", {"q": "a"})]
    assert "q\": \"b" in got_text


def test_ids_have_the_family_prefix_and_are_unique():
    ids = {new_call_id("call_") for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)
    events = parse([HERMES], id_prefix="toolu_")
    assert events[0].id.startswith("toolu_")


def test_text_after_a_call_is_kept():
    got_text, calls = summary(parse([HERMES + "\nDone."], live=True))
    assert calls == [("get_weather", WEATHER)]
    assert got_text == "Done."


# -- JSON prefixes ----------------------------------------------------------------------
JSON_DOCS = [
    {"city": "Paris", "n": [1, 2.5, -3e2, True, False, None], "nested": {"a": {"b": []}}},
    {"s": 'quote " backslash \\ unicode \u00e9 \u2603 newline \n'},
    {},
    [],
    {"a": [{}, [], "", 0]},
]


@pytest.mark.parametrize("doc", JSON_DOCS)
def test_every_prefix_of_json_closes_into_json(doc):
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    for cut in range(1, len(text) + 1):
        closed = close_json(text[:cut])
        if closed is not None:
            json.loads(closed)
    assert json.loads(close_json(text)) == doc


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=12,
))
@settings(max_examples=80, deadline=None)
def test_json_prefix_scanner_agrees_with_json_module(value):
    text = json.dumps({"v": value})
    scanner = JsonPrefix()
    for i, c in enumerate(text):
        assert scanner.feed(c)
        closer = scanner.closer()
        if closer is not None:
            json.loads(text[: i + 1] + closer)
    assert scanner.done


@pytest.mark.parametrize("cut", ['{"city": "Paris", "u', '{"city": "Paris", "unit"', '{"city": "Paris", "unit": ',
                                 '{"city": "Paris", "unit": tr', '{"city": "Paris",'])
def test_a_member_cut_off_before_its_value_is_dropped(cut):
    assert json.loads(close_json(cut)) == {"city": "Paris"}
    head = '<tool_call>\n{"name": "get_weather", "arguments": '
    assert summary(parse([head + cut], live=True)) == ("", [("get_weather", {"city": "Paris"})])


def test_scanner_rejects_invalid_json():
    for bad in ['{"a" 1}', '{"a": tru}', '{"a": 1,}', "[1 2]", '{"a": "\\x"}']:
        assert close_json(bad) is None, bad
