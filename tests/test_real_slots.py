"""Real tier: continuous batching (server.parallel) with the real engine and the official SDK.

Logits differ with the batch's composition, so nothing here compares texts across runs;
what is checked is that every answer is complete and well formed, and that the streams
really overlapped in time.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import jsonschema
import pytest

from conftest import start_server

pytestmark = pytest.mark.real

CHAT = "/v1/chat/completions"
# Answers that run to max_tokens even where the demo model would end its turn, so that
# streams meant to overlap do.
RUN_ON = {"ignore_eos": True}


@pytest.fixture(scope="module")
def slots_server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("slots"), "[server]\nparallel = 4\n") as server:
        yield server


def stream_answer(base: str, content: str, max_tokens: int, **extra) -> dict:
    """Streams one answer with the openai SDK; returns its text, finish, usage and timings."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    started = time.monotonic()
    text, finish, usage, first, last, roles = "", None, None, None, None, []
    stream = client.chat.completions.create(
        model="llama-local", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True}, **extra,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            now = time.monotonic()
            first = first or now
            last = now
            text += delta.content
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return {"text": text, "finish": finish, "usage": usage, "first": first, "last": last, "roles": roles, "started": started}


def assert_complete(answer: dict, max_tokens: int) -> None:
    assert answer["roles"] == ["assistant"]
    assert answer["finish"] in ("stop", "length")
    usage = answer["usage"]
    assert usage is not None and 0 < usage.completion_tokens <= max_tokens
    if answer["finish"] == "length":
        assert usage.completion_tokens == max_tokens
    assert answer["text"].strip()


@pytest.mark.parametrize("streams", [2, 4])
def test_interleaved_streams_each_give_a_complete_answer(slots_server, streams):
    max_tokens = 48
    with concurrent.futures.ThreadPoolExecutor(max_workers=streams) as pool:
        answers = list(pool.map(
            lambda i: stream_answer(slots_server.url, f"Story {i}: tell me about a lighthouse keeper.", max_tokens,
                                    temperature=0.7, seed=i, extra_body=RUN_ON),
            range(streams),
        ))
    for answer in answers:
        assert_complete(answer, max_tokens)
    # They decoded together: every stream's first token came before any stream's last.
    assert max(a["first"] for a in answers) < min(a["last"] for a in answers)
    health = httpx.get(slots_server.url + "/health", timeout=10).json()
    assert health["slots"] == {"total": 4, "busy": 0}


def test_a_hang_up_frees_its_slot_for_the_queued_request_while_the_other_finishes(tmp_path):
    with start_server(tmp_path, "[server]\nparallel = 2\n") as server:
        base = server.url
        results: dict[str, dict] = {}
        staying = threading.Thread(
            target=lambda: results.update(staying=stream_answer(base, "Write a long essay about rivers.", 200, temperature=0.8))
        )
        with httpx.Client(timeout=120) as leaving_client:
            with leaving_client.stream(
                "POST", base + CHAT,
                json={"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 1000, "stream": True},
            ) as leaving:
                lines = leaving.iter_lines()
                staying.start()
                for line in lines:
                    if '"content":"' in line and '"content":""' not in line:
                        break
                queued = threading.Thread(
                    target=lambda: results.update(queued=stream_answer(base, "Say hello.", 8, temperature=0))
                )
                queued.start()
                deadline = time.monotonic() + 60
                while httpx.get(base + "/health", timeout=5).json()["queue_depth"] < 1:
                    assert time.monotonic() < deadline, "the third request never queued behind two slots"
                    time.sleep(0.02)
            hung_up = time.monotonic()  # leaving the `with` closed the connection
        queued.join(timeout=120)
        staying.join(timeout=300)
        assert_complete(results["queued"], 8)
        assert_complete(results["staying"], 200)
        # The freed slot took the queued request while the other stream was still decoding.
        assert results["queued"]["first"] < results["staying"]["last"]
        print(f"\nhang-up to queued request's first token: {(results['queued']['first'] - hung_up) * 1000:.0f} ms")
        health = httpx.get(base + "/health", timeout=5).json()
        assert health["slots"]["busy"] == 0 and health["queue_depth"] == 0


def test_a_tool_call_and_free_text_decode_in_the_same_batch(slots_server):
    from openai import OpenAI

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": schema}}]
    client = OpenAI(base_url=slots_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        free = pool.submit(stream_answer, slots_server.url, "Describe the ocean at night.", 120, temperature=0.8,
                           extra_body=RUN_ON)
        time.sleep(0.5)  # the free-text stream is decoding when the call arrives
        call_started = time.monotonic()
        response = client.chat.completions.create(
            model="llama-local", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=64, temperature=0.8,
        )
        call_done = time.monotonic()
        answer = free.result(timeout=300)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert_complete(answer, 120)
    assert answer["first"] < call_done and call_started < answer["last"]  # they overlapped
    _metric(slots_server.url, "llamad_grammar_fallbacks_total")  # resampled tokens are counted


def _metric(base: str, name: str) -> float:
    import re

    text = httpx.get(base + "/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_prompt_tokens_evaluated_count_the_slots_prefill_less_what_was_reused(slots_server):
    from test_real_load import metric

    base = slots_server.url
    content = f"Ticket {time.time_ns()}: " + "the slots engine counts what it evaluates. " * 20
    before = metric(base, "llamad_prompt_tokens_evaluated_total")
    answer = stream_answer(base, content, max_tokens=4, temperature=0)
    usage = answer["usage"]
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    assert usage.prompt_tokens > 100
    assert metric(base, "llamad_prompt_tokens_evaluated_total") - before == usage.prompt_tokens - cached


def test_a_long_cold_prompt_clears_idle_slots_and_their_conversation_comes_back_warm(tmp_path):
    """A prompt with 512+ tokens to read moves the idle slots' KV to the saved-state cache;
    the conversation it moved gets its next turn from there (cached tokens, not read
    again), and a short prompt that afterwards reuses only a slot's BOS still gets the
    model's own answer (the sliding-window check)."""
    from openai import OpenAI

    with start_server(tmp_path, "[server]\nparallel = 4\n") as server:
        base = server.url
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)

        def short() -> str:
            return client.completions.create(model="m", prompt="The capital of France is", max_tokens=3, temperature=0).choices[0].text

        reference = short()
        conversation = [{"role": "user", "content": "Lighthouse log. " + "The keeper writes down every ship that passes. " * 40}]
        first = client.chat.completions.create(model="m", messages=conversation, max_tokens=4, temperature=0)
        evicted = _metric(base, "llamad_slot_evictions_total")
        cold = "Operating manual. " + " ".join(f"rule{i % 97} applies to section {i % 13};" for i in range(160))
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": cold}], max_tokens=2, temperature=0)
        assert answer.usage.prompt_tokens >= 600
        assert _metric(base, "llamad_slot_evictions_total") > evicted  # the conversation's slot (and the short prompt's)
        conversation += [{"role": "assistant", "content": first.choices[0].message.content or ""}, {"role": "user", "content": "Go on."}]
        second = client.chat.completions.create(model="m", messages=conversation, max_tokens=4, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2
        for _ in range(2):
            client.completions.create(model="m", prompt=cold + " Again.", max_tokens=2, temperature=0)
            assert short() == reference


# -- one slot: server.parallel = 1 runs through the same step loop ----------------------------


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("one-slot"), PARALLEL="1", N_CTX="512") as server:
        yield server


def test_one_slot_is_the_step_loop_with_one_slot(one_slot_server):
    health = httpx.get(one_slot_server.url + "/health", timeout=10).json()
    assert health["slots"] == {"total": 1, "busy": 0}
    info = health["model_info"]
    assert (info["parallel"], info["kv_tokens"], info["flash_attn_setting"]) == (1, 512, "auto")
    # "auto" is a measurement (stored for the whole test session), so the context has one or the other.
    assert info["flash_attn"] in ("on", "off") and info["flash_attn_measured"]["on_tok_s"] > 0
    assert info["kv_cache_mib"] > 0


def test_one_slot_answers_the_same_seed_with_the_same_text(one_slot_server):
    """Sampled (temperature 1), seeded: the same request gives the same answer. Another
    prompt runs in between, so the second run reads its prompt again as the first did."""
    from openai import OpenAI

    client = OpenAI(base_url=one_slot_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def answer(prompt: str, seed: int) -> str:
        return client.completions.create(model="m", prompt=prompt, max_tokens=16, temperature=1.0, seed=seed).choices[0].text

    first = answer("Once upon a time, in a lighthouse,", 7)
    answer("A list of rivers:", 8)
    assert answer("Once upon a time, in a lighthouse,", 7) == first


def test_one_slot_keeps_to_a_json_schema(one_slot_server):
    from openai import OpenAI

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    client = OpenAI(base_url=one_slot_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    response = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "The weather in Paris, as JSON."}], max_tokens=64, temperature=0.8,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}},
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def test_one_slot_stops_at_the_end_of_the_context(one_slot_server):
    from openai import OpenAI

    client = OpenAI(base_url=one_slot_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    prompt = "one two three four five six seven eight nine ten " * 45
    result = client.completions.create(model="m", prompt=prompt, max_tokens=400, temperature=0, extra_body=RUN_ON)
    usage = result.usage
    assert 400 < usage.prompt_tokens < 512 - 8
    assert result.choices[0].finish_reason == "length"
    assert usage.prompt_tokens + usage.completion_tokens == 512
