"""Real tier: token log probabilities through the official openai SDK, plain and streamed,
from one slot (server.parallel = 1) and from the default four: the same step loop either way."""

from __future__ import annotations

import math

import openai
import pytest

from conftest import start_server

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"
# Answered past max_tokens (8) by the demo model: no stop sequence trims the text, so every
# generated token is listed (a stop's own tokens are not: test_a_stop_sequence_ends_the_entries_with_the_text).
CHAT = [{"role": "user", "content": "Write a long story about a dragon."}]
TOP = 3


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory) -> str:
    with start_server(tmp_path_factory.mktemp("logprobs"), "[server]\nparallel = 1\n") as server:
        yield server.url


@pytest.fixture(scope="module", params=["parallel_1", "parallel_4"])
def client(request) -> openai.OpenAI:
    url = request.getfixturevalue("one_slot" if request.param == "parallel_1" else "real_server")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def check_greedy(tokens: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]], text: str, completion_tokens: int):
    """What must hold for the entries of a temperature-0 answer cut by max_tokens."""
    assert "".join(tokens) == text
    assert len(tokens) == len(logprobs) == len(tops) == completion_tokens > 0
    for logprob, top in zip(logprobs, tops):
        values = [value for _, value in top]
        assert logprob <= 0 and all(v <= 0 for v in values)
        assert len(top) == TOP and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert logprob == values[0]  # greedy picks the most likely token


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_completion_logprobs(client, stream):
    kwargs = dict(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=TOP)
    if not stream:
        result = client.completions.create(**kwargs)
        [choice] = result.choices
        assert choice.finish_reason == "length"
        text, lp, completion_tokens = choice.text, choice.logprobs, result.usage.completion_tokens
        tokens, logprobs, tops, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    else:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].text]
        assert all("".join(p.logprobs.tokens) == p.text for p in parts)  # each chunk carries its own tokens
        text = "".join(p.text for p in parts)
        completion_tokens = chunks[-1].usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        tokens = [t for p in parts for t in p.logprobs.tokens]
        logprobs = [v for p in parts for v in p.logprobs.token_logprobs]
        tops = [t for p in parts for t in p.logprobs.top_logprobs]
        offsets = [o for p in parts for o in p.logprobs.text_offset]
    check_greedy(tokens, logprobs, [list(t.items()) for t in tops], text, completion_tokens)
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    # The top dict keys are the tokens' texts: the sampled token is the first.
    assert [next(iter(t)) for t in tops] == tokens


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_chat_logprobs(client, stream):
    kwargs = dict(model="m", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=TOP)
    if not stream:
        result = client.chat.completions.create(**kwargs)
        [choice] = result.choices
        assert choice.finish_reason == "length"
        text, entries, completion_tokens = choice.message.content, choice.logprobs.content, result.usage.completion_tokens
        assert choice.logprobs.refusal is None
    else:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.content]
        assert all("".join(e.token for e in p.logprobs.content) == p.delta.content for p in parts)
        text = "".join(p.delta.content for p in parts)
        entries = [e for p in parts for e in p.logprobs.content]
        completion_tokens = chunks[-1].usage.completion_tokens
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    check_greedy(
        [e.token for e in entries],
        [e.logprob for e in entries],
        [[(a.token, a.logprob) for a in e.top_logprobs] for e in entries],
        text,
        completion_tokens,
    )
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8") == text
    assert all(e.top_logprobs[0].token == e.token and e.top_logprobs[0].bytes == e.bytes for e in entries)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_responses_logprobs(client, stream):
    kwargs = dict(model="m", input=CHAT, max_output_tokens=8, temperature=0,
                  include=["message.output_text.logprobs"], top_logprobs=TOP)
    if not stream:
        result = client.responses.create(**kwargs)
    else:
        events = list(client.responses.create(stream=True, **kwargs))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert events[-1].type == "response.incomplete"
        result = events[-1].response
        assert all("".join(t.token for t in d.logprobs) == d.delta for d in deltas)
    assert result.status == "incomplete"  # cut by max_output_tokens, like the other faces' "length"
    [message] = [item for item in result.output if item.type == "message"]
    [part] = message.content
    check_greedy(
        [e.token for e in part.logprobs],
        [e.logprob for e in part.logprobs],
        [[(a.token, a.logprob) for a in e.top_logprobs] for e in part.logprobs],
        part.text,
        result.usage.output_tokens,
    )


def test_a_stop_sequence_ends_the_entries_with_the_text(client):
    # Greedy: " the capital of the country of"; the stop " of" ends the text at " the capital".
    result = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, stop=[" of"])
    [choice] = result.choices
    assert choice.text == " the capital" and choice.finish_reason == "stop"
    assert choice.logprobs.tokens == [" the", " capital"]  # " of", the stop, is not listed
    assert result.usage.completion_tokens == 3


def test_sampled_tokens_are_scored_on_the_models_distribution(client):
    # At temperature 1 the sampled token need not be the most likely: its own log
    # probability is always listed (OpenAI's legacy shape: up to logprobs + 1 entries).
    result = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, logprobs=1)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == result.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob <= max(top.values()) <= 0 and 1 <= len(top) <= 2


def test_bad_logprobs_requests_are_openai_400s(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, logprobs=6)
    assert refused.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, top_logprobs=2)
    assert refused.value.body["param"] == "top_logprobs"


def test_ollama_client_reads_logprobs(real_server):
    import ollama

    client = ollama.Client(host=real_server, timeout=300)
    result = client.generate(model="gemma3:270m", prompt=PROMPT, raw=True, logprobs=True, top_logprobs=TOP,
                             options={"temperature": 0, "num_predict": 8})
    entries = result.logprobs
    check_greedy(
        [e.token for e in entries],
        [e.logprob for e in entries],
        [[(a.token, a.logprob) for a in e.top_logprobs] for e in entries],
        result.response,
        result.eval_count,
    )
