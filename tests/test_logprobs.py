"""Token log probabilities: the arithmetic on a logits row, keeping entries aligned with the
text a client receives (stop sequences, held-back text), the Engine base and the step loop,
and the two OpenAI wire shapes through the real ASGI stack."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import aclosing

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fake_backend import FakeBackend
from fake_engine import FAKE_LOGITS, FakeEngine, pieces
from test_slots import outputs
from llamad.engine import Done, Generation, Prompt, Token, TokenLogprob
from llamad.engine.logprobs import FLOOR, score
from llamad.engine.slots import Sequence, StepLoop

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
SCRIPT = ["Hello", " from", " the", " fake", " model."]


def data_chunks(body: str) -> list[dict]:
    payloads = [f[len("data: "):] for f in body.split("\n\n") if f.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


# -- the arithmetic --------------------------------------------------------------------------


@given(
    st.lists(st.floats(-30, 30, width=32), min_size=1, max_size=64),
    st.integers(0, 20),
    st.data(),
)
def test_score_is_a_log_softmax_with_the_top_n_most_likely_first(logits, top_n, data):
    row = np.array(logits, dtype=np.float32)
    token = data.draw(st.integers(0, len(logits) - 1))
    entry = score(row, token, "x", b"x", top_n, lambda i: f"<{i}>".encode())
    exact = np.exp(row.astype(np.float64) - row.max())
    exact = np.log(exact / exact.sum())
    assert entry.logprob <= 0 and math.isclose(entry.logprob, exact[token], abs_tol=1e-5)
    assert len(entry.top) == min(top_n, len(logits))
    values = [alt.logprob for alt in entry.top]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert sum(math.exp(v) for v in values) <= 1 + 1e-6
    if entry.top:
        assert math.isclose(values[0], exact.max(), abs_tol=1e-5)
        # The sampled token, when among them, is listed with the text the answer got.
        for alt in entry.top:
            assert (alt.text, alt.bytes) == (("x", b"x") if alt.id == token else (f"<{alt.id}>", f"<{alt.id}>".encode()))


def test_equal_logits_rank_in_id_order_and_the_greedy_pick_equals_the_top():
    row = np.array([1.0, 5.0, 5.0, -2.0], dtype=np.float32)
    entry = score(row, 1, "a", b"a", 3, lambda i: b"?")
    assert [alt.id for alt in entry.top] == [1, 2, 0]
    assert entry.logprob == entry.top[0].logprob == entry.top[1].logprob


def test_an_impossible_token_gets_openais_floor_not_minus_infinity():
    row = np.array([0.0, -np.inf], dtype=np.float32)
    assert score(row, 1, "", b"", 2, lambda i: b"").logprob == FLOOR


# -- alignment with the text, through the Engine base ---------------------------------------


async def tokens_of(engine: FakeEngine, generation: Generation) -> tuple[list[Token], Done]:
    await engine.load()
    tokens, done = [], None
    async with aclosing(engine.stream(generation)) as events:
        async for event in events:
            if isinstance(event, Token):
                tokens.append(event)
            elif isinstance(event, Done):
                done = event
    assert done is not None
    return tokens, done


def generation(stop: list[str] | None = None, logprobs: int | None = 2, max_tokens: int = 100) -> Generation:
    return Generation(prompt=Prompt(text="p", tokens=[1, 2]), max_tokens=max_tokens, stop=stop or [], logprobs=logprobs)


@pytest.mark.asyncio
async def test_held_back_text_goes_out_in_whole_tokens_with_their_entries():
    # "lo" may be the start of the stop "lo!", so the engine holds it back; with logprobs
    # it holds the whole token " hello", so every piece sent is spelled by its entries.
    engine = FakeEngine(script=lambda g: ["Say", " hello", " there", "."])
    tokens, done = await tokens_of(engine, generation(stop=["lo!"]))
    assert [(t.text, [e.text for e in t.logprobs]) for t in tokens] == [
        ("Say", ["Say"]),
        (" hello there", [" hello", " there"]),
        (".", ["."]),
    ]
    plain, _ = await tokens_of(FakeEngine(script=lambda g: ["Say", " hello", " there", "."]), generation(stop=["lo!"], logprobs=None))
    assert [t.text for t in plain] == ["Say", " hel", "lo there", "."]  # without logprobs, no extra holding
    entries = [e for t in tokens for e in t.logprobs]
    assert [e.text for e in entries] == ["Say", " hello", " there", "."] and done.completion_tokens == 4
    assert all(len(e.top) == 2 and e.top[0].logprob == e.logprob for e in entries)


@pytest.mark.asyncio
async def test_a_stop_sequence_cuts_the_token_it_starts_in_and_drops_those_inside_it():
    engine = FakeEngine(script=lambda g: ["Hel", "lo wo", "rld", "!"])
    tokens, done = await tokens_of(engine, generation(stop=["o wor"]))
    text = "".join(t.text for t in tokens)
    entries = [e for t in tokens for e in t.logprobs]
    assert text == "Hell" and done.stop_sequence == "o wor"
    assert [e.text for e in entries] == ["Hel", "l"]  # " wo" and "rld" are inside the stop
    assert entries[1].bytes == b"l" and entries[1].logprob == entries[0].logprob


@pytest.mark.asyncio
async def test_a_stop_right_after_released_text_still_sends_the_cut_token():
    # "ab" goes out (nothing held: no stop starts with "b"); then "\n" + "\n" is the stop,
    # which begins inside the token "b\n".
    engine = FakeEngine(script=lambda g: ["a", "b\n", "\nc"])
    tokens, _ = await tokens_of(engine, generation(stop=["\n\n"]))
    assert "".join(t.text for t in tokens) == "ab"
    assert [e.text for t in tokens for e in t.logprobs] == ["a", "b"]


# -- the slots step loop ----------------------------------------------------------------------


@pytest.mark.parametrize("logprobs", [None, 3])
def test_the_step_loop_scores_a_token_only_for_a_sequence_that_asks(logprobs):
    backend = FakeBackend(n_slots=2, script=lambda g: [5, 6, 7])
    loop = StepLoop(backend)
    asking = Sequence(generation=generation(logprobs=logprobs))
    plain = Sequence(generation=generation(logprobs=None))
    loop.submit(asking)
    loop.submit(plain)
    for _ in range(50):
        if asking.ended and plain.ended:
            break
        loop.step()
    assert all(isinstance(item, str) for item in outputs(plain)[1:-1])
    items = outputs(asking)[1:-1]  # the cached count first, None last
    if logprobs is None:
        assert items == ["t5 ", "t6 ", "t7 "] and backend.scored == 0
    else:
        assert [item.text for item in items] == ["t5 ", "t6 ", "t7 "] and backend.scored == 3
        assert all(isinstance(item, TokenLogprob) and len(item.top) == 3 for item in items)


# -- /v1/completions --------------------------------------------------------------------------


async def test_completion_logprobs_in_openais_legacy_shape(make_client):
    async with make_client(FakeEngine(script=lambda g: SCRIPT)) as client:
        response = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 10, "logprobs": 2})
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == SCRIPT and "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [0, 5, 10, 14, 19]
    expected = score(FAKE_LOGITS, 0, "", b"", 2, lambda i: b"")
    assert logprobs["token_logprobs"] == [expected.logprob] * 5
    assert logprobs["top_logprobs"][1] == {" from": expected.top[0].logprob, " alt1": expected.top[1].logprob}


async def test_completion_logprobs_zero_lists_only_the_sampled_token(make_client):
    async with make_client(FakeEngine(script=lambda g: SCRIPT)) as client:
        response = await client.post(COMPLETIONS, json={"prompt": "x", "logprobs": 0})
    top = response.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert [list(t) for t in top] == [[piece] for piece in SCRIPT]


async def test_completion_without_logprobs_answers_null_and_asks_the_engine_for_none(make_client):
    engine = FakeEngine(script=lambda g: SCRIPT)
    async with make_client(engine) as client:
        response = await client.post(COMPLETIONS, json={"prompt": "x"})
    assert response.json()["choices"][0]["logprobs"] is None and engine.generations[0].logprobs is None


async def test_streamed_completion_chunks_carry_their_tokens(make_client):
    engine = FakeEngine(script=lambda g: SCRIPT)
    body = {"prompt": ["x", "y"], "max_tokens": 10, "logprobs": 1, "stop": "fake"}
    async with make_client(engine) as client:
        plain = (await client.post(COMPLETIONS, json=body)).json()
        streamed = await client.post(COMPLETIONS, json={**body, "stream": True})
    chunks = data_chunks(streamed.text)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        texts = [m for m in mine if m["text"]]
        assert all("".join(m["logprobs"]["tokens"]) == m["text"] for m in texts)
        joined = {key: sum((m["logprobs"][key] for m in texts), []) for key in ("tokens", "token_logprobs", "text_offset")}
        assert joined == {key: plain["choices"][index]["logprobs"][key] for key in joined}
        assert joined["tokens"] == ["Hello", " from", " the", " "]  # cut at the stop "fake"
        assert mine[-1]["finish_reason"] == "stop"


# -- /v1/chat/completions ---------------------------------------------------------------------


async def test_chat_logprobs_in_openais_shape_plain_and_streamed(make_client):
    engine = FakeEngine(script=lambda g: SCRIPT)
    body = {**HELLO, "logprobs": True, "top_logprobs": 3}
    async with make_client(engine) as client:
        plain = (await client.post(CHAT, json=body)).json()
        streamed = await client.post(CHAT, json={**body, "stream": True})
    assert engine.generations[0].logprobs == 3
    choice = plain["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None
    assert [e["token"] for e in content] == SCRIPT and "".join(e["token"] for e in content) == choice["message"]["content"]
    assert bytes(b for e in content for b in e["bytes"]).decode() == choice["message"]["content"]
    assert [alt["token"] for alt in content[0]["top_logprobs"]] == ["Hello", " alt1", " alt2"]
    assert content[0]["top_logprobs"][1]["bytes"] == list(b" alt1")
    chunks = data_chunks(streamed.text)
    with_text = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert all([e["token"] for e in c["logprobs"]["content"]] == [c["delta"]["content"]] for c in with_text)
    assert [e for c in with_text for e in c["logprobs"]["content"]] == content
    assert chunks[0]["choices"][0]["logprobs"] is None and chunks[-1]["choices"][0]["logprobs"] is None


async def test_chat_logprobs_list_every_token_of_a_reasoned_answer(make_client):
    reasoned = pieces("<think>Hm.</think>Paris.", 4)
    engine = FakeEngine(script=lambda g: reasoned)
    async with make_client(engine) as client:
        body = (await client.post(CHAT + "/think", json={**HELLO, "logprobs": True})).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == "<think>Hm.</think>Paris."
    assert len(content) == body["usage"]["completion_tokens"] and all(e["top_logprobs"] == [] for e in content)


@pytest.mark.parametrize(
    "extra, param, fragment",
    [
        ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs' set to true"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs", "needs 'logprobs' set to true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "between 0 and 20"),
        ({"logprobs": "yes"}, "logprobs", "Expected `bool | null`"),
    ],
)
async def test_bad_chat_logprobs_get_openai_errors(make_client, extra, param, fragment):
    engine = FakeEngine()
    async with make_client(engine) as client:
        response = await client.post(CHAT, json={**HELLO, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and fragment in error["message"]
    assert engine.generations == []


async def test_chat_logprobs_false_answers_null(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        body = (await client.post(CHAT, json={**HELLO, "logprobs": False})).json()
    assert body["choices"][0]["logprobs"] is None and engine.generations[0].logprobs is None


async def test_slots_engine_serves_logprobs_through_the_route(make_client):
    from test_slots import FakeSlotsEngine

    engine = FakeSlotsEngine(parallel=2, backend=FakeBackend(n_slots=2, script=lambda g: [8, 9]))
    async with make_client(engine) as client:
        body = (await asyncio.wait_for(client.post(COMPLETIONS, json={"prompt": "x", "logprobs": 1}), 30)).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["t8 ", "t9 "] and body["choices"][0]["text"] == "t8 t9 "
    assert body["usage"]["completion_tokens"] == 2


# -- Ollama's /api/chat and /api/generate -----------------------------------------------------


async def test_ollama_logprobs_folded_and_on_each_streamed_line(make_client):
    engine = FakeEngine(script=lambda g: SCRIPT)
    body = {"model": "m", "prompt": "x", "raw": True, "logprobs": True, "top_logprobs": 2}
    async with make_client(engine) as client:
        folded = (await client.post("/api/generate", json={**body, "stream": False})).json()
        lines = [json.loads(line) for line in (await client.post("/api/generate", json=body)).text.splitlines()]
    assert [e["token"] for e in folded["logprobs"]] == SCRIPT and folded["response"] == "".join(SCRIPT)
    assert [[a["token"] for a in e["top_logprobs"]] for e in folded["logprobs"]][0] == ["Hello", " alt1"]
    texts = [line for line in lines if line.get("response")]
    assert all([e["token"] for e in line["logprobs"]] == [line["response"]] for line in texts)
    assert "logprobs" not in lines[-1] or lines[-1]["logprobs"] == []


async def test_ollama_answers_carry_no_logprobs_unless_asked(make_client):
    engine = FakeEngine(script=lambda g: SCRIPT)
    async with make_client(engine) as client:
        folded = (await client.post("/api/chat", json={"model": "m", "messages": HELLO["messages"], "stream": False, "top_logprobs": 3})).json()
    assert "logprobs" not in folded and engine.generations[0].logprobs is None


async def test_ollama_top_logprobs_out_of_range_is_an_ollama_400(make_client):
    async with make_client() as client:
        response = await client.post("/api/chat", json={"model": "m", "messages": HELLO["messages"], "logprobs": True, "top_logprobs": 21})
    assert response.status_code == 400 and "between 0 and 20" in response.json()["error"]


# -- /v1/responses -----------------------------------------------------------------------------


@pytest.mark.parametrize("ask", [{"include": ["message.output_text.logprobs"], "top_logprobs": 2}, {"top_logprobs": 2}])
async def test_responses_logprobs_on_the_output_text_plain_and_streamed(make_client, ask):
    engine = FakeEngine(script=lambda g: SCRIPT)
    body = {"model": "gpt-4o", "input": "Hi", **ask}
    async with make_client(engine) as client:
        plain = (await client.post("/v1/responses", json=body)).json()
        streamed = await client.post("/v1/responses", json={**body, "stream": True})
    assert engine.generations[0].logprobs == 2
    [part] = plain["output"][0]["content"]
    assert [e["token"] for e in part["logprobs"]] == SCRIPT and part["text"] == "".join(SCRIPT)
    assert [alt["token"] for alt in part["logprobs"][0]["top_logprobs"]] == ["Hello", " alt1"]
    events = [json.loads(f.split("data: ", 1)[1]) for f in streamed.text.split("\n\n") if "data: " in f]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all([t["token"] for t in d["logprobs"]] == [d["delta"]] for d in deltas)
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == [t for d in deltas for t in d["logprobs"]] == part["logprobs"]


async def test_responses_without_logprobs_asks_the_engine_for_none_and_lists_none(make_client):
    engine = FakeEngine(script=lambda g: SCRIPT)
    async with make_client(engine) as client:
        plain = (await client.post("/v1/responses", json={"model": "m", "input": "Hi"})).json()
        bad = await client.post("/v1/responses", json={"model": "m", "input": "Hi", "top_logprobs": 21})
    assert engine.generations[0].logprobs is None
    assert plain["output"][0]["content"][0]["logprobs"] == []
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"
