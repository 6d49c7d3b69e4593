"""The face contract: every generating route (chat, messages, responses, completions,
/infill, /api/chat, /api/generate), streamed and not, gets the same shared steps from the
one request path (llamad.serve.pipeline). Each test is written once, over all fourteen.

- `logging.log_content` puts the prompt and the answer in the request's log line;
- a full queue is the family's overload status, before any byte;
- a hang-up is a 499 that frees the slot and counts the cancelled generation's tokens;
- an engine error after the headers is the family's error frame;
- the answer's usage reaches the log line and /metrics;
- an over-cap max_tokens is clamped the same way on every route;
- at most 16 stop sequences, on every route that takes them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from structlog.testing import capture_logs

from fake_engine import FakeEngine
from llamad.engine import Generation
from test_metrics import request_series, value

pytestmark = pytest.mark.asyncio

SECRET = "a question about llamas only the log may show"


@dataclass
class Face:
    path: str
    family: str  # "openai" | "anthropic" | "ollama"
    body: Callable[[str, int, bool], dict[str, Any]]  # (prompt, max_tokens, stream) -> JSON body


FACES = {
    "chat": Face(
        "/v1/chat/completions",
        "openai",
        lambda p, n, s: {"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": n, "stream": s},
    ),
    "messages": Face(
        "/v1/messages",
        "anthropic",
        lambda p, n, s: {"model": "m", "messages": [{"role": "user", "content": p}], "max_tokens": n, "stream": s},
    ),
    "responses": Face(
        "/v1/responses", "openai", lambda p, n, s: {"model": "m", "input": p, "max_output_tokens": n, "stream": s}
    ),
    "completions": Face(
        "/v1/completions", "openai", lambda p, n, s: {"model": "m", "prompt": p, "max_tokens": n, "stream": s}
    ),
    "infill": Face(
        "/infill", "openai", lambda p, n, s: {"input_prefix": p, "input_suffix": "}", "n_predict": n, "stream": s}
    ),
    "api_chat": Face(
        "/api/chat",
        "ollama",
        lambda p, n, s: {"model": "m", "messages": [{"role": "user", "content": p}], "stream": s, "options": {"num_predict": n}},
    ),
    "api_generate": Face(
        "/api/generate", "ollama", lambda p, n, s: {"model": "m", "prompt": p, "stream": s, "options": {"num_predict": n}}
    ),
}
EVERY_ROUTE = pytest.mark.parametrize("face", sorted(FACES))
BOTH = pytest.mark.parametrize("stream", [False, True], ids=["folded", "streamed"])


def engine(**kwargs: Any) -> FakeEngine:
    return FakeEngine(fim=True, **kwargs)  # /infill needs FIM tokens


def overload_status(family: str) -> int:
    return {"openai": 429, "anthropic": 529, "ollama": 429}[family]


def error_frame_of(family: str, path: str, text: str) -> dict[str, Any]:
    """The error the stream ended with, as the family frames it."""
    if path == "/v1/responses":
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "response.failed", events[-1]
        return next(e for e in events if e["type"] == "error")
    if family == "anthropic":
        lines = text.splitlines()
        index = lines.index("event: error")
        return json.loads(lines[index + 1][6:])
    if family == "ollama":
        return json.loads(text.strip().splitlines()[-1])
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return json.loads(data[-1])


def error_message(family: str, body: dict[str, Any]) -> str:
    if family == "ollama":
        return body["error"]
    return body.get("message") or body["error"]["message"]


async def drive(app: Any, path: str, body: dict, hang_up_when: Callable[[list[dict]], bool]) -> list[dict]:
    """Drives the ASGI app as a client that sends `body` and hangs up as soon as
    `hang_up_when(messages sent so far)` holds (checked as messages arrive, and every 10 ms)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        while not hang_up_when(sent):
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


# -- the contract ------------------------------------------------------------------------------


@EVERY_ROUTE
@BOTH
async def test_log_content_logs_the_prompt_and_the_answer(make_client, face, stream):
    f = FACES[face]
    async with make_client(engine(), LLAMAD_LOGGING_LOG_CONTENT="true") as client:
        with capture_logs() as logs:
            response = await client.post(f.path, json=f.body(SECRET, 64, stream))
    assert response.status_code == 200, response.text
    [line] = [e for e in logs if e["event"] == "request"]
    assert SECRET in line["prompt"]
    assert line["completion"] == "Hello from the fake model."


@EVERY_ROUTE
@BOTH
async def test_a_full_queue_is_the_familys_overload_status_before_any_byte(make_client, face, stream):
    f = FACES[face]
    busy = engine(max_queue=0)
    async with make_client(busy) as client:
        assert busy.scheduler.try_acquire()  # another request holds the only slot
        try:
            response = await client.post(f.path, json=f.body("Hi", 16, stream))
        finally:
            busy.scheduler.release()
    assert response.status_code == overload_status(f.family), response.text
    assert response.headers["retry-after"]
    assert "busy" in error_message(f.family, response.json())  # one body, in the family's shape
    assert busy.generations == []


@EVERY_ROUTE
@BOTH
async def test_a_hang_up_is_a_499_that_frees_the_slot_and_counts_the_tokens(make_client, face, stream):
    f = FACES[face]
    slow = engine(script=lambda g: ["tok "] * 10_000, token_delay=0.002)
    async with make_client(slow) as client:
        with capture_logs() as logs:
            sent = await drive(
                client.app,
                f.path,
                f.body("Go on.", 10_000, stream),
                # streamed: after some of the answer arrived; folded: while it is being decoded
                lambda sent: (sum(m["type"] == "http.response.body" for m in sent) >= 5) if stream else slow.decoded_tokens >= 20,
            )
        async with asyncio.timeout(5):
            while slow.generating:
                await asyncio.sleep(0.01)
        text = (await client.get("/metrics")).text
    if stream:
        assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent), "the answer ended"
    else:
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] in ([], [499])
    assert [e["status"] for e in logs if e["event"] == "request"] == [499]
    assert request_series(text)[("POST", f.path, "499")] == 1
    assert value(text, "llamad_slots_busy") == 0
    assert value(text, "llamad_generations_cancelled_total") == 1
    decoded = value(text, "llamad_completion_tokens_total")
    # Every decoded token is counted (a stream's first frames may go out before the fifth).
    assert decoded == slow.decoded_tokens and 1 <= decoded < 5_000


def breaks(generation: Generation) -> Iterator[str]:
    yield "one "
    yield "two "
    raise RuntimeError("the model fell over")


@EVERY_ROUTE
async def test_an_engine_error_after_the_headers_is_the_familys_error_frame(make_client, face):
    f = FACES[face]
    async with make_client(engine(script=breaks)) as client:
        with capture_logs() as logs:
            response = await client.post(f.path, json=f.body("Hi", 16, True))
        text = (await client.get("/metrics")).text
    assert response.status_code == 200  # the stream had begun
    error = error_frame_of(f.family, f.path, response.text)
    assert "internal error" in error_message(f.family, error)
    [line] = [e for e in logs if e["event"] == "request"]
    assert line["status"] == 500 and "internal error" in line["error"]
    assert value(text, "llamad_generations_failed_total") == 1


@EVERY_ROUTE
async def test_an_engine_error_in_a_folded_answer_is_the_familys_500(make_client, face):
    f = FACES[face]
    async with make_client(engine(script=breaks)) as client:
        response = await client.post(f.path, json=f.body("Hi", 16, False))
    assert response.status_code == 500
    assert "internal error" in error_message(f.family, response.json())


@EVERY_ROUTE
@BOTH
async def test_usage_reaches_the_log_line_and_metrics(make_client, face, stream):
    f = FACES[face]
    async with make_client(engine(token_delay=0.001)) as client:
        with capture_logs() as logs:
            response = await client.post(f.path, json=f.body("Count me.", 64, stream))
        text = (await client.get("/metrics")).text
    assert response.status_code == 200, response.text
    [line] = [e for e in logs if e["event"] == "request"]
    assert line["completion_tokens"] == 5 and line["prompt_tokens"] > 0 and line["finish_reason"] == "stop"
    assert request_series(text)[("POST", f.path, "200")] == 1
    assert value(text, "llamad_time_to_first_token_seconds_count") == 1
    assert value(text, "llamad_decode_tokens_per_second_count") == 1


@EVERY_ROUTE
@BOTH
async def test_an_over_cap_max_tokens_is_clamped_the_same_way(make_client, face, stream):
    f = FACES[face]
    fake = engine(n_ctx=4096)
    async with make_client(fake, MAX_TOKENS_HARD_CAP="7") as client:
        response = await client.post(f.path, json=f.body("Hi", 100_000, stream))
    assert response.status_code == 200, response.text
    assert [g.max_tokens for g in fake.generations] == [7]



STOPS = {  # where each family puts stop sequences (the Responses API has none)
    "chat": lambda body, stops: body.update(stop=stops),
    "messages": lambda body, stops: body.update(stop_sequences=stops),
    "completions": lambda body, stops: body.update(stop=stops),
    "infill": lambda body, stops: body.update(stop=stops),
    "api_chat": lambda body, stops: body["options"].update(stop=stops),
    "api_generate": lambda body, stops: body["options"].update(stop=stops),
}


@pytest.mark.parametrize("face", sorted(STOPS))
async def test_more_than_16_stop_sequences_are_refused_on_every_route(make_client, face):
    f = FACES[face]
    fake = engine()
    async with make_client(fake) as client:
        answers = []
        for count in (16, 17):
            body = f.body("Hi", 16, False)
            STOPS[face](body, [f"stop{i}" for i in range(count)])
            answers.append(await client.post(f.path, json=body))
    assert answers[0].status_code == 200, answers[0].text
    assert answers[1].status_code == 400 and "at most 16" in error_message(f.family, answers[1].json())
    assert len(fake.generations) == 1

# -- the pipeline closes the generation itself, whoever else holds the events -----------------


class Frames:
    """A face that frames each event as one line; its events are held by the test too."""

    family = "openai"
    media_type = "text/plain"

    async def frames(self, events):
        async for event in events:
            yield repr(event).encode()

    def error_frames(self, error):
        return []

    async def body(self, events):
        return [event async for event in events]


async def endless():
    from llamad.serve.answer import TextDelta

    while True:
        yield TextDelta("tok")
        await asyncio.sleep(0)


async def test_a_closed_stream_closes_the_answer_events_at_once():
    """A hang-up closes the framed stream; the pipeline then closes the events (which stops
    the generation) itself, not whenever the last reference to them goes."""
    from llamad.serve.observe import RequestRecord
    from llamad.serve.pipeline import framed

    events = endless()  # held here: only an explicit close ends it
    stream = framed(Frames(), events, RequestRecord("r", "POST", "/x"))
    assert await stream.__anext__()
    await stream.aclose()
    assert events.ag_frame is None, "the answer's events were left running"


async def test_a_fold_closes_the_answer_events_however_it_ends():
    """A face's body that stops reading early (or is cancelled) leaves no generation running."""
    from llamad.serve.pipeline import folded

    class FirstOnly(Frames):
        async def body(self, events):
            return await events.__anext__()

    events = endless()
    assert await folded(FirstOnly(), events)
    assert events.ag_frame is None, "the answer's events were left running"
