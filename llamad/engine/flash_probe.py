"""The measurement behind model.flash_attn = "auto": decode speed at depth, flash attention
on against off, on the loaded model with the served context's own settings.

Two small one-sequence contexts are made from the model (the KV types and offload of the
served one, its threads), each filled with the same `depth` tokens; then single-token
decode steps alternate between them, so a shared machine that gets busier or quieter
slows both alike. Each figure is the step at the fastest quartile: another job taking a
core only ever adds time (on this project's 2-core machine a step of llama.cpp's spinning
threads then takes 3-10x longer), so the faster steps are the setting's own speed. The fill costs a prompt of `depth`
tokens per setting: that is most of the probe's time.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from llamad.engine.flash_attn import Measurement, ProbeSkipped

# The smallest depth at which the two settings' decode rates part reliably on this
# project's CPU (docs/configuration.md has the figures); the gap widens with depth.
PROBE_DEPTH = 2048
PROBE_STEPS = 24
BATCH = 512
# Token ids the fill cycles through: ordinary ones in every vocabulary that llama.cpp loads.
_FILL_FIRST, _FILL_SPAN = 200, 4000


class _Side:
    """One setting's context, filled to `depth`, and its decode steps."""

    def __init__(self, llm: Any, flash: bool, depth: int, steps: int, threads: int):
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        self.ll = llama_cpp
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = (depth + steps + 255) // 256 * 256 + 256
        params.n_batch = params.n_ubatch = BATCH
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.swa_full = True  # as the served context: sliding-window layers keep every cell
        params.no_perf = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = LlamaContext(model=llm._model, params=params, verbose=False)  # noqa: SLF001
        self.batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        self.position = 0
        self.times: list[float] = []
        self.fill_s = 0.0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)  # noqa: SLF001
        self.span = max(1, min(_FILL_SPAN, n_vocab - _FILL_FIRST))

    def _decode(self, count: int, last_logits: bool) -> None:
        batch = self.batch
        for i in range(count):
            batch.token[i] = _FILL_FIRST + (self.position + i) % self.span
            batch.pos[i] = self.position + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = last_logits and i == count - 1
        batch.n_tokens = count
        code = self.ll.llama_decode(self.context.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} in the flash attention probe")
        self.position += count

    def fill(self, depth: int, deadline: float | None) -> None:
        started = time.perf_counter()
        while self.position < depth:
            if deadline is not None and time.monotonic() > deadline:
                raise ProbeSkipped(f"the {depth}-token fill went past the probe's time budget")
            count = min(BATCH, depth - self.position)
            self._decode(count, last_logits=self.position + count == depth)
        self.fill_s = time.perf_counter() - started

    def step(self) -> None:
        started = time.perf_counter()
        self._decode(1, last_logits=True)
        self.times.append(time.perf_counter() - started)

    def rate(self) -> float:
        ordered = sorted(self.times)
        return 1.0 / ordered[len(ordered) // 4] if ordered else 0.0

    def close(self) -> None:
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        self.context.close()


def measure(llm: Any, threads: int, depth: int = PROBE_DEPTH, steps: int = PROBE_STEPS, budget_s: float | None = None) -> Measurement:
    """Decode tokens/s at `depth` with flash attention on and off, on `llm`'s model
    (a llama_cpp.Llama: its context parameters give the KV types and offload). A setting
    the backend refuses counts 0.0; with `budget_s`, a probe that would run past it raises
    ProbeSkipped."""
    started = time.monotonic()
    deadline = started + budget_s if budget_s is not None else None
    sides: dict[bool, _Side] = {}
    refused: dict[bool, str] = {}
    try:
        for flash in (True, False):
            try:
                sides[flash] = _Side(llm, flash, depth, steps, threads)
            except (ValueError, RuntimeError) as exc:  # llama.cpp would not make this context
                refused[flash] = str(exc)
        if not sides:
            raise ProbeSkipped(f"neither setting made a context: {refused}")
        for side in sides.values():
            side.fill(depth, deadline)
        for _ in range(steps):
            for side in sides.values():
                side.step()
        on, off = sides.get(True), sides.get(False)
        return Measurement(
            depth=depth,
            on_tok_s=on.rate() if on else 0.0,
            off_tok_s=off.rate() if off else 0.0,
            on_prompt_tok_s=depth / on.fill_s if on and on.fill_s else 0.0,
            off_prompt_tok_s=depth / off.fill_s if off and off.fill_s else 0.0,
            seconds=round(time.monotonic() - started, 2),
            measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    finally:
        for side in sides.values():
            side.close()
