"""The real tier: the demo GGUF in a real `llamad serve`, driven by the official openai SDK."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def client(real_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about Jetson."},
]


def test_plain_answer(client):
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=24, seed=1)
    assert completion.model == "llama-local"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 24
    assert completion.usage.prompt_tokens > 10


def test_streamed_answer_with_usage_matches_its_text(client):
    stream = client.chat.completions.create(
        model="llama-local",
        messages=MESSAGES,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert text.strip()
    assert finishes in (["stop"], ["length"])
    assert usage is not None and 0 < usage.completion_tokens <= 24
    assert len({c.id for c in chunks}) == 1


def test_streamed_and_plain_answers_agree_at_temperature_zero(client):
    kwargs = dict(model="llama-local", messages=MESSAGES, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
    )
    assert streamed == plain.choices[0].message.content


def test_think_route(real_server):
    # The SDK posts to <base>/chat/completions, so the think route is reached with a base
    # URL that ends in /think's parent and a path override.
    think = openai.OpenAI(base_url=real_server + "/v1", api_key="x", max_retries=0)
    completion = think.post(
        "/chat/completions/think",
        cast_to=openai.types.chat.ChatCompletion,
        body={"model": "llama-local", "messages": MESSAGES, "max_tokens": 12},
    )
    assert completion.choices[0].message.content is not None
    response = httpx.post(
        real_server + "/v1/chat/completions/think",
        json={"model": "llama-local", "messages": MESSAGES, "max_tokens": 12},
        timeout=120,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_stop_sequence(client):
    # Greedy decoding is deterministic: find a word the model says, then stop on it.
    kwargs = dict(model="llama-local", messages=MESSAGES, max_tokens=24, temperature=0)
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    words = [w for w in free.split() if len(w) > 2]
    assert words, free
    stop = words[min(2, len(words) - 1)]
    stopped = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.message.content
    assert free.startswith(stopped.message.content)


def test_too_long_prompt_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="llama-local", messages=[{"role": "user", "content": "lorem ipsum " * 5000}], max_tokens=4
        )
    assert info.value.status_code == 400
    assert info.value.code == "context_length_exceeded"


def test_concurrent_requests_are_all_answered(client):
    def ask(i: int):
        return client.chat.completions.create(
            model="llama-local",
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=12,
            stream=(i % 2 == 0),
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, range(6)))
    for i, result in enumerate(results):
        if i % 2 == 0:
            chunks = list(result)
            assert any(c.choices and c.choices[0].finish_reason for c in chunks)
        else:
            assert result.choices[0].message.content is not None
            assert result.usage.completion_tokens > 0


def test_models_list_via_sdk(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["llama-local"]


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_ignore_eos_runs_an_answer_that_ends_by_itself_to_max_tokens(tmp_path, parallel):
    from conftest import start_server

    body = {"messages": [{"role": "user", "content": "Reply with the word OK."}], "max_tokens": 60, "temperature": 0}
    with start_server(tmp_path, PARALLEL=parallel) as server:
        ended = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300).json()
        ran_on = httpx.post(server.url + "/v1/chat/completions", json={**body, "ignore_eos": True}, timeout=300).json()
        completion = httpx.post(
            server.url + "/v1/completions",
            json={"prompt": "User: Reply with the word OK.\n\nAssistant:", "max_tokens": 60, "temperature": 0,
                  "stop": ["."], "ignore_eos": True},
            timeout=300,
        ).json()
    # Greedy, the demo model ends this turn itself, well before the cap ...
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] < 60
    # ... and with ignore_eos the same request runs to it, through the turn's end.
    assert ran_on["choices"][0]["finish_reason"] == "length" and ran_on["usage"]["completion_tokens"] == 60
    # A stop string the client gave still ends the answer.
    assert completion["choices"][0]["finish_reason"] == "stop"
