"""Anthropic Messages routes: /v1/messages (and /think, /clean) and count_tokens.

A request is translated into the shared Chat (llamad.api.anthropic.request); the reply is the
answer events of llamad.serve.answer run through the `MessageStream` state machine
(llamad.api.anthropic.stream): framed for a stream, folded for a plain response — one code
path."""

from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

import structlog
from litestar import Request, Response, Router, post
from litestar.response import Stream

from llamad.serve import sse
from llamad.api.anthropic.request import (
    MessagesRequest,
    max_tokens_of,
    prepare,
    sampling_of,
    stop_sequences_of,
    wants_thinking,
)
from llamad.api.anthropic.stream import MessageStream, WireEvent, cleaned, fold_message
from llamad.serve.answer import AnswerEvent, Finish, Keepalive, PlainText, admitted, answer_events
from llamad.config import LimitsConfig
from llamad.engine import ContextOverflow, Engine, Generation
from llamad.serve.errors import ApiError, anthropic_body, from_exception
from llamad.serve.observe import engine_of, record_of, with_content_logged
from llamad.serve.body import decode_body, read_body, unless_disconnected

log = structlog.get_logger("llamad.api.anthropic.messages")

# -- answers ---------------------------------------------------------------------------------


def prompt_too_long(exc: ContextOverflow) -> ApiError:
    """Anthropic's own wording, which Claude Code matches exactly (then it compacts the
    conversation); the maximum leaves room for one generated token."""
    return ApiError(
        400,
        f"prompt is too long: {exc.prompt_tokens} tokens > {exc.n_ctx - 1} maximum",
        "invalid_request",
        param="messages",
        code="context_length_exceeded",
    )


async def wire_events(
    events: AsyncIterator[AnswerEvent], message: MessageStream, request: Request
) -> AsyncIterator[WireEvent]:
    record = record_of(request)
    async with aclosing(events) as stream:
        for wire in message.start():
            yield wire
        async for event in stream:
            if isinstance(event, Finish):
                record.finish(event)
            elif not isinstance(event, Keepalive):
                record.first_token()
            for wire in message.feed(event):
                yield wire


async def stream_frames(wire: AsyncIterator[WireEvent], request: Request) -> AsyncIterator[bytes]:
    async with aclosing(wire) as stream:
        try:
            async for kind, payload in stream:
                yield sse.event_frame(kind, payload)
        except Exception as exc:  # after the headers: the error travels in the stream
            error = from_exception(exc, "anthropic")
            if error.kind == "server":
                log.exception("stream_failed")
            record_of(request).fail(error)
            yield sse.event_frame("error", anthropic_body(error))


async def collect(wire: AsyncIterator[WireEvent]) -> list[WireEvent]:
    async with aclosing(wire) as stream:
        return [item async for item in stream]


async def create_message(request: Request, route: str) -> Response:
    """route: "messages" (reasoning only when `thinking` asks), "think" or "clean"."""
    engine: Engine = engine_of(request)
    limits: LimitsConfig = request.app.state.config.limits
    req = decode_body(await read_body(request), MessagesRequest)
    max_tokens = max_tokens_of(req, limits.max_tokens_hard_cap)
    sampling = sampling_of(req)
    prepared = prepare(req, engine, limits)
    keep_reasoning = route == "think" or (route == "messages" and wants_thinking(req))

    try:
        prompt = await engine.prepare(prepared.chat, prepared.plan.grammar)
    except ContextOverflow as exc:
        raise prompt_too_long(exc) from None
    record_of(request).prompt_tokens = len(prompt.tokens)
    generation = Generation(
        prompt=prompt,
        max_tokens=engine.clamp_max_tokens(max_tokens, prompt),
        sampling=sampling,
        stop=stop_sequences_of(req),
        grammar=prepared.plan.grammar,
    )
    events = await admitted(answer_events(engine, generation, keep_reasoning, prepared.plan.parser or PlainText()))
    if route == "clean":
        events = cleaned(events)
    events = with_content_logged(request, prompt.text, events)
    message = MessageStream(
        model=engine.model_id, input_tokens=len(prompt.tokens), expected_reuse=engine.expected_reuse(prompt)
    )
    wire = wire_events(events, message, request)
    if req.stream:
        return Stream(stream_frames(wire, request), media_type="text/event-stream", headers=sse.HEADERS)
    return Response(fold_message(await unless_disconnected(request, collect(wire))))


# -- routes ----------------------------------------------------------------------------------


@post("/v1/messages", status_code=200)
async def messages(request: Request) -> Response:
    return await create_message(request, "messages")


@post("/v1/messages/think", status_code=200)
async def messages_think(request: Request) -> Response:
    return await create_message(request, "think")


@post("/v1/messages/clean", status_code=200)
async def messages_clean(request: Request) -> Response:
    return await create_message(request, "clean")


@post("/v1/messages/count_tokens", status_code=200)
async def count_tokens(request: Request) -> dict[str, int]:
    engine: Engine = engine_of(request)
    req = decode_body(await read_body(request), MessagesRequest)
    prepared = prepare(req, engine, request.app.state.config.limits)
    try:
        prompt = await engine.prepare(prepared.chat)
    except ContextOverflow as exc:  # still a count: the client asked how big it is
        return {"input_tokens": exc.prompt_tokens}
    return {"input_tokens": len(prompt.tokens)}


router = Router(
    path="/",
    route_handlers=[messages, messages_think, messages_clean, count_tokens],
)
