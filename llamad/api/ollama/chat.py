"""Ollama's native API (/api/*), which Home Assistant, Open WebUI and several editor plugins
speak: a translation onto the same pipeline as the other faces (Chat -> tools.apply ->
engine.prepare -> Generation -> answer events), framed as NDJSON or folded into one object.

Replies carry the model name the client asked for (Ollama echoes it); the listings
(version, tags, show, ps) are in llamad.api.ollama.models. Errors are `{"error": "..."}` (llamad.serve.errors.ollama_body), also inside a stream.
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Sequence

import msgspec
from litestar import Request, Response, Router, post
from litestar.response import Stream

from llamad.api.openai import logprobs as openai_logprobs

from llamad import tools
from llamad.serve.answer import (
    Answer,
    AnswerEvent,
    FoldedCall,
    Finish,
    Keepalive,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolParser,
    admitted,
    answer_events,
    fold,
)
from llamad.engine.chat import Chat
from llamad.engine import ContextOverflow, Engine, Generation, Prompt, TokenLogprob
from llamad.serve.errors import from_exception, ollama_body
from llamad.api.llama_server.infill import infill_prompt
from llamad.serve.observe import engine_of, record_of
from llamad.api.ollama.models import iso
from llamad.api.ollama.request import (
    ChatRequest,
    Common,
    GenerateRequest,
    context_of,
    generate_chat,
    logprobs_of,
    max_tokens_of,
    response_format_of,
    sampling_of,
    stops_of,
    to_chat,
    wants_thinking,
)
from llamad.serve.body import decode_body, read_body, unless_disconnected
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


class Reply:
    """One answer: chat replies carry `message`, generate replies `response`."""

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
            payload["logprobs"] = openai_logprobs.token_objects(logprobs)
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

    def loaded(self) -> dict[str, Any]:
        """Ollama's answer to an empty prompt: the model is loaded, nothing generated."""
        payload = self.piece()
        payload.update(done=True, done_reason="load")
        return payload

    def folded(self, answer: Answer, keep_reasoning: bool) -> dict[str, Any]:
        assert answer.finish is not None
        calls = [tool_call_of(c, i) for i, c in enumerate(answer.tool_calls)]
        payload = self.last(answer.finish, text=answer.text, thinking=answer.reasoning if keep_reasoning else "", calls=calls)
        if self.logprobs:
            payload["logprobs"] = openai_logprobs.token_objects(answer.logprobs)
        return payload


async def ndjson_frames(events: AsyncIterator[AnswerEvent], reply: Reply, request: Request) -> AsyncIterator[bytes]:
    record = record_of(request)
    open_calls: dict[int, FoldedCall] = {}
    async with aclosing(events) as stream:
        try:
            admission = True
            async for event in stream:
                if isinstance(event, Keepalive):
                    # NDJSON has no comments: an empty piece keeps proxies and clients
                    # waiting (not for the admission itself, only while really queued).
                    if not admission:
                        yield ndjson_line(reply.piece())
                    admission = False
                    continue
                admission = False
                if isinstance(event, TextDelta):
                    record.first_token()
                    yield ndjson_line(reply.piece(text=event.text, logprobs=event.logprobs))
                elif isinstance(event, ReasoningDelta):
                    record.first_token()
                    yield ndjson_line(reply.piece(thinking=event.text))
                elif isinstance(event, ToolCallStart):
                    record.first_token()
                    open_calls[event.index] = FoldedCall(id=event.id, name=event.name)
                elif isinstance(event, ToolCallDelta):
                    open_calls[event.index].arguments += event.arguments
                elif isinstance(event, ToolCallEnd) and event.index in open_calls:
                    # Ollama sends each call whole, arguments parsed, in one piece.
                    call = open_calls.pop(event.index)
                    yield ndjson_line(reply.piece(calls=[tool_call_of(call, event.index)]))
                elif isinstance(event, Finish):
                    record.finish(event)
                    rest = [tool_call_of(c, i) for i, c in sorted(open_calls.items())]
                    yield ndjson_line(reply.last(event, calls=rest))
                    return
        except Exception as exc:  # after the headers: the error travels in the stream
            error = from_exception(exc, "ollama")
            record.fail(error)
            yield ndjson_line(ollama_body(error))


# -- the shared steps of /api/chat and /api/generate ------------------------------------------


async def answer(
    request: Request,
    engine: Engine,
    req: Common,
    prompt: Prompt,
    grammar: str | None,
    parser: ToolParser | None,
    reply: Reply,
    split_reasoning: bool = True,
) -> Response:
    limits = request.app.state.config.limits
    context = context_of(req.options, engine.n_ctx)
    if len(prompt.tokens) >= context:
        raise ContextOverflow(len(prompt.tokens), context)
    record = record_of(request)
    record.prompt_tokens = len(prompt.tokens)
    generation = Generation(
        prompt=prompt,
        max_tokens=max(1, min(max_tokens_of(req.options, limits), context - len(prompt.tokens))),
        sampling=sampling_of(req.options),
        stop=stops_of(req.options),
        grammar=grammar,
        logprobs=logprobs_of(req),
    )
    reply.logprobs = generation.logprobs is not None
    keep_reasoning = wants_thinking(req.think)
    events = await admitted(answer_events(engine, generation, keep_reasoning, parser, split_reasoning=split_reasoning))
    if req.stream:
        return Stream(ndjson_frames(events, reply, request), media_type=NDJSON, headers={"Cache-Control": "no-cache"})
    folded = await unless_disconnected(request, fold(events))
    record.finish(folded.finish)
    return Response(reply.folded(folded, keep_reasoning))


def plan_format(chat: Chat, req: Common, engine: Engine) -> tuple[str | None, ToolParser]:
    """Tools (when offered) and `format`, through the one tools layer every face uses."""
    return tools.apply(
        chat,
        tools.ToolChoice("auto"),
        parallel=True,
        response_format=response_format_of(req.format),
        template_supports_tools=engine.template_supports_tools,
        id_prefix="call_",
    )


@post("/api/chat", status_code=200)
async def api_chat(request: Request) -> Response:
    engine: Engine = engine_of(request)
    req = decode_body(await read_body(request), ChatRequest)
    reply = Reply(req.model or engine.model_id, chat=True, started=record_of(request).started)
    response_format_of(req.format)  # a bad format is a 400 even with nothing to answer
    if not req.messages:
        engine.require_ready()  # "loaded" must be true
        return Response(reply.loaded())
    chat = to_chat(req, request.app.state.config.limits.max_messages)
    grammar, parser = plan_format(chat, req, engine)
    prompt = await engine.prepare(chat, grammar)
    return await answer(request, engine, req, prompt, grammar, parser, reply)


@post("/api/generate", status_code=200)
async def api_generate(request: Request) -> Response:
    engine: Engine = engine_of(request)
    req = decode_body(await read_body(request), GenerateRequest)
    reply = Reply(req.model or engine.model_id, chat=False, started=record_of(request).started)
    response_format_of(req.format)
    if not req.prompt and not req.suffix:
        engine.require_ready()
        return Response(reply.loaded())
    if req.suffix or req.raw:
        # No template: fill in the middle (the model's FIM tokens), or the text as it is,
        # and the output is text as it comes (no <think> splitting).
        grammar, parser = plan_format(Chat(messages=[]), req, engine)
        if req.suffix:
            prompt = await infill_prompt(engine, req.prompt, req.suffix, param="suffix", grammar=grammar)
        else:
            prompt = await engine.prepare_text(req.prompt, grammar=grammar)
        return await answer(request, engine, req, prompt, grammar, parser, reply, split_reasoning=False)
    chat = generate_chat(req)
    grammar, parser = plan_format(chat, req, engine)
    prompt = await engine.prepare(chat, grammar)
    return await answer(request, engine, req, prompt, grammar, parser, reply)


router = Router(path="/", route_handlers=[api_chat, api_generate])
