"""The engine alone: what llama.cpp's batched decode gives on this machine, with no server.

`llamad bench --llama-server` compares llamad with llama-server; both sit on the same
`llama_decode`. This phase times that call by itself through llamad's own slots backend
(the same context settings: threads, batch, KV, flash attention): N sequences, one new
token each per step, sampled greedily. Its "N streams / 1 stream" is the ceiling any
server over this build can reach for that ratio here; a server's own ratio is read
against it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llamad.config import LoadedConfig
from llamad.engine.types import Generation, Prompt, Sampling

PROMPT_TOKENS = 32


def decode_rates(loaded: LoadedConfig, model: Path, streams: tuple[int, ...] = (1, 2, 4, 8), steps: int = 64) -> dict[str, Any]:
    """Tokens per second of `streams` sequences decoding together, each timed over `steps`
    steps (decode and sample), in a context with max(streams) slots."""
    import msgspec

    from llamad.engine.llama import LlamaEngine

    config = loaded.config
    n_slots = max(streams)
    # The served engine itself, with as many slots as the widest phase; its step loop idles.
    engine = LlamaEngine(
        msgspec.structs.replace(  # no disk cache ([cache]): nothing here is worth keeping
            config, server=msgspec.structs.replace(config.server, parallel=n_slots), cache=msgspec.structs.replace(config.cache, max_bytes=0)
        ),
        model,
    )
    engine._load()  # noqa: SLF001 (loaded here without a server around it)
    backend = engine.backend
    assert backend is not None
    try:
        rates = {}
        for n in streams:
            rates[n] = _rate(backend, n, steps)
        return {
            "tokens_per_s": {str(n): rate for n, rate in rates.items()},
            "ratio_4_over_1": rates[4] / rates[1] if 4 in rates and 1 in rates else None,
            "threads": engine.info.get("n_threads"),
            "steps": steps,
        }
    finally:
        engine.close()


def _rate(backend: Any, n: int, steps: int) -> float:
    vocab_tokens = range(1000, 1000 + PROMPT_TOKENS)
    greedy = Generation(prompt=Prompt(text="", tokens=list(vocab_tokens)), max_tokens=steps, sampling=Sampling(temperature=0.0, repeat_penalty=1.0))
    samplers = [backend.new_sampler(greedy) for _ in range(n)]
    try:
        # Each sequence's prompt in one batch, then `steps` steps of one token per sequence.
        tokens, positions, slots, outputs = [], [], [], []
        for slot in range(n):
            backend.forget(slot, 0)
            for position, token in enumerate(vocab_tokens):
                tokens.append(token)
                positions.append(position)
                slots.append(slot)
                outputs.append(position == PROMPT_TOKENS - 1)
        if backend.decode(tokens, positions, slots, outputs) != 0:
            raise RuntimeError("the engine-alone phase found no KV room")
        indexes = [i for i, wanted in enumerate(outputs) if wanted]
        last = [backend.sample(samplers[slot], indexes[slot]) for slot in range(n)]
        started = time.perf_counter()
        for step in range(steps):
            position = PROMPT_TOKENS + step
            if backend.decode(last, [position] * n, list(range(n)), [True] * n) != 0:
                raise RuntimeError("the engine-alone phase found no KV room")
            last = [backend.sample(samplers[slot], slot) for slot in range(n)]
        elapsed = time.perf_counter() - started
    finally:
        for slot in range(n):
            backend.forget(slot, 0)
        for sampler in samplers:
            backend.free_sampler(sampler)
    return n * steps / elapsed


def verify_rates(loaded: LoadedConfig, model: Path, text: str, widths: tuple[int, ...], steps: int = 12) -> dict[str, Any]:
    """What checking a draft costs, the engine alone: one sequence holds `text`'s tokens (a
    raw prompt), then steps
    of `width` entries with logits on every one (a next token and `width - 1` drafted ones,
    as the step loop feeds them), each row's greedy token taken, the entries rolled back after
    each step. The median step's `width / seconds` is the rate one stream reaches if every
    drafted token is kept: the ceiling of a speculating server's decode on this machine, for
    drafts of `width - 1` tokens (on a CPU a checked token is compute, not a free ride on the
    weights' read: see docs/benchmark.md). Width 1 is a plain step."""
    import msgspec

    from llamad.engine.llama import LlamaEngine

    config = loaded.config
    engine = LlamaEngine(msgspec.structs.replace(config, cache=msgspec.structs.replace(config.cache, max_bytes=0)), model)
    engine._load()  # noqa: SLF001 (loaded here without a server around it)
    backend = engine.backend
    assert backend is not None
    prompt = engine.tokenize(text, True, True)
    greedy = Generation(prompt=Prompt(text="", tokens=prompt), max_tokens=1, sampling=Sampling(temperature=0.0, repeat_penalty=1.0))
    sampler = backend.new_sampler(greedy)
    rates: dict[str, float] = {}
    step_ms: dict[str, float] = {}
    try:
        backend.forget(0, 0)
        for at in range(0, len(prompt), backend.n_batch):
            chunk = prompt[at : at + backend.n_batch]
            if backend.decode(chunk, list(range(at, at + len(chunk))), [0] * len(chunk), [False] * len(chunk)) != 0:
                raise RuntimeError("the verification phase found no KV room")
        n = len(prompt)
        times: dict[int, list[float]] = {width: [] for width in widths}
        for _ in range(steps):  # the widths in turn, round by round: a machine's drift moves all alike
            for width in widths:
                fed = (prompt * (width // max(1, n) + 1))[:width]  # what is fed does not change the cost
                started = time.perf_counter()
                if backend.decode(fed, list(range(n, n + width)), [0] * width, [True] * width) != 0:
                    raise RuntimeError("the verification phase found no KV room")
                for i in range(width):
                    backend.sample(sampler, i)
                times[width].append(time.perf_counter() - started)
                backend.forget(0, n)
        for width, taken in times.items():
            median = sorted(taken)[len(taken) // 2]
            rates[str(width)] = width / median
            step_ms[str(width)] = 1000 * median
    finally:
        backend.forget(0, 0)
        backend.free_sampler(sampler)
        engine.close()
    return {"context_tokens": len(prompt), "tokens_per_s": rates, "step_ms": step_ms, "steps": steps}
