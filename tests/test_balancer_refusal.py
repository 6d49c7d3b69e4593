"""Overload refusals a load balancer can retry: with `X-Llamad-Refuse-With: 503` (set by the
shipped HAProxy config) a request refused for overload before any response byte is a 503
that names in `X-Llamad-Refused` the status a direct client gets (429 or Anthropic's 529),
with the same body and Retry-After. Without the header nothing changes, and a stream whose
headers went out still ends with its error event."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from conftest import config_for_tests
from fake_engine import FakeEngine
from llamad.app import create_app

pytestmark = pytest.mark.timeout(60)

RETRY = {"X-Llamad-Refuse-With": "503"}
USER = [{"role": "user", "content": "Hi"}]

# route, body, the status a direct client gets for a full queue, and the body's error type.
FAMILIES = [
    pytest.param("/v1/chat/completions", {"messages": USER}, 429, "rate_limit_error", id="openai"),
    pytest.param("/v1/responses", {"input": "Hi"}, 429, "rate_limit_error", id="responses"),
    pytest.param("/v1/messages", {"messages": USER, "max_tokens": 8}, 529, "overloaded_error", id="anthropic"),
    pytest.param("/api/chat", {"messages": USER, "stream": False}, 429, None, id="ollama"),
]


def family_headers(path: str) -> dict[str, str]:
    """What each family's SDK sends (the anthropic-version header makes other paths Anthropic's)."""
    return {"anthropic-version": "2023-06-01"} if path.startswith("/v1/messages") else {}


def error_type(body: dict[str, Any]) -> str | None:
    """The family's error type: OpenAI's and Anthropic's `error.type`; Ollama's error is a string."""
    error = body["error"]
    return error["type"] if isinstance(error, dict) else None


@contextlib.asynccontextmanager
async def busy_server(tmp_path: Path, **engine_args: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose one slot is held by a long request, so the next ones are refused or queued.
    httpx's ASGI transport runs requests side by side (the Litestar test client does not)."""
    engine = FakeEngine(script=lambda g: ["x"] * 2000, token_delay=0.005, **engine_args)
    await engine.load()
    app = create_app(config_for_tests(tmp_path), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as http:
        holder = asyncio.create_task(http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2000}))
        try:
            async with asyncio.timeout(10):
                while not engine.generating:
                    await asyncio.sleep(0.005)
            yield http
            assert engine.generating  # every refusal came while the slot was still held
        finally:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
            engine.close()


@pytest.mark.parametrize(("path", "body", "direct_status", "kind"), FAMILIES)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_full_queue_is_a_retryable_503_for_a_balancer_and_unchanged_for_a_direct_client(
    tmp_path, path, body, direct_status, kind, stream
):
    async with busy_server(tmp_path, max_queue=0) as http:
        payload = {**body, "stream": stream}
        direct = await http.post(path, json=payload, headers=family_headers(path))
        balanced = await http.post(path, json=payload, headers={**family_headers(path), **RETRY})
    # A direct client gets what it always got.
    assert direct.status_code == direct_status
    assert "x-llamad-refused" not in direct.headers
    # Behind the balancer: a 503 it can retry, naming the status to give back if all refuse.
    assert balanced.status_code == 503
    assert balanced.headers["x-llamad-refused"] == str(direct_status)
    assert balanced.headers["retry-after"] == direct.headers["retry-after"] == "1"
    assert balanced.headers["content-type"].startswith("application/json")
    assert balanced.json() == direct.json()
    assert error_type(balanced.json()) == kind
    assert "busy" in json.dumps(balanced.json())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_queue_timeout_before_the_answer_is_retryable(tmp_path, path):
    """A non-streamed request sends nothing while it waits, so its queue timeout is a refusal
    like a full queue's."""
    async with busy_server(tmp_path, max_queue=1, queue_timeout=0.2) as http:
        balanced = await http.post(path, json={"messages": USER, "max_tokens": 8}, headers={**family_headers(path), **RETRY})
    assert balanced.status_code == 503
    assert balanced.headers["x-llamad-refused"] == ("529" if path == "/v1/messages" else "429")
    assert balanced.headers["retry-after"] == "1"
    assert "gave up" in json.dumps(balanced.json())


async def test_a_stream_that_started_still_ends_with_its_error_event(tmp_path):
    """A streamed request that waits has sent its headers (200) and keep-alives, so its queue
    timeout can only travel in the stream, with or without the header."""
    async with busy_server(tmp_path, max_queue=2, queue_timeout=0.2) as http:
        openai = await http.post(
            "/v1/chat/completions", json={"messages": USER, "stream": True}, headers=RETRY
        )
        anthropic = await http.post(
            "/v1/messages", json={"messages": USER, "max_tokens": 8, "stream": True}, headers={**family_headers("/v1/messages"), **RETRY}
        )
    for response in (openai, anthropic):
        assert response.status_code == 200 and "x-llamad-refused" not in response.headers
    last_openai = [line for line in openai.text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last_openai.removeprefix("data: "))["error"]["type"] == "rate_limit_error"
    assert "event: error" in anthropic.text
    last_anthropic = [line for line in anthropic.text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last_anthropic.removeprefix("data: "))["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize(("path", "direct_status"), [("/v1/chat/completions", 503), ("/v1/messages", 529)])
async def test_a_draining_board_refuses_with_a_retryable_503(tmp_path, path, direct_status):
    """Shutting down is a 503 for OpenAI already, but Anthropic's 529 was not retried."""
    engine = FakeEngine()
    await engine.load()
    app = create_app(config_for_tests(tmp_path), engine)
    engine.scheduler.close()
    body = {"messages": USER, "max_tokens": 8}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as http:
        direct = await http.post(path, json=body, headers=family_headers(path))
        balanced = await http.post(path, json=body, headers={**family_headers(path), **RETRY})
    engine.close()
    assert direct.status_code == direct_status and "x-llamad-refused" not in direct.headers
    assert balanced.status_code == 503 and balanced.headers["x-llamad-refused"] == str(direct_status)
    assert balanced.json() == direct.json() and "shutting down" in json.dumps(balanced.json())
    assert balanced.headers["retry-after"] == "5"


async def test_only_overload_refusals_change_and_only_for_an_error_status(tmp_path):
    async with busy_server(tmp_path, max_queue=0) as http:
        bad_request = await http.post("/v1/chat/completions", json={"messages": "hi"}, headers=RETRY)
        nonsense = await http.post("/v1/chat/completions", json={"messages": USER}, headers={"X-Llamad-Refuse-With": "soon"})
    assert bad_request.status_code == 400 and "x-llamad-refused" not in bad_request.headers
    assert nonsense.status_code == 429 and "x-llamad-refused" not in nonsense.headers
