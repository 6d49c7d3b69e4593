"""Legacy completions (/v1/completions), /infill, /tokenize and /detokenize through the real
ASGI stack with a fake engine (one token per character, BOS = 1, FIM ids 3/4/5)."""

from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine

pytestmark = pytest.mark.asyncio

COMPLETIONS = "/v1/completions"


def sse_payloads(body: str) -> list[str]:
    out = []
    for frame in body.split("\n\n"):
        if frame and not frame.startswith(":"):
            assert frame.startswith("data: ") and "\n" not in frame, frame
            out.append(frame[len("data: "):])
    return out


async def test_plain_completion_uses_the_raw_prompt(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        response = await client.post(COMPLETIONS, json={"model": "davinci", "prompt": "Once upon", "max_tokens": 4, "seed": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice == {"text": "Hello from the fake", "index": 0, "logprobs": None, "finish_reason": "length"}
    [generation] = engine.generations
    assert generation.prompt.tokens == [1] + [ord(c) for c in "Once upon"]  # no chat template
    assert generation.max_tokens == 4 and generation.sampling.seed == 3
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


async def test_default_max_tokens_is_openais_16(make_client):
    engine = FakeEngine(script=lambda g: ["a"] * 40)
    async with make_client(engine) as client:
        response = await client.post(COMPLETIONS, json={"prompt": "x"})
    assert response.json()["usage"]["completion_tokens"] == 16


async def test_a_list_of_prompts_gives_one_choice_each_and_echo(make_client):
    engine = FakeEngine(script=lambda g: [" done"])
    async with make_client(engine) as client:
        response = await client.post(COMPLETIONS, json={"prompt": ["A", "B", [66, 67]], "echo": True, "n": 2})
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    assert [c["text"] for c in choices] == ["A done", "A done", "B done", "B done", "BC done", "BC done"]
    assert len(engine.generations) == 6


async def test_stream_sends_text_chunks_then_usage_and_done(make_client):
    async with make_client() as client:
        response = await client.post(
            COMPLETIONS, json={"prompt": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and len({c["id"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(m["text"] for m in mine) == "Hello from the fake model."
        assert [m["finish_reason"] for m in mine][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_suffix_is_fill_in_the_middle_or_a_clear_400(make_client):
    engine = FakeEngine(fim=True)
    async with make_client(engine) as client:
        served = await client.post(COMPLETIONS, json={"prompt": "def f(", "suffix": "):"})
    assert served.status_code == 200
    assert engine.generations[0].prompt.tokens == [1, 3, *map(ord, "def f("), 4, *map(ord, "):"), 5]
    async with make_client(FakeEngine()) as client:
        refused = await client.post(COMPLETIONS, json={"prompt": "def f(", "suffix": "):"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "suffix" and "no FIM tokens" in error["message"]


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"prompt": []}, "prompt", "must be a string"),
        ({"prompt": 5}, "prompt", "must be a string"),
        ({"prompt": ["a", 7]}, "prompt[1]", "must be a string"),
        ({"prompt": [70000]}, "prompt", "out of range"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "between 0 and 5"),
        ({"prompt": "x", "logprobs": -1}, "logprobs", "between 0 and 5"),
        ({"prompt": "x", "logprobs": 2, "echo": True}, "echo", "prompt's log probabilities"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
        ({"prompt": "x", "temperature": 9}, "temperature", "between"),
        ({"prompt": ["x"] * 9, "n": 2}, "n", "at most 16"),
    ],
)
async def test_bad_completions_get_openai_errors(make_client, body, param, fragment):
    async with make_client() as client:
        response = await client.post(COMPLETIONS, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and fragment in error["message"]


async def test_infill_in_llama_servers_shape(make_client):
    engine = FakeEngine(fim=True, script=lambda g: ["x", " + 1"])
    body = {"input_prefix": "def f(x):\n    return ", "input_suffix": "\n", "input_extra": [{"filename": "a.py", "text": "A=1"}],
            "prompt": "", "n_predict": 8}
    async with make_client(engine) as client:
        response = await client.post("/infill", json=body)
        streamed = await client.post("/infill", json={**body, "stream": True})
        refused = await client.post("/infill", json={"input_prefix": "a", "input_suffix": "b"}, headers={})
    result = response.json()
    assert result["content"] == "x + 1" and result["stop"] is True and result["tokens_predicted"] == 2
    assert result["stop_type"] == "eos"
    tokens = engine.generations[0].prompt.tokens
    assert tokens[:2] == [1, 3] and "".join(map(chr, tokens[2:9])) == "a.py\nA=" and tokens[-1] == 5
    pieces = [json.loads(p) for p in sse_payloads(streamed.text)]
    assert "".join(p["content"] for p in pieces) == "x + 1" and pieces[-1]["stop"] is True
    assert refused.status_code == 200  # the fake has FIM tokens
    async with make_client(FakeEngine()) as client:
        no_fim = await client.post("/infill", json={"input_prefix": "a", "input_suffix": "b"})
    assert no_fim.status_code == 400 and no_fim.json()["error"]["param"] == "input_suffix"


async def test_tokenize_and_detokenize(make_client):
    async with make_client() as client:
        plain = (await client.post("/tokenize", json={"content": "Hi"})).json()
        special = (await client.post("/tokenize", json={"content": "Hi", "add_special": True, "with_pieces": True})).json()
        text = (await client.post("/detokenize", json={"tokens": [1, 72, 105]})).json()
        out_of_range = await client.post("/detokenize", json={"tokens": [72, -1]})
        wrong = await client.post("/tokenize", json={"content": 5})
    assert plain == {"tokens": [72, 105]}
    assert special == {"tokens": [{"id": 1, "piece": "<s>"}, {"id": 72, "piece": "H"}, {"id": 105, "piece": "i"}]}
    assert text == {"content": "<s>Hi"}
    assert out_of_range.status_code == 400 and "out of range" in out_of_range.json()["error"]["message"]
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "content"


async def test_a_raw_completion_keeps_think_tags_as_text(make_client):
    engine = FakeEngine(script=lambda g: ["<thi", "nk>a</think>", "b"])
    async with make_client(engine) as client:
        response = await client.post(COMPLETIONS, json={"prompt": "x"})
    assert response.json()["choices"][0]["text"] == "<think>a</think>b"


async def test_new_routes_are_counted_in_metrics(make_client):
    async with make_client() as client:
        await client.post(COMPLETIONS, json={"prompt": ["ab", "cd"], "max_tokens": 2})
        await client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        await client.post("/v1/embeddings", json={"input": "abc"})
        metrics = (await client.get("/metrics")).text
    for route in ("/v1/completions", "/api/chat", "/v1/embeddings"):
        assert f'route="{route}",status="200"}} 1' in metrics, route
    # two choices of 3 prompt tokens and 2 answer tokens each, a chat, 4 embedded tokens
    completion = [line for line in metrics.splitlines() if line.startswith("llamad_completion_tokens_total")]
    assert completion and float(completion[0].split()[-1]) == 4 + 5
