"""The one request path. Every generating route (chat, messages, responses, completions,
/infill, /api/chat, /api/generate) translates its request into a `ModelRequest` and hands
it here with a `Reply`, the face's framing; everything every face needs happens here, once:

    plan tools -> prepare the prompt(s) -> clamp max_tokens -> admit (the bounded queue,
    before any response byte) -> log content (logging.log_content) -> stream or fold
    -> usage and metrics (the request's record) -> a hang-up is a 499 with the slot freed
    -> an error after the headers is the family's error frame

A face supplies data and pure functions only: `Reply.frames` turns answer events into wire
frames, `Reply.body` folds them into one body, `Reply.error_frames` says an error inside a
stream, and `Reply.family` picks the error shape (llamad.serve.errors).
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Protocol

import structlog
from litestar import Request, Response
from litestar.response import Stream

from llamad import tools
from llamad.engine import ContextOverflow, Engine, Generation, NoFimTokens, Prompt, Sampling
from llamad.engine.chat import Chat
from llamad.serve import sse
from llamad.serve.answer import AnswerEvent, ChoiceStart, Finish, Keepalive, ToolParser, answer_events
from llamad.serve.body import unless_disconnected
from llamad.serve.errors import ApiError, from_exception
from llamad.serve.models import engine_for
from llamad.serve.observe import RequestRecord, record_of, with_content_logged
from llamad.serve.budget import BudgetedEngine
from llamad.serve.request import (
    MAX_STOPS,
    UNLIMITED,
    InfillPrompt,
    InvalidRequest,
    ModelRequest,
    RawPrompt,
    SPECULATIVE_HEADER,
    TextPrompt,
    TokenPrompt,
    speculative_choice,
    template_switches,
)

log = structlog.get_logger("llamad.request")


class Reply(Protocol):
    """A face's framing of one answer."""

    family: str  # "openai" | "anthropic" | "ollama": the error shape
    media_type: str  # of a streamed answer

    def frames(self, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[bytes]:
        """The streamed answer: wire frames for the events, in order."""
        ...

    def error_frames(self, error: ApiError) -> list[bytes]:
        """What ends a stream that failed after its headers went out."""
        ...

    async def body(self, events: AsyncIterator[AnswerEvent]) -> Any:
        """The non-streamed answer: the same events, folded."""
        ...


@dataclass
class Prepared:
    """The request as the engine will run it: what a face may put in its first frames."""

    model_id: str
    prompts: list[Prompt]
    generations: list[Generation]  # one per choice, in order
    parsers: list[ToolParser | None]
    expected_reuse: int = 0  # prompt tokens the KV cache is expected to reuse (a forecast)
    count_tokens: Callable[[str], int] = field(default=lambda text: 0)
    split_reasoning: bool = True
    # What a request gets for the sampling settings it leaves out ([sampling] in the TOML).
    default_sampling: Sampling = field(default_factory=Sampling)
    # Tokens the reasoning may take before it is closed (llamad.serve.budget); None: no limit.
    thinking_budget: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(g.prompt.tokens) for g in self.generations)


async def serve(request: Request, ask: ModelRequest, reply_for: Callable[[Prepared], Reply], stream: bool) -> Response:
    """Answers `ask` on the engine that serves `request`, streamed or folded by the face's
    reply. Errors before the first byte are raised (the app's handler answers them in the
    family's shape, with the status a balancer may retry)."""
    engine: Engine = await engine_for(request, ask.model, keep_alive=ask.keep_alive)
    ask.speculative = speculative_choice(request.headers.get(SPECULATIVE_HEADER), ask.speculative)
    prepared = await prepare(engine, ask, request.app.state.config.limits)
    record = record_of(request)
    record.prompt_tokens = prepared.prompt_tokens
    record.choices = len(prepared.generations)
    reply = reply_for(prepared)
    # The first choice is admitted (or refused) before any response byte.
    first = await admitted(_events(engine, prepared, 0, ask.keep_reasoning))
    events = observed(record, _choices(engine, prepared, ask.keep_reasoning, first))
    events = with_content_logged(request, "\n\n".join(p.text for p in prepared.prompts), events)
    if stream:
        return Stream(framed(reply, events, record), media_type=reply.media_type, headers=sse.HEADERS)  # SSE and NDJSON alike
    return Response(await unless_disconnected(request, folded(reply, events)))


async def count_prompt(request: Request, ask: ModelRequest) -> int:
    """The size of the prompt `ask` would give the model (tools included), generating
    nothing: a prompt past the context is still counted (the client asked how big it is)."""
    engine: Engine = await engine_for(request, ask.model)
    try:
        prepared = await prepare(engine, ask, request.app.state.config.limits, counting=True)
    except ContextOverflow as exc:
        return exc.prompt_tokens
    return prepared.prompt_tokens


# -- preparation -----------------------------------------------------------------------------


async def prepare(engine: Engine, ask: ModelRequest, limits: Any, counting: bool = False) -> Prepared:
    """Tools planned, prompts rendered and tokenized, one Generation per choice. `counting`:
    only the prompt's size is wanted, so the grammar is not compiled."""
    if len(ask.stop) > MAX_STOPS:
        raise InvalidRequest(f"'{ask.stop_param}' may hold at most {MAX_STOPS} sequences", param=ask.stop_param)
    engine.require_ready()
    grammar, make_parser = _plan_tools(engine, ask)
    checked = None if counting else grammar
    if ask.chat is not None:
        # rendered with them: the model's configured defaults, under the request's own
        switches = {**engine.default_template_switches, **ask.chat.switches, **template_switches(ask)}
        chat = replace(ask.chat, switches=switches)
        prompts = [await engine.prepare(chat, checked)]
    else:
        prompts = [await _raw_prompt(engine, item, checked) for item in ask.prompts]
    context = min(ask.n_ctx, engine.n_ctx) if ask.n_ctx else engine.n_ctx
    generations: list[Generation] = []
    for prompt in prompts:
        if len(prompt.tokens) >= context:
            raise ContextOverflow(len(prompt.tokens), context)
        for _ in range(ask.n):
            generations.append(
                Generation(
                    prompt=prompt,
                    max_tokens=clamp_max_tokens(ask, limits, len(prompt.tokens), context),
                    sampling=ask.sampling,
                    stop=ask.stop,
                    grammar=grammar,
                    logprobs=ask.logprobs,
                    ignore_eos=ask.ignore_eos,
                    speculative=ask.speculative,
                )
            )
    return Prepared(
        model_id=engine.model_id,
        prompts=prompts,
        generations=generations,
        parsers=[make_parser() for _ in generations],
        expected_reuse=engine.expected_reuse(prompts[0]) if len(prompts) == 1 else 0,
        count_tokens=engine.count_tokens,
        split_reasoning=ask.chat is not None,
        default_sampling=engine.default_sampling,
        thinking_budget=ask.thinking_budget,
    )


def clamp_max_tokens(ask: ModelRequest, limits: Any, prompt_tokens: int, context: int) -> int:
    """The one clamp: what the request asked (or its face's default, or the server's),
    capped by limits.max_tokens_hard_cap and by the room the context leaves; at least 1."""
    if ask.max_tokens is None:
        wanted = ask.default_max_tokens if ask.default_max_tokens is not None else limits.default_max_tokens
    elif ask.max_tokens == UNLIMITED:
        wanted = limits.max_tokens_hard_cap
    else:
        wanted = ask.max_tokens
    return max(1, min(wanted, limits.max_tokens_hard_cap, context - prompt_tokens))


def _plan_tools(engine: Engine, ask: ModelRequest) -> tuple[str | None, Callable[[], ToolParser | None]]:
    """The grammar and parser for tools and structured output (a raw prompt can ask for a
    format too); the chat gets the tool prompt when its template does not render tools."""
    use = ask.tools
    chat = ask.chat if ask.chat is not None else Chat(messages=[])
    try:
        return tools.apply(
            chat,
            tools.ToolChoice(use.mode, name=use.name),
            parallel=use.parallel,
            response_format=use.response_format,
            template_supports_tools=engine.template_supports_tools,
            id_prefix=use.id_prefix,
            tool_format=engine.tool_format,
        )
    except tools.ToolHistoryError as exc:
        raise InvalidRequest(str(exc), param=ask.history_param) from None


async def _raw_prompt(engine: Engine, item: RawPrompt, grammar: str | None) -> Prompt:
    if isinstance(item, InfillPrompt):
        try:
            return await engine.prepare_infill(item.prefix, item.suffix, item.extra, item.middle, grammar=grammar)
        except NoFimTokens:
            raise InvalidRequest(
                f"'{item.param}' asks for fill-in-the-middle, but this model's vocabulary has no FIM tokens "
                "(prefix/suffix/middle); serve a code model that has them (e.g. Qwen2.5-Coder, CodeGemma, "
                "StarCoder2) or send the prompt without a suffix",
                param=item.param,
            ) from None
    if isinstance(item, TokenPrompt):
        return await engine.prepare_tokens(item.tokens, text=engine.detokenize(item.tokens), grammar=grammar)
    assert isinstance(item, TextPrompt)
    return await engine.prepare_text(item.text, grammar=grammar)


# -- admission and the answer's events ----------------------------------------------------------


def _events(engine: Engine, prepared: Prepared, index: int, keep_reasoning: bool) -> AsyncIterator[AnswerEvent]:
    if prepared.thinking_budget is not None and prepared.split_reasoning:
        engine = BudgetedEngine(engine, prepared.thinking_budget)  # type: ignore[assignment]
    return answer_events(
        engine, prepared.generations[index], keep_reasoning, prepared.parsers[index], split_reasoning=prepared.split_reasoning
    )


async def admitted(events: AsyncIterator[AnswerEvent]) -> AsyncIterator[AnswerEvent]:
    """Pulls the first event, which comes as soon as the request is admitted to the engine
    queue, so a full queue raises Overloaded before any response header is sent. That first
    keep-alive only means "admitted" and is not passed on: each face's first frames already
    tell the client the answer has begun."""
    try:
        first = await events.__anext__()
    except BaseException:
        await events.aclose()
        raise

    async def chained() -> AsyncIterator[AnswerEvent]:
        try:
            if not isinstance(first, Keepalive):
                yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return chained()


async def _choices(
    engine: Engine, prepared: Prepared, keep_reasoning: bool, first: AsyncIterator[AnswerEvent]
) -> AsyncIterator[AnswerEvent]:
    """Every choice's events in turn (several prompts, or n > 1), each after a ChoiceStart
    when there is more than one; later choices queue for the engine like any request."""
    several = len(prepared.generations) > 1
    for index in range(len(prepared.generations)):
        events = first if index == 0 else await admitted(_events(engine, prepared, index, keep_reasoning))
        if several:
            yield ChoiceStart(index, prepared.generations[index].prompt)
        async with aclosing(events) as stream:
            async for event in stream:
                yield event


async def observed(record: RequestRecord, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[AnswerEvent]:
    """The request's record follows the answer: its first token, and each choice's usage
    (the log line and /metrics read it)."""
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, Finish):
                record.finish(event)
            elif not isinstance(event, (Keepalive, ChoiceStart)):
                record.first_token()
            yield event


async def framed(reply: Reply, events: AsyncIterator[AnswerEvent], record: RequestRecord) -> AsyncIterator[bytes]:
    """The face's frames, with an error after the headers sent as the family's error frame.
    Once the face's last frame has gone out the answer is whole: a client that closes the
    connection then (Codex does, on response.completed) has not hung up."""
    # Closing the events (a hang-up closes this generator) stops the generation at once.
    async with aclosing(events), aclosing(reply.frames(events)) as frames:
        try:
            async for frame in frames:
                # Once every choice has its end, what goes out closes the answer (Responses'
                # response.completed comes with the last Finish, before the engine's stream
                # is over): its sending makes the answer whole (llamad.serve.observe). Marked
                # only here, at the end of this generator, a client that closed on it (Codex)
                # was seen to leave while the engine's stream ended, and its whole answer
                # logged as a 499.
                if record.finished >= record.choices:
                    record.answer_ending = True
                yield frame
        except Exception as exc:  # after the headers: the error travels in the stream
            error = from_exception(exc, reply.family)
            if error.kind == "server":
                log.exception("stream_failed")
            record.fail(error)
            for frame in reply.error_frames(error):
                yield frame
            return
    record.answer_sent = True


async def folded(reply: Reply, events: AsyncIterator[AnswerEvent]) -> Any:
    """The face's body of the whole answer; cancelled (a hang-up), the generation stops."""
    async with aclosing(events):
        return await reply.body(events)
