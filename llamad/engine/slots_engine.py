"""Engine glue for the step loop (llamad.engine.slots): up to N requests hold the scheduler at
once, each one's text handling runs in a thread of its own and feeds the step loop, which
only decodes."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Iterator

from llamad.engine import Generation, TokenLogprob
from llamad.engine.prompt_cache import PromptStateCache, common_prefix
from llamad.engine.scheduler import Scheduler
from llamad.engine.slots import Backend, Sequence, StepLoop


class SlotsMixin:
    """Engine glue: N requests hold the scheduler at once, each feeding the step loop.

    Mixed in before an Engine subclass; call `_use_slots(n)` in `__init__` and
    `_start_slots(backend)` at the end of `_load`."""

    loop: StepLoop | None = None

    def _use_slots(self, n: int, max_queue: int, queue_timeout: float) -> None:
        self.parallel = n
        self.scheduler = Scheduler(max_queue=max_queue, queue_timeout=queue_timeout, capacity=n)
        # Each admitted request runs the Engine's text handling in a thread of its own; the
        # step loop only decodes.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="llamad-seq")

    def _start_slots(self, backend: Backend, prompt_cache: PromptStateCache | None = None) -> None:
        self.loop = StepLoop(backend, prompt_cache, engine_stats=getattr(self, "stats", None))
        self.loop.start()

    def _decode(self, generation: Generation, cancel: threading.Event) -> Iterator[str | int | TokenLogprob]:
        assert self.loop is not None
        seq = Sequence(generation=generation, cancel=cancel)
        self.loop.submit(seq)
        try:
            while True:
                try:
                    item = seq.out.get(timeout=0.05)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.loop.stop(seq)

    def expected_reuse(self, prompt: Any) -> int:
        """A forecast of the prompt tokens whose KV will be reused (Anthropic's message_start
        reports it before the request is admitted): what the slot the step loop would choose
        now holds of the prompt. Read without the loop's thread, so only a forecast; the
        prompt cache's saved states are not consulted (the loop owns them)."""
        loop = self.loop
        tokens = prompt.tokens
        if loop is None or not tokens:
            return 0
        idle = [slot for slot in loop.slots if slot.sequence is None] or loop.slots
        slot = loop._choose(idle, tokens)  # noqa: SLF001 (pure: it only compares prefixes)
        return max(0, min(common_prefix(list(slot.cached), tokens), len(tokens) - 1))

    @property
    def slot_evictions(self) -> int:
        return self.loop.stats.evictions if self.loop is not None else 0

    def _stop_slots(self) -> None:
        if self.loop is not None:
            self.loop.close()
