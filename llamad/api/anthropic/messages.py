"""Anthropic Messages routes: /v1/messages (and /think, /clean) and count_tokens.

A request is translated into the neutral request (llamad.api.anthropic.request) and runs
on the one request path (llamad.serve.pipeline); the answer events go through the
`MessageStream` state machine (llamad.api.anthropic.stream): framed for a stream, folded
for a plain response."""

from __future__ import annotations

from typing import Any, AsyncIterator

from litestar import Request, Response, Router, post

from llamad.api.anthropic.request import MessagesRequest, to_request, wants_thinking
from llamad.api.anthropic.stream import MessageStream, cleaned, fold_message
from llamad.serve import pipeline, sse
from llamad.serve.answer import AnswerEvent
from llamad.serve.body import decode_body, read_body
from llamad.serve.errors import ApiError, anthropic_body
from llamad.serve.pipeline import Prepared


class MessageReply:
    """Messages framing: the stream's named events, or the folded message."""

    family = "anthropic"
    media_type = "text/event-stream"

    def __init__(self, message: MessageStream, clean: bool):
        self.message = message
        self.clean = clean

    async def wire(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        if self.clean:
            events = cleaned(events)
        for wire in self.message.start():
            yield wire
        async for event in events:
            for wire in self.message.feed(event):
                yield wire

    async def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        async for kind, payload in self.wire(events):
            yield sse.event_frame(kind, payload)

    def error_frames(self, error: ApiError) -> list[bytes]:
        return [sse.event_frame("error", anthropic_body(error))]

    async def body(self, events: AsyncIterator[AnswerEvent]) -> dict[str, Any]:
        return fold_message([wire async for wire in self.wire(events)])


async def create_message(request: Request, route: str) -> Response:
    """route: "messages" (reasoning only when `thinking` asks), "think" or "clean"."""
    req = decode_body(await read_body(request), MessagesRequest)
    keep_reasoning = route == "think" or (route == "messages" and wants_thinking(req))
    ask = to_request(req, request.app.state.config.limits.max_messages, keep_reasoning)

    def reply(prepared: Prepared) -> MessageReply:
        message = MessageStream(
            model=prepared.model_id, input_tokens=prepared.prompt_tokens, expected_reuse=prepared.expected_reuse
        )
        return MessageReply(message, clean=route == "clean")

    return await pipeline.serve(request, ask, reply, stream=req.stream)


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
    req = decode_body(await read_body(request), MessagesRequest)
    ask = to_request(req, request.app.state.config.limits.max_messages, keep_reasoning=False, counting=True)
    return {"input_tokens": await pipeline.count_prompt(request, ask)}


router = Router(
    path="/",
    route_handlers=[messages, messages_think, messages_clean, count_tokens],
)
