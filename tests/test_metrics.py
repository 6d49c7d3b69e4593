"""/metrics through the real ASGI stack with a fake engine: labels a client cannot multiply,
tokens counted as the engine does the work, cache hits beyond the template's shared head,
hang-ups counted as 499 and cancellations apart from failures."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import zlib
from typing import Iterator

import httpx
import pytest
from structlog.testing import capture_logs

from conftest import config_for_tests
from fake_engine import FakeEngine
from llamad.app import create_app
from llamad.engine.chat import Chat
from llamad.engine import Generation, Prompt
from llamad.engine.prompt_cache import common_prefix

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def request_series(text: str) -> dict[tuple[str, str, str], float]:
    series = {}
    for method, route, status, count in re.findall(
        r'^llamad_requests_total\{method="([^"]*)",route="([^"]*)",status="([^"]*)"\} (\S+)$', text, re.M
    ):
        series[(method, route, status)] = float(count)
    return series


async def test_route_labels_are_templates_so_clients_cannot_add_series(make_client):
    async with make_client() as client:
        for name in ("rand-20534", "rand-777", "org/model"):
            assert (await client.get(f"/v1/models/{name}")).status_code == 200
        for path in ("/no/such/path-1", "/no/such/path-2"):
            assert (await client.get(path)).status_code == 404
        assert (await client.request("BREW", "/v1/models")).status_code == 405
        text = (await client.get("/metrics")).text
    series = request_series(text)
    assert series[("GET", "/v1/models/{model_id}", "200")] == 3
    assert series[("GET", "unmatched", "404")] == 2
    assert series[("OTHER", "unmatched", "405")] == 1
    assert "rand-" not in text and "path-1" not in text and "BREW" not in text


async def stream_then_hang_up(app, path: str, body: dict, after_chunks: int) -> list[dict]:
    """Drives the ASGI app as a client that reads `after_chunks` body chunks of a stream
    and then disconnects."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    sent: list[dict] = []
    enough = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) >= after_chunks:
            enough.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_a_streamed_hang_up_is_a_499_and_its_tokens_are_counted(make_client, path):
    engine = FakeEngine(script=lambda g: ["tok "] * 10_000, token_delay=0.002)
    body = {"model": "m", "max_tokens": 10_000, "stream": True, "messages": [{"role": "user", "content": "Go on."}]}
    async with make_client(engine) as client:
        with capture_logs() as logs:
            sent = await stream_then_hang_up(client.app, path, body, after_chunks=20)
        async with asyncio.timeout(10):
            while engine.generating:
                await asyncio.sleep(0.01)
        text = (await client.get("/metrics")).text
    assert sent[0]["status"] == 200  # the stream had begun: only the log and metrics can tell
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
    lines = [e for e in logs if e["event"] == "request"]
    assert [e["status"] for e in lines] == [499]
    assert request_series(text)[("POST", path, "499")] == 1
    assert value(text, "llamad_generations_cancelled_total") == 1
    assert value(text, "llamad_generations_failed_total") == 0
    # Every decoded token is counted, those nobody read too, and decoding stopped soon.
    decoded = value(text, "llamad_completion_tokens_total")
    assert decoded == engine.decoded_tokens
    assert 10 <= decoded < 2_000


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_a_stream_read_to_its_end_cancels_nothing(make_client, path):
    """A stream ends on its finish event and lets go of the generation right there; that
    generation is complete, not cancelled."""
    body = {"model": "m", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Hi"}]}
    async with make_client() as client:
        for _ in range(3):
            assert (await client.post(path, json=body)).status_code == 200
        text = (await client.get("/metrics")).text
    assert value(text, "llamad_generations_cancelled_total") == 0
    assert value(text, "llamad_completion_tokens_total") == 3 * 5
    assert request_series(text)[("POST", path, "200")] == 3


async def test_an_engine_error_counts_as_failed_not_cancelled(make_client):
    def breaks(generation: Generation) -> Iterator[str]:
        yield "one "
        yield "two "
        raise RuntimeError("the model fell over")

    async with make_client(FakeEngine(script=breaks)) as client:
        response = await client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "stream": True})
        text = (await client.get("/metrics")).text
    assert '"error"' in response.text
    assert value(text, "llamad_generations_failed_total") == 1
    assert value(text, "llamad_generations_cancelled_total") == 0
    assert value(text, "llamad_completion_tokens_total") == 2


async def test_prompt_tokens_of_a_request_the_queue_refused_are_not_counted(tmp_path):
    engine = FakeEngine(script=lambda g: ["x"] * 200, token_delay=0.005, max_queue=0)
    await engine.load()
    app = create_app(config_for_tests(tmp_path), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        first = asyncio.create_task(
            client.post(CHAT, json={"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 200})
        )
        async with asyncio.timeout(10):
            while not engine.generating:
                await asyncio.sleep(0.005)
        refused = await client.post(CHAT, json={"messages": [{"role": "user", "content": "four five six " * 50}]})
        async with asyncio.timeout(30):
            answered = await first
        text = (await client.get("/metrics")).text
    engine.close()
    assert refused.status_code == 429 and answered.status_code == 200
    assert value(text, "llamad_prompt_tokens_total") == answered.json()["usage"]["prompt_tokens"]


class CachingEngine(FakeEngine):
    """A fake whose prompts start with a fixed head ("<bos>"), with one token per word, and
    which reports the prefix it shares with the previous prompt as reused, as llama.cpp's
    live context does."""

    def __init__(self) -> None:
        super().__init__()
        self.live: list[int] = []
        self.cached: list[int] = []

    def _prepare(self, chat: Chat) -> Prompt:
        text = "<bos> " + self.render(chat)
        return Prompt(text=text, tokens=[zlib.crc32(word.encode()) for word in text.split()])

    def _decode(self, generation: Generation, cancel: threading.Event) -> Iterator[str | int]:
        tokens = generation.prompt.tokens
        reused = min(common_prefix(self.live, tokens), len(tokens) - 1)
        self.live = list(tokens)
        self.cached.append(reused)
        yield reused
        yield from ["Sure."]


async def test_a_cache_hit_is_reuse_beyond_the_shared_head(make_client):
    engine = CachingEngine()
    first = [{"role": "user", "content": "Tell me about the moon and its phases."}]
    async with make_client(engine) as client:
        await client.post(CHAT, json={"messages": first})
        await client.post(CHAT, json={"messages": [{"role": "user", "content": "Unrelated question here."}]})
        unrelated = (await client.get("/metrics")).text
        follow_up = [{"role": "user", "content": "Unrelated question here."}, {"role": "assistant", "content": "Sure."},
                     {"role": "user", "content": "And more?"}]
        await client.post(CHAT, json={"messages": follow_up})
        continued = (await client.get("/metrics")).text
    assert engine.shared_head == 1  # "<bos>": what every prompt of this engine begins with
    assert value(unrelated, "llamad_prompt_shared_head_tokens") == 1
    assert engine.cached[:2] == [0, 1]  # the unrelated prompt reused the head, nothing more
    assert value(unrelated, "llamad_prompt_cache_lookups_total") == 2
    assert value(unrelated, "llamad_prompt_cache_hits_total") == 0
    assert engine.cached[2] > 1
    assert value(continued, "llamad_prompt_cache_hits_total") == 1
    # Tokens saved counts every reused token, the head's too: they were not evaluated.
    assert value(continued, "llamad_prompt_cache_tokens_total") == sum(engine.cached)
