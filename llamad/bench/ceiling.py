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
