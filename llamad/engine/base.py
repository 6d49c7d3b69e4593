"""The engine: one model, its lock, and generation as a stream of typed events.

The request and event types live in llamad.engine.types (and are importable from here).
`Engine` holds everything that does not depend on llama.cpp: the scheduler (the lock for
`capacity` generations at once and its bounded FIFO queue), the worker threads that keep
inference off the event loop, cancellation, stop sequences and token limits. A subclass
supplies three things: `load`, `prepare` (chat -> prompt tokens) and `decode` (prompt -> one
text piece per token). The real subclass is `LlamaEngine` (llamad.engine.llama), whose
`decode` feeds the step loop (llamad.engine.slots); the fast tests use a fake with the same
three methods, so everything here is exercised by both tiers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

import anyio

from llamad.engine.background import LoadPriority, serving_started, serving_stopped
from llamad.engine.chat import Chat
from llamad.engine.prompt_cache import shared_head
from llamad.engine.types import (  # the types are part of this module's interface too
    EngineNotReady,
    ContextOverflow,
    PromptError,
    GrammarRejected,
    NoFimTokens,
    Cancelled,
    Prompt,
    FimTokens,
    SAMPLING_DEFAULTS,
    Sampling,
    Generation,
    Waiting,
    Started,
    Token,
    TokenLogprob,
    Done,
    EngineEvent,
    TokenOutOfRange,
    check_token_ids,
)
from llamad.engine.logprobs import Aligner
from llamad.engine.scheduler import Overloaded, QueueTimeout, Scheduler, ShuttingDown
from llamad.engine.stops import find_stop, held_back

T = TypeVar("T")

__all__ = [
    "Engine",
    "EngineNotReady",
    "ContextOverflow",
    "Overloaded",
    "QueueTimeout",
    "ShuttingDown",
    "Prompt",
    "Sampling",
    "Generation",
    "Waiting",
    "Started",
    "Token",
    "TokenLogprob",
    "Done",
    "EngineEvent",
    "GrammarRejected",
    "NoFimTokens",
    "PromptError",
    "TokenOutOfRange",
    "check_token_ids",
]



KEEPALIVE_S = 5.0


KEEPALIVE = object()  # queued by KeepaliveTimer: nothing came from the worker for a while


class KeepaliveTimer:
    """Puts KEEPALIVE into `events` whenever KEEPALIVE_S pass without an event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
        self.loop = loop
        self.events = events
        self.last = loop.time()
        self.handle = loop.call_later(KEEPALIVE_S, self._check)

    def saw_event(self) -> None:
        self.last = self.loop.time()  # cheap: the timer reads it when it fires

    def _check(self) -> None:
        idle = self.loop.time() - self.last
        if idle >= KEEPALIVE_S:
            self.events.put_nowait(KEEPALIVE)
            self.last = self.loop.time()
            idle = 0.0
        self.handle = self.loop.call_later(KEEPALIVE_S - idle, self._check)

    def stop(self) -> None:
        self.handle.cancel()


@dataclass
class EngineStats:
    """What the engine did, counted as it happens (read by llamad.serve.metrics)."""

    requests: int = 0  # generations that reached their end
    prompt_tokens: int = 0  # prompts the engine took; a request the queue refused is not here
    # Prompt tokens evaluated, bumped per prompt step (a subclass's _decode does it), so a
    # prompt cut short by a hang-up counts only what was evaluated.
    prompt_tokens_evaluated: int = 0
    # Bumped per decoded token, so a generation that is cancelled still counts its tokens.
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused instead of evaluated
    cache_lookups: int = 0
    cache_hits: int = 0  # prompts that reused more than `Engine.shared_head` tokens
    cancelled: int = 0  # stopped early because the consumer went away (hang-up, stall, shutdown)
    # Speculation (llamad.engine.speculative): draft tokens fed, and those the sampler kept.
    draft_tokens: int = 0
    draft_accepted: int = 0
    failed: int = 0  # stopped by an error


class Engine:
    """Base class: the scheduling, threading and text handling shared by every engine."""

    def __init__(
        self, model_id: str, n_ctx: int, max_queue: int = 16, queue_timeout: float = 60.0, capacity: int = 1
    ):
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.state = "loading"
        self.error: str | None = None
        self.info: dict[str, object] = {}
        # `capacity` generations hold the engine at once (server.parallel for the real one).
        self.scheduler = Scheduler(max_queue=max_queue, queue_timeout=queue_timeout, capacity=capacity)
        self.stats = EngineStats()
        # One worker thread per generation held: each runs its request's text handling
        # (`_generate`) over the `_decode` that feeds it, and `exclusively`'s work.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="llamad-engine")
        self._running: threading.Event | None = None
        # Requests that took this engine and are not over yet (llamad.serve.observe.engine_of).
        self.holders = 0
        self._counted_serving = False  # in llamad.engine.background's count of engines serving
        self.load_priority: LoadPriority | None = None
        # Prompt tokens every prompt starts with (BOS, the template's opening): reusing only
        # these is no cache hit. Measured on load (`_measure_shared_head`).
        self.shared_head = 0
        # What a request gets for the sampling settings it leaves out ([sampling] in the TOML).
        self.default_sampling = SAMPLING_DEFAULTS
        # The template variables a request's own switches go over (model.chat_template_kwargs).
        self.default_template_switches: dict[str, Any] = {}

    # -- what a subclass supplies -------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _prepare(self, chat: Chat) -> Prompt:
        raise NotImplementedError

    def _serve(self) -> None:
        """Starts what decodes (a step loop's thread) once `_load` is done. It runs on the
        event loop's thread, not the load's: a thread inherits its creator's priority, and
        the load's lowered one could not be raised again without privileges."""

    def _check_grammar(self, grammar: str) -> None:
        """Raises GrammarRejected if the engine cannot compile `grammar`."""

    def _decode(self, generation: Generation, cancel: threading.Event) -> Iterator[str | int | TokenLogprob]:
        """Yields, once the prompt is evaluated, the number of prompt tokens reused from
        the cache (an int), then one text piece per generated token (a str, possibly
        empty while a multi-byte character is incomplete; a TokenLogprob carrying that
        text when `generation.logprobs` asks for it). Ends at end-of-generation.
        Checks `cancel` between tokens and between prompt batches."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    # -- raw text and tokens (legacy completions, fill-in-the-middle, /tokenize, Ollama's raw
    # generate); a subclass that cannot supply one leaves it raising NotImplementedError.
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> token ids, no chat template. `add_special` adds the model's BOS (when
        its vocabulary wants one); `parse_special` reads "<start_of_turn>" as one token."""
        raise NotImplementedError

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        """Each token's bytes (a piece may hold part of a multi-byte character)."""
        raise NotImplementedError

    @property
    def n_vocab(self) -> int:
        raise NotImplementedError

    def fim_tokens(self) -> FimTokens | None:
        """The vocabulary's fill-in-the-middle tokens, or None when it has none."""
        return None

    @property
    def embed_max_tokens(self) -> int:
        """The longest input `embed` takes, in tokens."""
        return self.n_ctx

    def describe(self) -> dict[str, Any]:
        """What the GGUF says about itself, for model listings (Ollama's /api/show):
        architecture, parameter_count, size_label, quantization, embedding_length,
        context_length, chat_template (the template text, or "")."""
        return {}

    def _embed(self, batch: list[list[int]]) -> list[list[float]]:
        """One pooled, L2-normalised vector per token sequence, computed in batches (runs on
        the worker thread, with the engine held)."""
        raise NotImplementedError

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_pieces(tokens)).decode("utf-8", errors="replace")

    @property
    def template_supports_tools(self) -> bool:
        """Whether the chat template renders the offered tools itself; when it does not, the
        API faces put llamad's own tool prompt into the system message."""
        return False

    @property
    def tool_format(self):
        """The model family's tool-call format and reasoning markers (a
        llamad.tools.formats.ToolFormat, detected at load from the chat template and the
        special tokens); Hermes until a model is loaded or when the template has no tools."""
        from llamad.engine.tool_formats import HERMES

        return getattr(self, "_tool_format", None) or HERMES

    # -- lifecycle --------------------------------------------------------------------------
    async def load(self) -> None:
        # The load runs on a thread of its own at a lower priority, so the models that serve
        # meanwhile keep their cores (llamad.engine.background).
        self.load_priority = LoadPriority.for_load()
        try:
            _, self.shared_head = await self.load_priority.run(self._load, self._measure_shared_head)
        except Exception as exc:  # the reason reaches /health and the log, not a traceback
            self.state = "failed"
            self.error = str(exc) or exc.__class__.__name__
            raise
        self._serve()
        self.state = "ready"
        serving_started()
        self._counted_serving = True

    async def unload(self) -> None:
        """`close`, as a load runs: on a thread at a lower priority, since saving the slots
        to the disk cache and freeing the context are work beside the models that serve."""
        self._stop_counting()
        await LoadPriority.for_load().run(self.close)

    def _measure_shared_head(self) -> int:
        return shared_head(self._prepare)

    def _stop_counting(self) -> None:
        if self._counted_serving:
            self._counted_serving = False
            serving_stopped()

    def close(self) -> None:
        self._stop_counting()
        self.scheduler.close()
        if self._running is not None:
            self._running.set()
        self._worker.shutdown(wait=True, cancel_futures=True)

    @property
    def generating(self) -> bool:
        return self.scheduler.busy

    # -- the request path -----------------------------------------------------------------
    def require_ready(self) -> None:
        if self.state != "ready":
            raise EngineNotReady(self.state)

    async def prepare(self, chat: Chat, grammar: str | None = None) -> Prompt:
        """Renders and tokenizes a chat, and checks that the engine can compile `grammar`
        (no lock needed: both only read the vocabulary)."""
        self.require_ready()

        def work() -> Prompt:
            if grammar is not None:
                self._check_grammar(grammar)
            return self._prepare(chat)

        prompt = await asyncio.to_thread(work)
        if len(prompt.tokens) >= self.n_ctx:
            raise ContextOverflow(len(prompt.tokens), self.n_ctx)
        return prompt

    def expected_reuse(self, prompt: Prompt) -> int:
        """How many of the prompt's tokens the KV cache would reuse if it ran now: a forecast
        for headers sent before the engine is ours (the `Done` event has the real count)."""
        return 0

    async def prepare_tokens(self, tokens: list[int], text: str = "", grammar: str | None = None) -> Prompt:
        """A prompt given as token ids (raw text, or fill-in-the-middle): no chat template.
        Raises TokenOutOfRange for an id the vocabulary does not have."""
        self.require_ready()
        if not tokens:
            raise PromptError("the prompt is empty: send at least one token")
        check_token_ids(tokens, self.n_vocab)
        if grammar is not None:
            await asyncio.to_thread(self._check_grammar, grammar)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(len(tokens), self.n_ctx)
        return Prompt(text=text, tokens=tokens)

    async def prepare_text(self, text: str, add_special: bool = True, grammar: str | None = None) -> Prompt:
        """Raw prompt text (no chat template) -> Prompt."""
        self.require_ready()
        tokens = await asyncio.to_thread(self.tokenize, text, add_special, True)
        return await self.prepare_tokens(tokens, text, grammar)

    async def prepare_infill(
        self, prefix: str, suffix: str, extra: str = "", middle: str = "", grammar: str | None = None
    ) -> Prompt:
        """Fill-in-the-middle in the model's own FIM tokens, prefix-suffix-middle order as
        llama.cpp's server writes them: [BOS] <PRE> extra+prefix <SUF> suffix <MID> middle; the
        answer continues the middle. `extra` is context from other files (llama-server's
        input_extra), put before the prefix; `middle` is text the middle already starts with.
        Raises NoFimTokens when the vocabulary has none."""
        self.require_ready()  # the vocabulary is read below
        fim = self.fim_tokens()
        if fim is None:
            raise NoFimTokens()

        def tokens() -> list[int]:
            bos = self.tokenize("", add_special=True, parse_special=False)
            # The user's code is text: "<|fim_prefix|>" typed in a file stays characters.
            before = self.tokenize(extra + prefix, add_special=False, parse_special=False)
            after = self.tokenize(suffix, add_special=False, parse_special=False)
            started = self.tokenize(middle, add_special=False, parse_special=False) if middle else []
            return bos + [fim.prefix] + before + [fim.suffix] + after + [fim.middle] + started

        ids = await asyncio.to_thread(tokens)
        return await self.prepare_tokens(ids, text=prefix, grammar=grammar)

    async def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """Pooled vectors for token sequences, behind the same queue as generation (the
        model is one; an embedding request waits its turn like a chat does)."""
        self.require_ready()
        for tokens in sequences:
            check_token_ids(tokens, self.n_vocab)
        return await self.exclusively(lambda: self._embed(sequences))

    async def exclusively(self, work: Callable[[], T]) -> T:
        """Runs `work` on the worker thread while holding the engine (queued FIFO with
        generations, bounded by max_queue and queue_timeout like them)."""
        self.require_ready()
        queued_at = time.monotonic()
        waiter = None if self.scheduler.try_acquire() else self.scheduler.enqueue()
        admitted = waiter is None
        try:
            if waiter is not None:
                remaining = self.scheduler.deadline() - time.monotonic()
                done, _ = await asyncio.wait({waiter}, timeout=max(remaining, 0))
                if not done:
                    raise QueueTimeout(time.monotonic() - queued_at)
                waiter.result()
                admitted = True
            future = asyncio.get_running_loop().run_in_executor(self._worker, work)
            # The engine is handed on only once the worker is done with the model.
            with anyio.CancelScope(shield=True):
                return await future
        finally:
            if admitted:
                self.scheduler.release()
            elif waiter is not None:
                self.scheduler.abandon(waiter)

    async def stream(self, generation: Generation) -> AsyncIterator[EngineEvent]:
        """Waits for the engine (yielding `Waiting` now and then), then streams tokens.

        Closing the iterator early (client gone) stops the generation within one decode
        step and hands the engine to the next waiter.
        """
        self.require_ready()
        generation = replace(generation, sampling=generation.sampling.resolved(self.default_sampling))
        queued_at = time.monotonic()
        if self.scheduler.try_acquire():
            admitted = True
        else:
            # Raises Overloaded at once when the queue is full: the caller primes this
            # iterator before sending headers, so that becomes a plain 429/529.
            waiter = self.scheduler.enqueue()
            admitted = False
        try:
            yield Waiting(position=0 if admitted else self.scheduler.queue_depth)
            if not admitted:
                deadline = self.scheduler.deadline()
                while not waiter.done():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueTimeout(time.monotonic() - queued_at)
                    await asyncio.wait({waiter}, timeout=min(KEEPALIVE_S, remaining))
                    if not waiter.done():
                        yield Waiting(position=self.scheduler.queue_depth)
                waiter.result()  # raises ShuttingDown if the queue was closed
                admitted = True
            async for event in self._run(generation, queued_s=time.monotonic() - queued_at):
                yield event
        finally:
            if admitted:
                self.scheduler.release()
            else:
                self.scheduler.abandon(waiter)

    async def _run(self, generation: Generation, queued_s: float) -> AsyncIterator[EngineEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()  # EngineEvent, BaseException, None or KEEPALIVE
        cancel = threading.Event()
        self._running = cancel

        def emit(item: EngineEvent | BaseException | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def work() -> None:
            try:
                self._generate(generation, cancel, emit, queued_s)
            except Cancelled:
                pass
            except BaseException as exc:
                emit(exc)
            finally:
                emit(None)

        future = loop.run_in_executor(self._worker, work)
        # Keep-alives while the worker is quiet (a long prompt evaluation): one timer per
        # generation that re-arms itself, rather than a timeout around every token's wait.
        quiet = KeepaliveTimer(loop, events)
        finished = failed = False
        try:
            while True:
                item = await events.get()
                quiet.saw_event()
                if item is KEEPALIVE:
                    yield Waiting(position=0)  # long prompt evaluation: keep the client alive
                    continue
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    failed = True
                    raise item
                if isinstance(item, Done):
                    # The generation is complete: a consumer that stops reading now (a
                    # stream that ends on the finish event) has cancelled nothing.
                    finished = True
                yield item
        finally:
            quiet.stop()
            if failed:
                self.stats.failed += 1
            elif not finished:
                cancel.set()
                self.stats.cancelled += 1
            # The lock is released only once the worker has stopped touching the model. The
            # shielded scope keeps a cancelled caller (anyio re-delivers cancellation at
            # every await) from skipping this wait.
            with anyio.CancelScope(shield=True):
                await future
            self._running = None

    def _generate(self, generation: Generation, cancel: threading.Event, emit, queued_s: float) -> None:
        prompt_tokens = len(generation.prompt.tokens)
        stops = [s for s in generation.stop if s]
        template_stops = [] if generation.ignore_eos else generation.prompt.template_stops
        all_stops = stops + [s for s in template_stops if s and s not in stops]
        longest_stop = max((len(s) for s in all_stops), default=0)
        started = time.monotonic()
        first_token_at: float | None = None
        cached = 0
        completion_tokens = 0
        pending = ""  # text held back because it may be the start of a stop sequence
        finish_reason = "stop"
        stop_sequence: str | None = None
        stats = self.stats
        stats.prompt_tokens += prompt_tokens
        # Token entries travel with the text that completes them (only when asked for).
        aligner = Aligner() if generation.logprobs is not None else None

        def release(text: str) -> None:
            entries = aligner.release(len(text)) if aligner else ()
            if text or entries:
                emit(Token(text, entries))

        pieces = self._decode(generation, cancel)
        try:
            for piece in pieces:
                if not isinstance(piece, int):
                    stats.completion_tokens += 1  # decoded, whether or not anyone reads it
                if cancel.is_set():
                    raise Cancelled()
                if isinstance(piece, int):
                    cached = piece
                    stats.cache_lookups += 1
                    stats.cached_tokens += cached
                    stats.cache_hits += cached > self.shared_head
                    emit(Started(prompt_tokens, cached, queued_s, time.monotonic() - started))
                    continue
                if isinstance(piece, TokenLogprob):
                    if aligner:
                        aligner.add(piece)
                    piece = piece.text
                completion_tokens += 1
                if first_token_at is None:
                    first_token_at = time.monotonic()
                pending += piece
                if all_stops:
                    hit = find_stop(pending, all_stops)
                    if hit is not None:
                        index, matched = hit
                        entries = aligner.end(index) if aligner else ()
                        if index or entries:
                            emit(Token(pending[:index], entries))
                        pending = ""
                        aligner = None
                        stop_sequence = matched if matched in stops else None
                        break
                    ready = len(pending) - held_back(pending, all_stops, longest_stop)
                    if aligner:
                        ready = aligner.whole(ready)
                    if ready > 0:
                        release(pending[:ready])
                        pending = pending[ready:]
                elif pending or aligner:
                    release(pending)
                    pending = ""
                if completion_tokens >= generation.max_tokens:
                    finish_reason = "length"
                    break
            else:
                if cancel.is_set():
                    raise Cancelled()
                if prompt_tokens + completion_tokens >= self.n_ctx:
                    finish_reason = "length"
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        if pending or (aligner and aligner.waiting):
            release(pending)
        now = time.monotonic()
        stats.requests += 1
        emit(
            Done(
                finish_reason=finish_reason,
                stop_sequence=stop_sequence,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_tokens=cached,
                time_to_first_token_s=(first_token_at - started + queued_s) if first_token_at else None,
                decode_s=(now - first_token_at) if first_token_at else 0.0,
            )
        )
