"""OpenAI routes through the real ASGI stack with a fake engine: shapes, frames, errors."""

from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine, pieces
from llamad.engine import Sampling

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
HELLO = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


def sse_events(body: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    payloads = []
    for frame in body.split("\n\n"):
        if not frame:
            continue
        if frame.startswith(":"):
            continue  # comment (keep-alive)
        assert frame.startswith("data: "), frame
        assert "\nevent:" not in frame and not frame.startswith("event:")
        payloads.append(frame[len("data: ") :])
    return payloads


async def test_non_stream_shape_and_served_model_id(make_client):
    async with make_client() as client:
        response = await client.post(CHAT, json=HELLO)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "llama-local"  # the served model, not the name the client asked for
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello from the fake model."}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5 and usage["prompt_tokens"] > 0
    assert response.headers["request-id"].startswith("req_")


async def test_stream_frames_order_and_usage(make_client):
    async with make_client() as client:
        response = await client.post(CHAT, json={**HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_events(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "Hello from the fake model."
    last_choice = chunks[-2]
    assert last_choice["choices"][0]["finish_reason"] == "stop" and last_choice["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stream_without_usage_has_no_usage_key(make_client):
    async with make_client() as client:
        response = await client.post(CHAT, json={**HELLO, "stream": True})
    chunks = [json.loads(p) for p in sse_events(response.text)[:-1]]
    assert all("usage" not in c for c in chunks)


REASONED = pieces("<think>Let me think.</think>\n\nParis.", 4)


@pytest.mark.parametrize("stream", [False, True])
async def test_default_route_strips_reasoning_think_route_keeps_it(make_client, stream):
    engine = FakeEngine(script=lambda g: REASONED)
    async with make_client(engine) as client:
        plain = await client.post(CHAT, json={**HELLO, "stream": stream})
        think = await client.post(CHAT + "/think", json={**HELLO, "stream": stream})
    if stream:
        def gather(response, key):
            chunks = [json.loads(p) for p in sse_events(response.text)[:-1]]
            return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])

        assert gather(plain, "content") == "Paris." and gather(plain, "reasoning_content") == ""
        assert gather(think, "content") == "Paris." and gather(think, "reasoning_content") == "Let me think."
    else:
        assert plain.json()["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
        message = think.json()["choices"][0]["message"]
        assert message["content"] == "Paris." and message["reasoning_content"] == "Let me think."


async def test_stop_sequence_and_sampling_reach_the_engine(make_client):
    engine = FakeEngine(script=lambda g: ["one", " two", " three"])
    async with make_client(engine) as client:
        response = await client.post(
            CHAT,
            json={**HELLO, "stop": "thr", "temperature": 0.2, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "seed": 3,
                  "presence_penalty": 0.5, "frequency_penalty": 0.25, "repeat_penalty": 1.1, "user": "u1",
                  "some_future_field": {"x": 1}},
        )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "one two "
    sampling = engine.generations[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p, sampling.seed) == (0.2, 0.5, 7, 0.1, 3)
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repeat_penalty) == (0.5, 0.25, 1.1)


async def test_max_tokens_is_clamped_to_the_hard_cap(make_client):
    engine = FakeEngine(script=lambda g: ["w "] * 100)
    async with make_client(engine, MAX_TOKENS_HARD_CAP="4") as client:
        response = await client.post(CHAT, json={**HELLO, "max_completion_tokens": 50})
    assert engine.generations[0].max_tokens == 4
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 4


async def test_content_as_text_parts_and_all_roles(make_client):
    engine = FakeEngine()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Dev note."}]},
        {"role": "user", "content": [{"type": "text", "text": "Part A"}, {"type": "text", "text": "Part B"}]},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "Again"},
    ]
    async with make_client(engine) as client:
        response = await client.post(CHAT, json={"messages": messages})
    assert response.status_code == 200
    prompt = engine.generations[0].prompt.text
    for text in ("Be brief.", "Dev note.", "Part A\nPart B", "Earlier answer", "Again"):
        assert text in prompt


@pytest.mark.parametrize(
    "body,status,param,fragment",
    [
        (b"{not json", 400, None, "not valid JSON"),
        (b"", 400, None, "empty"),
        (b"[1, 2]", 400, None, "Expected `object`"),
        (b'{"model": "x"}', 400, None, "messages"),
        (b'{"messages": []}', 400, "messages", "at least one"),
        (b'{"messages": "hi"}', 400, "messages", "Expected `array`"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role", "unknown role"),
        (b'{"messages": [{"content": "x"}]}', 400, None, "role"),
        (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content", "Expected"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens", "at least 1"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}', 400, "max_tokens", "Expected"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400, "temperature", "between"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n", "n=1"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400,
         "messages[0].content[0]", "not supported"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream", "Expected `bool`"),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, "JSON"),
    ],
)
async def test_bad_requests_get_openai_errors(make_client, body, status, param, fragment):
    async with make_client() as client:
        response = await client.post(CHAT, content=body, headers={"content-type": "application/json"})
        health = await client.get("/health")
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    if param is not None:
        assert error["param"] == param
    assert health.status_code == 200 and not health.json()["generating"]


async def test_prompt_longer_than_context(make_client):
    async with make_client(FakeEngine(n_ctx=16)) as client:
        response = await client.post(CHAT, json={"messages": [{"role": "user", "content": "word " * 40}]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


async def test_unknown_route_and_wrong_method(make_client):
    async with make_client() as client:
        missing = await client.post("/v1/completions/nope", json={})
        wrong = await client.get(CHAT)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong.status_code == 405 and "error" in wrong.json()


async def test_body_too_large(make_client):
    async with make_client(LLAMAD_SERVER_MAX_BODY_BYTES="2048") as client:
        response = await client.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]


async def test_model_not_loaded_is_503(make_client):
    engine = FakeEngine()

    def broken() -> None:
        raise RuntimeError("file is corrupt")

    engine._load = broken  # type: ignore[method-assign]
    async with make_client(engine) as client:
        health = await client.get("/health")
        response = await client.post(CHAT, json=HELLO)
    assert health.status_code == 503 and health.json()["state"] == "failed" and "corrupt" in health.json()["error"]
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_loaded"


async def test_error_after_the_stream_began_is_a_final_data_event(make_client):
    def script(g):
        def gen():
            yield "partial"
            raise RuntimeError("decode failed")

        return gen()

    async with make_client(FakeEngine(script=script)) as client:
        response = await client.post(CHAT, json={**HELLO, "stream": True})
        health = await client.get("/health")
    payloads = sse_events(response.text)
    assert "[DONE]" not in payloads
    last = json.loads(payloads[-1])
    assert last["error"]["type"] == "server_error"
    assert any("partial" in p for p in payloads[:-1])
    assert health.status_code == 200 and not health.json()["generating"]


async def test_models_and_health(make_client):
    async with make_client() as client:
        models = await client.get("/v1/models")
        one = await client.get("/v1/models/claude-3-haiku")
        slashed = await client.get("/v1/models/meta-llama/Llama-3")
        health = await client.get("/health")
    assert models.json()["object"] == "list" and models.json()["data"][0]["id"] == "llama-local"
    assert one.json()["id"] == "llama-local" and slashed.json()["id"] == "llama-local"
    # Anthropic's model-list fields ride along, so its SDK's models.list() reads the same answer.
    listing = models.json()
    assert listing["has_more"] is False and listing["first_id"] == listing["last_id"] == "llama-local"
    card = listing["data"][0]
    assert card["type"] == "model" and card["display_name"] == "llama-local" and card["created_at"].endswith("Z")
    assert health.json()["status"] == "ok" and health.json()["queue_depth"] == 0


async def test_both_sdks_list_the_served_model(make_client):
    import anthropic
    import openai

    try:
        import httpx2 as httpx  # newer SDKs are built on httpx2 and refuse httpx clients
    except ImportError:
        import httpx

    async with make_client() as client:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://llamad") as http:
            o = openai.AsyncOpenAI(base_url="http://llamad/v1", api_key="x", http_client=http)
            a = anthropic.AsyncAnthropic(base_url="http://llamad", api_key="x", http_client=http)
            assert [m.id for m in (await o.models.list()).data] == ["llama-local"]
            assert [m.id for m in (await a.models.list()).data] == ["llama-local"]
            assert (await a.models.retrieve("claude-sonnet-4-5")).display_name == "llama-local"


async def test_full_queue_gets_429_with_retry_after(tmp_path):
    """Concurrency needs a transport that runs requests side by side (the Litestar test
    client runs each request to completion), so this drives the app with httpx's."""
    import asyncio

    import httpx

    from conftest import config_for_tests
    from llamad.app import create_app

    engine = FakeEngine(script=lambda g: ["x"] * 400, token_delay=0.005, max_queue=0)
    await engine.load()
    app = create_app(config_for_tests(tmp_path), engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = asyncio.create_task(client.post(CHAT, json={**HELLO, "max_tokens": 400}))
        async with asyncio.timeout(10):
            while not engine.generating:
                await asyncio.sleep(0.005)
        second = await client.post(CHAT, json=HELLO)
        assert engine.generating  # refused at once, while the first still runs
        async with asyncio.timeout(30):
            first_response = await first
    engine.close()
    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert first_response.status_code == 200
    assert first_response.json()["usage"]["completion_tokens"] == 400


async def test_keep_alive_comments_only_while_the_client_waits(make_client, monkeypatch):
    monkeypatch.setattr("llamad.engine.base.KEEPALIVE_S", 0.05)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with make_client(FakeEngine(token_delay=0.001)) as client:
        quick = (await client.post(CHAT, json=body)).text
    async with make_client(FakeEngine(prompt_delay=0.3)) as client:
        slow = (await client.post(CHAT, json=body)).text
    assert ": keep-alive" not in quick  # answered at once: data frames only
    assert '"content":"Hello"' in slow
    before_content = slow.split('"content":"Hello"')[0]
    assert before_content.count(": keep-alive") >= 3  # a long prompt: the client hears from us


async def _raw_post(app, path: str, receive_messages) -> tuple[int, bytes]:
    """Drives the ASGI app directly, so the test decides when body chunks arrive."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive_messages, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("path", [CHAT, "/v1/messages"])
async def test_a_stalled_or_abandoned_upload_is_answered_not_held(make_client, path):
    import asyncio

    async with make_client(LLAMAD_SERVER_WRITE_TIMEOUT="0.3") as client:
        async def stalls():
            if not stalls.sent:
                stalls.sent = True
                return {"type": "http.request", "body": b'{"messages": [', "more_body": True}
            await asyncio.sleep(5)  # the client never sends the rest
        stalls.sent = False
        status, body = await asyncio.wait_for(_raw_post(client.app, path, stalls), timeout=3)
        assert status == 408 and b"stopped arriving" in body

        async def hangs_up():
            if not hangs_up.sent:
                hangs_up.sent = True
                return {"type": "http.request", "body": b'{"messages": [', "more_body": True}
            return {"type": "http.disconnect"}
        hangs_up.sent = False
        status, _ = await _raw_post(client.app, path, hangs_up)
        assert status == 499  # the client left: logged as such, not as a server error


async def test_settings_a_request_leaves_out_come_from_the_servers_sampling_defaults(make_client):
    engine = FakeEngine(script=lambda g: ["ok"])
    engine.default_sampling = Sampling(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2, repeat_penalty=1.3)
    async with make_client(engine) as client:
        assert (await client.post(CHAT, json=HELLO)).status_code == 200
        assert (await client.post(CHAT, json={**HELLO, "temperature": 1.5, "top_k": 9})).status_code == 200
    unset, partly = (g.sampling for g in engine.generations)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p, unset.repeat_penalty) == (0.0, 0.5, 3, 0.2, 1.3)
    assert (partly.temperature, partly.top_p, partly.top_k) == (1.5, 0.5, 9)
