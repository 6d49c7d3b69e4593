"""The request observer: a stalled client cannot hold a stream (and so the engine) forever."""

from __future__ import annotations

import asyncio

import pytest

from llamad.serve.observe import ObserveMiddleware

pytestmark = pytest.mark.asyncio


async def test_a_send_that_blocks_past_the_write_timeout_cancels_the_stream():
    produced = 0
    closed = asyncio.Event()

    async def streaming_app(scope, receive, send):
        nonlocal produced
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                produced += 1
                await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        finally:
            closed.set()

    sent = 0

    async def stalled_client_send(message):
        nonlocal sent
        sent += 1
        if sent > 3:  # the client stops reading: the transport's buffer is full
            await asyncio.sleep(3600)

    async def receive():
        await asyncio.sleep(3600)

    app = ObserveMiddleware(streaming_app, write_timeout=0.2)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await asyncio.wait_for(app(scope, receive, stalled_client_send), timeout=5)
    assert closed.is_set()  # the producer's finally ran: its generation would be cancelled
    assert produced == 3
    assert "stopped reading" in scope["state"]["llamad_record"].error


async def test_request_id_is_echoed_and_bound():
    starts = []

    async def app_(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    async def send(message):
        if message["type"] == "http.response.start":
            starts.append(dict(message["headers"]))

    app = ObserveMiddleware(app_, write_timeout=1)
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": [(b"x-request-id", b"client-123")]}
    await app(scope, None, send)
    assert starts[0][b"request-id"] == b"client-123"


@pytest.mark.parametrize("answer_sent, status", [(False, 499), (True, 200)])
async def test_a_client_that_leaves_after_the_last_event_is_not_a_hang_up(answer_sent, status):
    logged = []

    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"event: response.completed\n\n", "more_body": True})
        scope["state"]["llamad_record"].answer_sent = answer_sent
        # The client closed the connection: the stream ends without its final empty body.

    async def send(message):
        pass

    app = ObserveMiddleware(streaming_app, write_timeout=1)
    app._log = lambda record: logged.append(record.status)
    scope = {"type": "http", "method": "POST", "path": "/v1/responses", "headers": []}
    await app(scope, None, send)
    assert logged == [status]


async def test_a_client_that_leaves_on_the_terminal_frame_while_the_engine_stream_ends_is_not_a_hang_up():
    """Responses' response.completed goes out with the last Finish, before the engine's
    stream is over. Codex closes the connection as soon as it reads it; when the server saw
    that close while the engine's stream was ending, the whole answer was logged as a 499
    (one of two full-prompt Codex runs on SmolLM2). The frames sent after every choice has
    ended now make the answer whole."""
    from llamad.serve.answer import Finish, TextDelta, Usage
    from llamad.serve.pipeline import framed, observed

    logged = []
    terminal_read = asyncio.Event()

    async def engine_events():
        yield TextDelta("OK")
        yield Finish("stop", None, Usage(prompt_tokens=3, completion_tokens=1))
        await asyncio.sleep(0.2)  # the engine's stream ends: its worker lets the slot go

    class Reply:
        family = "openai"

        async def frames(self, events):
            async for event in events:
                kind = "response.completed" if isinstance(event, Finish) else "response.output_text.delta"
                yield f"event: {kind}\n\n".encode()

        def error_frames(self, error):
            return []

    async def streaming_app(scope, receive, send):
        record = scope["state"]["llamad_record"]
        frames = framed(Reply(), observed(record, engine_events()), record)

        async def stream():
            async for frame in frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await send({"type": "http.response.start", "status": 200, "headers": []})
        task = asyncio.create_task(stream())
        await terminal_read.wait()  # the server hears the client close: the stream is stopped
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await frames.aclose()

    async def client_send(message):
        if b"response.completed" in message.get("body", b""):
            terminal_read.set()  # read, and the connection closed

    app = ObserveMiddleware(streaming_app, write_timeout=1)
    app._log = lambda record: logged.append((record.status, record.finish_reason))
    scope = {"type": "http", "method": "POST", "path": "/v1/responses", "headers": []}
    await asyncio.wait_for(app(scope, None, client_send), timeout=5)
    assert logged == [(200, "stop")]
