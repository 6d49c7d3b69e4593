"""Ollama's native API through the real ASGI stack with a fake engine: NDJSON framing,
folded answers, tool calls with object arguments, format, options, listings and errors."""

from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine, pieces

pytestmark = pytest.mark.asyncio

HELLO = {"model": "llama3.2", "messages": [{"role": "user", "content": "Hi"}]}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def ndjson(body: str) -> list[dict]:
    """Each line one JSON object, the body ending with a newline."""
    assert body.endswith("\n")
    return [json.loads(line) for line in body.split("\n")[:-1]]


async def test_chat_streams_ndjson_by_default_and_ends_with_counts(make_client):
    async with make_client() as client:
        response = await client.post("/api/chat", json=HELLO)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    objects = ndjson(response.text)
    assert all(o["model"] == "llama3.2" for o in objects)  # the name the client asked for
    assert [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
    text = "".join(o["message"]["content"] for o in objects)
    assert text == "Hello from the fake model."
    assert all(o["message"]["role"] == "assistant" and o["created_at"].endswith("Z") for o in objects)
    last = objects[-1]
    assert last["done_reason"] == "stop" and last["eval_count"] == 5 and last["prompt_eval_count"] > 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[key], int) and last[key] >= 0, key
    assert last["eval_duration"] > 0 and last["total_duration"] > 0


async def test_chat_stream_false_is_one_object(make_client):
    async with make_client() as client:
        response = await client.post("/api/chat", json={**HELLO, "stream": False})
    body = response.json()
    assert response.headers["content-type"].startswith("application/json")
    assert body["message"] == {"role": "assistant", "content": "Hello from the fake model."}
    assert body["done"] is True and body["done_reason"] == "stop" and body["eval_count"] == 5


async def test_options_reach_the_engine(make_client):
    engine = FakeEngine(script=lambda g: ["a"] * 50)
    options = {"temperature": 0.1, "top_p": 0.5, "top_k": 7, "seed": 42, "num_predict": 3, "stop": ["zz"], "num_ctx": 100000}
    async with make_client(engine) as client:
        response = await client.post("/api/chat", json={**HELLO, "stream": False, "options": options, "keep_alive": "5m"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["done_reason"] == "length" and body["eval_count"] == 3
    [generation] = engine.generations
    s = generation.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.1, 0.5, 7, 42)
    assert generation.stop == ["zz"] and generation.max_tokens == 3


async def test_num_ctx_below_the_prompt_is_a_context_error(make_client):
    async with make_client() as client:
        response = await client.post("/api/chat", json={**HELLO, "stream": False, "options": {"num_ctx": 1}})
    assert response.status_code == 400
    assert "context is 1 tokens" in response.json()["error"]


async def test_tool_calls_come_whole_with_object_arguments(make_client):
    for stream in (False, True):
        engine = FakeEngine(script=lambda g: pieces(CALL_TEXT, 3))
        async with make_client(engine) as client:
            response = await client.post("/api/chat", json={**HELLO, "tools": TOOLS, "stream": stream})
        assert response.status_code == 200, response.text
        objects = ndjson(response.text) if stream else [response.json()]
        calls = [c for o in objects for c in o["message"].get("tool_calls", [])]
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert calls[0]["function"]["arguments"] == {"city": "Paris"}  # an object, not a string
        assert objects[-1]["done_reason"] == "stop"
        assert "<tool_call>" not in "".join(o["message"]["content"] for o in objects)


async def test_tool_history_with_object_arguments_is_rendered(make_client):
    engine = FakeEngine()
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "12 C", "tool_name": "get_weather"},
    ]
    async with make_client(engine) as client:
        response = await client.post("/api/chat", json={"model": "m", "messages": messages, "tools": TOOLS, "stream": False})
    assert response.status_code == 200, response.text
    prompt = engine.generations[0].prompt.text
    assert '"city": "Oslo"' in prompt and "12 C" in prompt


@pytest.mark.parametrize("fmt", ["json", SCHEMA])
async def test_format_constrains_with_a_grammar(make_client, fmt):
    engine = FakeEngine(script=lambda g: ['{"city": "Paris"}'])
    async with make_client(engine) as client:
        response = await client.post("/api/chat", json={**HELLO, "format": fmt, "stream": False})
    assert response.status_code == 200, response.text
    assert engine.generations[0].grammar is not None
    assert json.loads(response.json()["message"]["content"]) == {"city": "Paris"}


async def test_think_returns_reasoning_as_thinking(make_client):
    reasoned = pieces("<think>Hmm.</think>Paris.", 4)
    for think, expected in ((True, "Hmm."), (False, None)):
        engine = FakeEngine(script=lambda g: reasoned)
        async with make_client(engine) as client:
            response = await client.post("/api/chat", json={**HELLO, "think": think, "stream": False})
        message = response.json()["message"]
        assert message["content"] == "Paris." and message.get("thinking") == expected


async def test_generate_uses_the_template_and_raw_skips_it(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        templated = await client.post("/api/generate", json={"model": "m", "prompt": "Why?", "system": "Be brief.", "stream": False})
        raw = await client.post("/api/generate", json={"model": "m", "prompt": "Once upon", "raw": True, "stream": False})
        streamed = await client.post("/api/generate", json={"model": "m", "prompt": "Why?"})
    assert templated.json()["response"] == "Hello from the fake model." and templated.json()["done"] is True
    assert engine.generations[0].prompt.text.startswith("<system>Be brief.")
    assert engine.generations[1].prompt.text == "Once upon" and raw.json()["prompt_eval_count"] == 10
    assert engine.generations[1].prompt.tokens == [1] + [ord(c) for c in "Once upon"]
    objects = ndjson(streamed.text)
    assert "".join(o["response"] for o in objects) == "Hello from the fake model."
    assert objects[-1]["done"] is True and "message" not in objects[-1]


async def test_empty_prompt_or_messages_answer_loaded(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        generate = await client.post("/api/generate", json={"model": "m"})
        chat = await client.post("/api/chat", json={"model": "m", "messages": []})
    assert generate.json()["done_reason"] == "load" and chat.json()["done_reason"] == "load"
    assert engine.generations == []


async def test_generate_suffix_uses_fim_tokens_or_is_refused(make_client):
    engine = FakeEngine(fim=True)
    async with make_client(engine) as client:
        served = await client.post("/api/generate", json={"model": "m", "prompt": "def f(", "suffix": ")\n", "stream": False})
    assert served.status_code == 200
    assert engine.generations[0].prompt.tokens == [1, 3, *map(ord, "def f("), 4, *map(ord, ")\n"), 5]
    async with make_client(FakeEngine()) as client:
        refused = await client.post("/api/generate", json={"model": "m", "prompt": "def f(", "suffix": ")"})
    assert refused.status_code == 400
    assert "no FIM tokens" in refused.json()["error"]


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/api/chat", {"model": "m", "messages": "hi"}, "messages"),
        ("/api/chat", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
        ("/api/chat", {**HELLO, "format": "yaml"}, "'format'"),
        ("/api/chat", {**HELLO, "options": {"temperature": 7}}, "options.temperature"),
        ("/api/chat", {**HELLO, "options": {"top_k": "many"}}, "top_k"),
        ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ("/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "raw"),
        ("/api/generate", {"model": "m", "prompt": 5}, "prompt"),
    ],
)
async def test_bad_requests_get_ollama_errors(make_client, path, body, fragment):
    async with make_client() as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str)
    assert fragment in error["error"]


async def test_errors_outside_routes_and_auth_are_ollama_shaped(make_client):
    async with make_client() as client:
        missing = await client.get("/api/nothing-here")
        empty = await client.post("/api/chat", content=b"")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)
    assert empty.status_code == 400 and isinstance(empty.json()["error"], str)
    async with make_client(LLAMAD_API_KEY="sekrit") as client:
        refused = await client.get("/api/tags")
        allowed = await client.get("/api/tags", headers={"Authorization": "Bearer sekrit"})
    assert refused.status_code == 401 and refused.json() == {"error": "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"}
    assert allowed.status_code == 200


async def test_error_after_the_stream_began_is_an_error_line(make_client):
    def broken(generation):
        yield "Hel"
        raise RuntimeError("boom")

    async with make_client(FakeEngine(script=broken)) as client:
        response = await client.post("/api/chat", json=HELLO)
    objects = ndjson(response.text)
    assert objects[0]["message"]["content"] == "Hel"
    assert list(objects[-1]) == ["error"]


async def test_listings(make_client):
    async with make_client(FakeEngine(fim=True)) as client:
        version = (await client.get("/api/version")).json()
        tags = (await client.get("/api/tags")).json()
        ps = (await client.get("/api/ps")).json()
        show = (await client.post("/api/show", json={"model": "anything"})).json()
    assert version["version"].count(".") == 2
    [model] = tags["models"]
    assert model["name"] == model["model"] == "llama-local:latest"
    assert model["details"]["format"] == "gguf" and len(model["digest"]) == 64
    [running] = ps["models"]
    assert running["name"] == "llama-local:latest" and running["context_length"] == 4096 and running["expires_at"]
    assert set(show["capabilities"]) == {"completion", "tools", "embedding", "insert"}
    assert show["details"]["family"] == "fake" and "model_info" in show
    async with make_client() as client:
        plain = (await client.post("/api/show", json={"model": "x"})).json()
    assert "insert" not in plain["capabilities"]


async def test_full_queue_is_a_429_in_ollama_shape(tmp_path):
    """Side-by-side requests need httpx's ASGI transport (the Litestar test client runs
    each request to completion)."""
    import asyncio

    import httpx

    from conftest import config_for_tests
    from llamad.app import create_app

    engine = FakeEngine(script=lambda g: ["x"] * 200, token_delay=0.005, max_queue=0)
    await engine.load()
    app = create_app(config_for_tests(tmp_path), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        options = {"num_predict": 200}
        first = asyncio.create_task(client.post("/api/chat", json={**HELLO, "stream": False, "options": options}))
        async with asyncio.timeout(10):
            while not engine.generating:
                await asyncio.sleep(0.005)
        second = await client.post("/api/chat", json={**HELLO, "stream": False})
        async with asyncio.timeout(30):
            first_response = await first
    engine.close()
    assert second.status_code == 429 and "busy" in second.json()["error"]
    assert second.headers["retry-after"] == "1"
    assert first_response.status_code == 200 and first_response.json()["eval_count"] == 200


async def test_the_official_client_reads_tool_calls_streamed_and_not(tmp_path):
    """The ollama client's own models validate the reply: a call's arguments must be a mapping."""
    import httpx
    import ollama

    from conftest import config_for_tests
    from llamad.app import create_app

    engine = FakeEngine(script=lambda g: pieces(CALL_TEXT, 3))
    await engine.load()
    app = create_app(config_for_tests(tmp_path), engine)
    client = ollama.AsyncClient(host="http://test", transport=httpx.ASGITransport(app=app))
    whole = await client.chat(model="qwen3", messages=HELLO["messages"], tools=TOOLS)
    parts = [part async for part in await client.chat(model="qwen3", messages=HELLO["messages"], tools=TOOLS, stream=True)]
    engine.close()
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    streamed = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.arguments for c in streamed] == [{"city": "Paris"}]
    assert whole.model == "qwen3" and parts[-1].done and parts[-1].done_reason == "stop"


async def test_raw_generate_with_format_is_grammar_constrained(make_client):
    engine = FakeEngine(script=lambda g: ['{"a": 1}'])
    async with make_client(engine) as client:
        response = await client.post("/api/generate", json={"model": "m", "prompt": "x", "raw": True, "format": "json", "stream": False})
    assert response.status_code == 200 and json.loads(response.json()["response"]) == {"a": 1}
    assert engine.generations[0].grammar is not None and engine.generations[0].prompt.text == "x"


async def test_model_not_loaded_is_a_503_in_ollama_shape(make_client):
    engine = FakeEngine()

    def broken() -> None:
        raise RuntimeError("file is corrupt")

    engine._load = broken  # type: ignore[method-assign]
    async with make_client(engine) as client:
        chat = await client.post("/api/chat", json=HELLO)
        show = await client.post("/api/show", json={"model": "m"})
        ps = await client.get("/api/ps")
    assert chat.status_code == 503 and chat.json() == {"error": "the model is not loaded (state: failed)"}
    # /api/ps lists loaded models only; /api/show describes the file, loaded or not (as Ollama's does).
    assert ps.json() == {"models": []}
    assert show.status_code == 200 and show.json()["details"]["format"] == "gguf"
