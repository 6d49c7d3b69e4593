"""Ollama's native API (/api/*), which Home Assistant, Open WebUI and several editor plugins
speak: a translation into the neutral request, run on the one request path
(llamad.serve.pipeline), and answer events framed as NDJSON or folded into one object.

Replies carry the model name the client asked for (Ollama echoes it); the listings
(version, tags, show, ps) are in llamad.api.ollama.models. Errors are `{"error": "..."}` (llamad.serve.errors.ollama_body), also inside a stream.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Sequence

import msgspec
from litestar import Request, Response, Router, post

from llamad.api.logprobs import token_objects
from llamad.api.ollama.models import iso
from llamad.api.ollama.request import (
    ChatRequest,
    Common,
    GenerateRequest,
    generate_chat,
    response_format_of,
    to_chat,
    to_request,
)
from llamad.engine import TokenLogprob
from llamad.serve import pipeline
from llamad.serve.answer import (
    Answer,
    AnswerEvent,
    Finish,
    FoldedCall,
    Keepalive,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    fold,
)
from llamad.serve.body import decode_body, read_body
from llamad.serve.errors import ApiError, ollama_body
from llamad.serve.models import engine_for, keep_alive_of, pool_of
from llamad.serve.observe import record_of
from llamad.serve.pipeline import Prepared
from llamad.serve.request import InfillPrompt, ModelRequest, TextPrompt
from llamad.tools.json_repair import close_json

NDJSON = "application/x-ndjson"
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}
_encoder = msgspec.json.Encoder()


def ndjson_line(payload: Any) -> bytes:
    return _encoder.encode(payload) + b"\n"


def ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


# -- replies ---------------------------------------------------------------------------------


def tool_call_of(call: FoldedCall, index: int) -> dict[str, Any]:
    """A call as Ollama writes it: arguments as a JSON object, not a string."""
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:  # cut off by the token limit: close it
        closed = close_json(call.arguments.strip())
        arguments = json.loads(closed) if closed else {}
    if not isinstance(arguments, dict):
        arguments = {}
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments}}


class Pieces:
    """One answer's objects: chat replies carry `message`, generate replies `response`."""

    def __init__(self, model: str, chat: bool, started: float):
        self.model = model
        self.chat = chat
        self.started = started
        self.logprobs = False  # the request asked for them: text pieces carry their tokens'

    def piece(
        self, text: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None, logprobs: Sequence[TokenLogprob] = ()
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "created_at": iso()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            payload["message"] = message
        else:
            payload["response"] = text
            if thinking:
                payload["thinking"] = thinking
        if logprobs:
            payload["logprobs"] = token_objects(logprobs)
        payload["done"] = False
        return payload

    def last(self, finish: Finish, **content: Any) -> dict[str, Any]:
        payload = self.piece(**content)
        payload.update(self.counts(finish))
        return payload

    def counts(self, finish: Finish) -> dict[str, Any]:
        # prompt_eval_duration is the time to the first token (queue wait included).
        return {
            "done": True,
            "done_reason": DONE_REASONS.get(finish.reason, finish.reason),
            "total_duration": ns(time.monotonic() - self.started),
            "load_duration": 0,  # the model is loaded once, at start
            "prompt_eval_count": finish.usage.prompt_tokens,
            "prompt_eval_duration": ns(finish.time_to_first_token_s),
            "eval_count": finish.usage.completion_tokens,
            # Clients divide by it for tokens/s.
            "eval_duration": max(ns(finish.decode_s), 1),
        }

    def loaded(self, reason: str = "load") -> dict[str, Any]:
        """Ollama's answer to an empty prompt: the model is loaded ("load") or unloaded
        ("unload", keep_alive 0), nothing generated."""
        payload = self.piece()
        payload.update(done=True, done_reason=reason)
        return payload

    def folded(self, answer: Answer, keep_reasoning: bool) -> dict[str, Any]:
        assert answer.finish is not None
        calls = [tool_call_of(c, i) for i, c in enumerate(answer.tool_calls)]
        payload = self.last(answer.finish, text=answer.text, thinking=answer.reasoning if keep_reasoning else "", calls=calls)
        if self.logprobs:
            payload["logprobs"] = token_objects(answer.logprobs)
        return payload


class OllamaReply:
    """Ollama framing: NDJSON pieces, or the folded object."""

    family = "ollama"
    media_type = NDJSON

    def __init__(self, pieces: Pieces, keep_reasoning: bool):
        self.pieces = pieces
        self.keep_reasoning = keep_reasoning

    async def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        pieces = self.pieces
        open_calls: dict[int, FoldedCall] = {}
        async for event in events:
            if isinstance(event, Keepalive):
                # NDJSON has no comments: an empty piece keeps proxies and clients waiting.
                yield ndjson_line(pieces.piece())
            elif isinstance(event, TextDelta):
                yield ndjson_line(pieces.piece(text=event.text, logprobs=event.logprobs))
            elif isinstance(event, ReasoningDelta):
                yield ndjson_line(pieces.piece(thinking=event.text))
            elif isinstance(event, ToolCallStart):
                open_calls[event.index] = FoldedCall(id=event.id, name=event.name)
            elif isinstance(event, ToolCallDelta):
                open_calls[event.index].arguments += event.arguments
            elif isinstance(event, ToolCallEnd) and event.index in open_calls:
                # Ollama sends each call whole, arguments parsed, in one piece.
                call = open_calls.pop(event.index)
                yield ndjson_line(pieces.piece(calls=[tool_call_of(call, event.index)]))
            elif isinstance(event, Finish):
                rest = [tool_call_of(c, i) for i, c in sorted(open_calls.items())]
                yield ndjson_line(pieces.last(event, calls=rest))

    def error_frames(self, error: ApiError) -> list[bytes]:
        return [ndjson_line(ollama_body(error))]

    async def body(self, events: AsyncIterator[AnswerEvent]) -> dict[str, Any]:
        return self.pieces.folded(await fold(events), self.keep_reasoning)


async def answer(request: Request, req: Common, ask: ModelRequest, chat: bool) -> Response:
    started = record_of(request).started

    def reply(prepared: Prepared) -> OllamaReply:
        pieces = Pieces(req.model or prepared.model_id, chat=chat, started=started)
        pieces.logprobs = ask.logprobs is not None
        return OllamaReply(pieces, ask.keep_reasoning)

    return await pipeline.serve(request, ask, reply, stream=req.stream)


async def loaded(request: Request, req: Common, chat: bool) -> Response:
    """Ollama's load idiom (an empty request): the model is loaded, nothing generated; with
    keep_alive 0 it is unloaded instead (once the requests it is serving are done)."""
    keep_alive = keep_alive_of(req.keep_alive)
    started = record_of(request).started
    if keep_alive == 0:
        spec = pool_of(request).route(req.model)
        await pool_of(request).expire(spec.name)
        return Response(Pieces(req.model or spec.name, chat=chat, started=started).loaded("unload"))
    engine = await engine_for(request, req.model, keep_alive=keep_alive)
    engine.require_ready()
    return Response(Pieces(req.model or engine.model_id, chat=chat, started=started).loaded())


@post("/api/chat", status_code=200)
async def api_chat(request: Request) -> Response:
    req = decode_body(await read_body(request), ChatRequest)
    response_format_of(req.format)  # a bad format is a 400 even with nothing to answer
    if not req.messages:
        return await loaded(request, req, chat=True)
    ask = to_request(req, to_chat(req, request.app.state.config.limits.max_messages))
    return await answer(request, req, ask, chat=True)


@post("/api/generate", status_code=200)
async def api_generate(request: Request) -> Response:
    req = decode_body(await read_body(request), GenerateRequest)
    response_format_of(req.format)
    if not req.prompt and not req.suffix:
        return await loaded(request, req, chat=False)
    if req.suffix:
        # Fill in the middle in the model's FIM tokens; no template, text as it comes.
        ask = to_request(req, None, [InfillPrompt(req.prompt, req.suffix, param="suffix")])
    elif req.raw:
        ask = to_request(req, None, [TextPrompt(req.prompt)])
    else:
        ask = to_request(req, generate_chat(req))
    return await answer(request, req, ask, chat=False)


router = Router(path="/", route_handlers=[api_chat, api_generate])
