"""What a model will take in memory before it is loaded, and how much there is.

The estimate reads the GGUF's header only (no tensor data): the weights are the file's
size; the KV cache is n_ctx x parallel cells of every layer's keys and values in the
configured cache types; a fixed margin covers the compute buffers. After a load, the
engine's own figures replace the estimate (`measured`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llamad.config import KV_CACHE_TYPES, Config
from llamad.models.gguf import gguf_header

# Compute buffers, the helper context, the sampler: measured on the demo model at ~40 MiB.
OVERHEAD_BYTES = 64 << 20
# Bytes per KV element by cache type (quantized types: block size / elements per block).
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                    "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}
assert set(KV_ELEMENT_BYTES) == set(KV_CACHE_TYPES)

def estimate_bytes(path: Path, config: Config) -> int:
    """Weights + KV cache + a margin, for `config`'s n_ctx, parallel and cache types, and the
    same for its draft model ([speculative] draft_model), which loads with it."""
    return _model_bytes(path, config, config.model.type_k, config.model.type_v) + draft_bytes(config)


def draft_bytes(config: Config) -> int:
    """A configured draft model's weights and KV cache (llamad.engine.llama_draft: one
    sequence per slot of n_ctx cells, f16 keys and values): 0 without one, or where its file
    cannot be read (the load then fails with the reason)."""
    draft = config.speculative.draft_model
    if not draft:
        return 0
    try:
        return _model_bytes(Path(draft).expanduser(), config, "f16", "f16")
    except OSError:
        return 0


def _model_bytes(path: Path, config: Config, type_k: str, type_v: str) -> int:
    size = path.stat().st_size
    try:
        header = gguf_header(path)
    except (OSError, ValueError):
        return size + OVERHEAD_BYTES
    arch = header.get("general.architecture", "")

    def key(name: str) -> Any:
        return header.get(f"{arch}.{name}")

    layers, embd, heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    if not (layers and embd and heads):
        return size + OVERHEAD_BYTES
    heads_kv = key("attention.head_count_kv") or heads
    k_len = key("attention.key_length") or embd // heads
    v_len = key("attention.value_length") or embd // heads
    m = config.model
    trained = key("context_length") or m.n_ctx
    cells = min(m.n_ctx, trained) * config.server.parallel
    kv = cells * layers * heads_kv * (k_len * KV_ELEMENT_BYTES[type_k] + v_len * KV_ELEMENT_BYTES[type_v])
    return int(size + kv + OVERHEAD_BYTES)


def measured_bytes(engine: Any, estimate: int, draft: int = 0) -> int:
    """A loaded engine's footprint: the file plus the KV cache llama.cpp allocated, plus
    `draft`, its draft model's estimate (llama.cpp's figures are the target's only)."""
    info = getattr(engine, "info", {}) or {}
    kv_mib = info.get("kv_cache_mib")
    path = info.get("path")
    if not isinstance(kv_mib, (int, float)) or not path:
        return estimate
    try:
        size = os.stat(str(path)).st_size
    except OSError:
        return estimate
    return int(size + kv_mib * (1 << 20) + OVERHEAD_BYTES + draft)


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Free memory now: MemAvailable, plus free GPU memory where nvidia-smi reports it (a
    Jetson's GPU shares the RAM, and has no nvidia-smi)."""
    total = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        return None
    smi = shutil.which("nvidia-smi")
    if smi and total is not None:
        try:
            out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            total += sum(int(v) for v in out.split() if v.isdigit()) * (1 << 20)
        except (OSError, subprocess.SubprocessError):
            pass
    return total


def budget_bytes(configured: int | None) -> int | None:
    """router.memory_budget: the configured bytes, or 90% of what is free now; None when
    it cannot be measured (then only router.max_loaded bounds the set)."""
    if configured is not None:
        return configured
    free = available_bytes()
    return int(free * 0.9) if free is not None else None
