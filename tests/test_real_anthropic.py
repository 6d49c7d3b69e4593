"""The official `anthropic` SDK against a real `llamad serve` with the demo model.

The demo model is a 270M base model: its words are poor, so these tests check the
protocol (shapes, order, usage, stop reasons, errors), never the quality of the text.
"""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest
from anthropic.types import Message
from httpx_sse import connect_sse
from test_anthropic import assert_valid_stream
from test_real_load import FEW_TOKENS, NEVER_SHORT, README_DECODE_HANG_UP_S, metric, requests_with_status, slowness, wait_until

pytestmark = pytest.mark.real

ASK = [{"role": "user", "content": "Name three colours."}]
# Recent SDKs no longer take `temperature` as an argument; the server still reads it.
GREEDY = {"temperature": 0}
MARKERS = ("<end_of_turn>", "<start_of_turn>", "<|im_end|>", "<|im_start|>", "<eos>")


@pytest.fixture
def sdk(real_server: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=real_server, auth_token="local", max_retries=0, timeout=120)


def test_create_reports_the_served_model_and_the_counted_input_tokens(sdk):
    message = sdk.messages.create(model="claude-local", max_tokens=8, messages=ASK, extra_body=GREEDY)
    counted = sdk.messages.count_tokens(model="claude-local", messages=ASK)
    assert message.model == "llama-local"
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 8
    # input_tokens is the part not read from the KV cache (another test may have sent ASK).
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == counted.input_tokens > 0


def test_stream_text_matches_the_final_message(sdk):
    with sdk.messages.stream(model="m", max_tokens=10, messages=ASK, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content and final.content[-1].type == "text"
    assert text == final.content[-1].text
    # The demo model may end its turn (the transcript's next-speaker stop) before the cap.
    assert final.stop_reason in ("max_tokens", "end_turn")
    assert final.usage.output_tokens == 10 if final.stop_reason == "max_tokens" else 0 < final.usage.output_tokens <= 10
    whole = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert whole == sdk.messages.count_tokens(model="m", messages=ASK).input_tokens


def test_raw_stream_events_validate_in_order(real_server):
    payload = {"model": "m", "max_tokens": 8, "stream": True, "messages": ASK}
    with httpx.Client(base_url=real_server, timeout=120) as http:
        with connect_sse(http, "POST", "/v1/messages?beta=true", json=payload, headers={"x-api-key": "k"}) as source:
            assert source.response.headers["request-id"]
            events = [(event.event, json.loads(event.data)) for event in source.iter_sse()]
    assert_valid_stream(events)
    assert events[0][1]["message"]["usage"]["input_tokens"] > 0
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("max_tokens", "end_turn")
    # Sampled (no temperature sent): the demo model may end its turn at once (0 tokens) or
    # with its 8th token (the transcript's stop completed by it: end_turn, 8 tokens).
    assert delta["usage"]["output_tokens"] == 8 if delta["delta"]["stop_reason"] == "max_tokens" else 0 <= delta["usage"]["output_tokens"] <= 8


def test_clean_route_gives_trimmed_text_only(sdk):
    message = sdk.post(
        "/v1/messages/clean",
        body={"model": "m", "max_tokens": 24, "temperature": 0, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 1024}},
        cast_to=Message,
    )
    assert [block.type for block in message.content] in ([], ["text"])
    text = message.content[0].text if message.content else ""
    assert text == text.strip()
    assert not any(marker in text for marker in MARKERS)


def test_think_route_puts_any_thinking_before_text(sdk):
    message = sdk.post("/v1/messages/think", body={"model": "m", "max_tokens": 8, "messages": ASK}, cast_to=Message)
    kinds = [block.type for block in message.content]
    assert kinds == sorted(kinds, key=lambda kind: kind != "thinking")
    assert message.usage.output_tokens > 0


def test_stop_sequence_ends_the_reply_and_is_reported(sdk):
    first = sdk.messages.create(model="m", max_tokens=12, messages=ASK, extra_body=GREEDY)
    # Any piece of the greedy answer will do ("(2)" as well as a word).
    words = [w for w in first.content[0].text.split() if w.isalpha()] or first.content[0].text.split()
    if not words:
        pytest.skip(f"the demo model wrote only whitespace: {first.content[0].text!r}")
    stop = words[min(1, len(words) - 1)]
    stopped = sdk.messages.create(model="m", max_tokens=12, messages=ASK, extra_body=GREEDY, stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    text = stopped.content[0].text if stopped.content else ""
    assert stop not in text and first.content[0].text.startswith(text)


def test_too_long_prompt_is_an_invalid_request(sdk):
    long = [{"role": "user", "content": "lorem ipsum dolor " * 3000}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.create(model="m", max_tokens=8, messages=long)
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    counted = sdk.messages.count_tokens(model="m", messages=long).input_tokens
    # Anthropic's own sentence, which Claude Code matches to compact the conversation.
    assert refused.value.body["error"]["message"] == f"prompt is too long: {counted} tokens > 4095 maximum"
    assert counted > 4096


def test_malformed_body_and_missing_max_tokens_are_400s(real_server):
    with httpx.Client(base_url=real_server, timeout=30) as http:
        broken = http.post("/v1/messages", content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"})
        missing = http.post("/v1/messages", json={"model": "m", "messages": ASK})
        wrong = http.post("/v1/messages", json={"model": "m", "max_tokens": "lots", "messages": ASK})
        unknown = http.post("/v1/messages/nothing", json={})
    for response, status, kind in ((broken, 400, "invalid_request_error"), (missing, 400, "invalid_request_error"),
                                   (wrong, 400, "invalid_request_error"), (unknown, 404, "not_found_error")):
        assert response.status_code == status
        assert response.json()["type"] == "error" and response.json()["error"]["type"] == kind
        assert response.headers["request-id"]


def test_hanging_up_a_stream_stops_decoding_within_a_few_tokens(sdk, real_server):
    """The SDK's stream closed mid-answer, on an answer that cannot end early: decoding
    stops a few tokens later and the request counts as a 499."""
    bound_s = 10 * README_DECODE_HANG_UP_S * slowness(real_server)
    cancelled_before = metric(real_server, "llamad_generations_cancelled_total")
    hang_ups_before = requests_with_status(real_server, "/v1/messages", 499)
    never_short = {"type": "json_schema", "schema": NEVER_SHORT["json_schema"]["schema"]}
    with sdk.messages.stream(model="m", max_tokens=1000, messages=ASK,
                             extra_body={**GREEDY, "output_format": never_short}) as stream:
        deltas = 0
        for event in stream:
            deltas += event.type == "content_block_delta"
            if deltas == 3:
                decoded_at_hang_up = metric(real_server, "llamad_completion_tokens_total")
                break  # leaving the block closes the connection: the hang-up
    assert deltas == 3
    freed_by = time.monotonic() + bound_s
    while httpx.get(real_server + "/health", timeout=5).json()["generating"]:
        assert time.monotonic() < freed_by, "the generation kept running after the client left"
        time.sleep(0.02)
    after = metric(real_server, "llamad_completion_tokens_total") - decoded_at_hang_up
    assert after <= FEW_TOKENS, f"{after:.0f} tokens decoded after the hang-up"
    wait_until(
        lambda: metric(real_server, "llamad_generations_cancelled_total") == cancelled_before + 1,
        f"the hang-up counted as cancelled (failed: {metric(real_server, 'llamad_generations_failed_total')})",
        timeout=10,
    )
    assert requests_with_status(real_server, "/v1/messages", 499) == hang_ups_before + 1
