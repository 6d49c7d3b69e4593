"""The Anthropic stream state machine and the /clean filter, without the web stack."""

from __future__ import annotations

import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import given
from hypothesis import strategies as st

from llamad.serve.answer import (
    Finish,
    Keepalive,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from llamad.api.anthropic.stream import CleanText, MessageStream, fold_message

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)


def finish(reason: str = "stop", stop_sequence: str | None = None, completion_tokens: int = 7) -> Finish:
    return Finish(reason=reason, stop_sequence=stop_sequence, usage=Usage(prompt_tokens=11, completion_tokens=completion_tokens))


def run(events) -> list[tuple[str, dict]]:
    machine = MessageStream(model="served-model", input_tokens=11)
    out = machine.start()
    for event in events:
        out += machine.feed(event)
    return out


def assert_well_formed(wire: list[tuple[str, dict]]) -> None:
    """The order strict clients (the TypeScript SDK, Claude Code) enforce."""
    kinds = [kind for kind, _ in wire]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    open_index = None
    next_index = 0
    for kind, payload in wire:
        assert payload["type"] == kind
        if kind != "ping":  # the SDK's union has no ping; it skips them
            STREAM_EVENT.validate_python(payload)
        if kind == "content_block_start":
            assert open_index is None, "a block started while another was open"
            assert payload["index"] == next_index
            open_index = next_index
            next_index += 1
        elif kind == "content_block_delta":
            assert payload["index"] == open_index
        elif kind == "content_block_stop":
            assert payload["index"] == open_index
            open_index = None
        elif kind in ("message_delta", "message_stop"):
            assert open_index is None, "the message ended with a block open"


def test_text_only_reply_has_one_text_block_and_end_turn():
    wire = run([TextDelta("Hello"), TextDelta(" world"), finish()])
    assert_well_formed(wire)
    assert [k for k, _ in wire] == [
        "message_start",
        "ping",  # at once, as Anthropic's own stream has it
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = wire[0][1]["message"]
    assert start["model"] == "served-model" and start["usage"]["input_tokens"] == 11 and start["content"] == []
    assert start["id"].startswith("msg_")
    delta = wire[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 7


def test_thinking_block_comes_first_and_closes_with_one_signature():
    wire = run([ReasoningDelta("let me "), ReasoningDelta("think"), TextDelta("42"), finish()])
    assert_well_formed(wire)
    starts = [p["content_block"]["type"] for k, p in wire if k == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking_deltas = [p["delta"] for k, p in wire if k == "content_block_delta" and p["index"] == 0]
    assert [d["type"] for d in thinking_deltas] == ["thinking_delta", "thinking_delta", "signature_delta"]
    assert thinking_deltas[-1]["signature"]
    message = fold_message(wire)
    assert message["content"][0]["thinking"] == "let me think"
    assert message["content"][1] == {"type": "text", "text": "42"}


def test_tool_calls_become_tool_use_blocks_with_streamed_json():
    wire = run(
        [
            TextDelta("Checking."),
            ToolCallStart(0, "toolu_a", "get_weather"),
            ToolCallDelta(0, '{"city": '),
            ToolCallDelta(0, '"Paris"}'),
            ToolCallEnd(0),
            ToolCallStart(1, "toolu_b", "get_time"),
            ToolCallEnd(1),
            finish("tool_calls"),
        ]
    )
    assert_well_formed(wire)
    starts = [p["content_block"] for k, p in wire if k == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}
    assert starts[2]["input"] == {}
    message = fold_message(wire)
    assert message["stop_reason"] == "tool_use"
    assert message["content"][1]["input"] == {"city": "Paris"}
    assert message["content"][2]["input"] == {}
    Message.model_validate(message)


def test_keepalive_is_a_ping_that_opens_no_block():
    wire = run([Keepalive(), TextDelta("a"), Keepalive(), TextDelta("b"), finish()])
    assert_well_formed(wire)
    assert wire[1] == ("ping", {"type": "ping"})
    assert sum(1 for k, _ in wire if k == "content_block_start") == 1
    assert fold_message(wire)["content"] == [{"type": "text", "text": "ab"}]


@pytest.mark.parametrize(
    ("reason", "stop_sequence", "expected"),
    [("stop", None, "end_turn"), ("length", None, "max_tokens"), ("stop", "END", "stop_sequence"), ("tool_calls", None, "tool_use")],
)
def test_stop_reasons(reason, stop_sequence, expected):
    wire = run([TextDelta("x"), finish(reason, stop_sequence)])
    message = fold_message(wire)
    assert message["stop_reason"] == expected
    assert message["stop_sequence"] == stop_sequence


def test_empty_reply_still_ends_properly():
    wire = run([finish("length", completion_tokens=0)])
    assert_well_formed(wire)
    message = fold_message(wire)
    assert message["content"] == [] and message["usage"]["output_tokens"] == 0
    Message.model_validate(message)


def test_folded_message_validates_as_an_sdk_message():
    wire = run([ReasoningDelta("r"), TextDelta("t"), finish()])
    message = Message.model_validate(fold_message(wire))
    assert message.usage.input_tokens == 11 and message.usage.output_tokens == 7


# -- /clean ------------------------------------------------------------------------------------


def clean(pieces: list[str]) -> str:
    cleaner = CleanText()
    return "".join(cleaner.feed(p) for p in pieces) + cleaner.finish()


def test_clean_removes_template_markers_and_trims():
    assert clean(["  \nHello", " world", "<end_of_turn>", "\n"]) == "Hello world"
    assert clean(["Hi<|im_end|>", " there  "]) == "Hi there"
    assert clean(["a <", "b and c"]) == "a <b and c"
    assert clean(["", "  ", "\n"]) == ""


def test_clean_sends_text_as_it_comes():
    cleaner = CleanText()
    assert cleaner.feed(" Hello") == "Hello"
    assert cleaner.feed(" big") == " big"
    assert cleaner.feed(" world\n") == " world"  # the trailing newline waits
    assert cleaner.feed("<end_of") == ""
    assert cleaner.feed("_turn>") == ""
    assert cleaner.finish() == ""


@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=40))
def test_clean_is_the_same_however_the_text_is_split(cuts):
    text = "\n  The answer<end_of_turn> is <b>42</b> [x]<|im_end|>\n\n"
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(text[position : position + cut])
        position += cut
    pieces.append(text[position:])
    assert clean(pieces) == "The answer is <b>42</b> [x]"
