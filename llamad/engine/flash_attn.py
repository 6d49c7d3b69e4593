"""Flash attention on or off: the configured setting, or, for "auto", a measurement.

On a CPU the faster setting depends on the machine and the model, and only shows with a
deep KV cache (an agent's 8k-30k tokens): llama.cpp's own "auto" turns it on wherever the
backend has it, which decoded 4x slower than off in one measurement on this project's
CPU and faster in others. So "auto" means measured (llamad.engine.flash_probe): decode speed at
depth with each setting, kept in a small JSON file so the daemon pays for it once per
model file, thread count, offload and llama.cpp build, not at every start.

This module holds the choice and the store, and no llama.cpp: the probe is handed in.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from llamad.config import UNQUANTIZED_KV_TYPES

log = structlog.get_logger("llamad.engine")

STORE_NAME = "flash_attn.json"
STORE_VERSION = 1
# Entries kept in the store: one per model, thread count, offload and build measured.
STORE_MAX_ENTRIES = 32
# Off is chosen when it decodes faster than on by more than the probe's noise. The probe's
# 2,048 tokens under-state the gap agents meet: attention's share of a step grows with depth
# (quiet machine, SmolLM2: off 3.7% ahead at 2,048, 12% at 7,881 in llamad, 29% in
# llama-server), and with the prompt cache an agent's turn reads few new prompt tokens, so
# on's faster prompt reading (1.25x at 2,048) weighs less than decode. A tie goes to on.
OFF_MARGIN = 0.01


@dataclass(frozen=True)
class Measurement:
    """Decode tokens/s at `depth` tokens of KV with flash attention on and off (0.0 where
    that setting could not run), and the prompt-reading rate of the fill for each."""

    depth: int
    on_tok_s: float
    off_tok_s: float
    on_prompt_tok_s: float = 0.0
    off_prompt_tok_s: float = 0.0
    seconds: float = 0.0
    measured_at: str = ""

    def faster(self) -> str:
        if self.on_tok_s <= 0 and self.off_tok_s <= 0:
            raise ValueError("neither setting ran")
        return "off" if self.off_tok_s > self.on_tok_s * (1 + OFF_MARGIN) else "on"


@dataclass(frozen=True)
class FlashAttnChoice:
    setting: str  # model.flash_attn: auto, on, off
    effective: str  # on, off, or auto (not measured: llama.cpp's own choice)
    reason: str
    measurement: Measurement | None = None

    def describe(self) -> dict[str, Any]:
        """What /health's model_info and `llamad check` show."""
        out: dict[str, Any] = {"flash_attn": self.effective, "flash_attn_setting": self.setting, "flash_attn_reason": self.reason}
        if self.measurement is not None:
            m = self.measurement
            out["flash_attn_measured"] = {
                "depth": m.depth, "on_tok_s": round(m.on_tok_s, 1), "off_tok_s": round(m.off_tok_s, 1),
                "on_prompt_tok_s": round(m.on_prompt_tok_s, 1), "off_prompt_tok_s": round(m.off_prompt_tok_s, 1),
                "measured_at": m.measured_at,
            }
        return out


def measurement_key(
    model_identity: tuple[str, int, int] | None, threads: int, n_gpu_layers: int, type_k: str, type_v: str,
    build: str, gpu_offload: bool,
) -> dict[str, Any]:
    """What a measurement is valid for: the model file (path, size, mtime), the threads, the
    offload, the KV types (a quantized K is a different kernel) and the llama.cpp build."""
    path, size, mtime_ns = model_identity or ("", 0, 0)
    return {
        "model": path, "size": size, "mtime_ns": mtime_ns, "threads": threads, "n_gpu_layers": n_gpu_layers,
        "type_k": type_k, "type_v": type_v, "build": build, "gpu_offload": gpu_offload,
    }


def store_path(env: Mapping[str, str] | None = None) -> Path:
    """llamad's cache directory, whatever cache.dir says (that is where prompt states go, and a
    bench or a test gives each server its own): systemd's $CACHE_DIRECTORY (/var/cache/llamad
    under the unit), else $XDG_CACHE_HOME/llamad, else ~/.cache/llamad."""
    env = os.environ if env is None else env
    systemd = env.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd) / STORE_NAME
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "llamad" / STORE_NAME


class MeasurementStore:
    """Measurements in one JSON file. A file that cannot be read or parsed is ignored (and
    replaced at the next save); one that cannot be written leaves the measurement for this
    run only."""

    def __init__(self, path: Path):
        self.path = path

    def _entries(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("flash_attn_store_ignored", path=str(self.path), error=str(exc))
            return []
        if not isinstance(data, dict) or data.get("version") != STORE_VERSION or not isinstance(data.get("entries"), list):
            log.warning("flash_attn_store_ignored", path=str(self.path), error="not a measurement file of this version")
            return []
        return [e for e in data["entries"] if isinstance(e, dict) and isinstance(e.get("key"), dict)]

    def load(self, key: dict[str, Any]) -> Measurement | None:
        for entry in self._entries():
            if entry["key"] == key:
                try:
                    return Measurement(**entry["measurement"])
                except (TypeError, KeyError):
                    log.warning("flash_attn_store_ignored", path=str(self.path), error="a malformed entry")
                    return None
        return None

    def save(self, key: dict[str, Any], measurement: Measurement) -> bool:
        entries = [e for e in self._entries() if e["key"] != key]
        entries.append({"key": key, "measurement": asdict(measurement)})
        text = json.dumps({"version": STORE_VERSION, "entries": entries[-STORE_MAX_ENTRIES:]}, indent=1)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".flash_attn-", suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("flash_attn_store_unwritable", path=str(self.path), error=str(exc))
            return False
        return True


class ProbeSkipped(Exception):
    """The probe did not finish (too slow for its time budget, or a setting would not run);
    its message says why."""


Probe = Callable[[], Measurement]


def choose(
    setting: str, type_v: str, key: dict[str, Any], store: MeasurementStore, probe: Probe, remeasure: bool = False,
) -> FlashAttnChoice:
    """The flash attention the context gets. `probe` runs only for "auto" with no stored
    measurement for `key` (or with `remeasure`); a probe that fails leaves llama.cpp's own
    choice, said in the reason."""
    if type_v not in UNQUANTIZED_KV_TYPES:
        return FlashAttnChoice(setting, "on", f"model.type_v = {type_v}: a quantized V cache needs flash attention")
    if setting in ("on", "off"):
        return FlashAttnChoice(setting, setting, "model.flash_attn")
    if not remeasure:
        stored = store.load(key)
        if stored is not None:
            return FlashAttnChoice(setting, stored.faster(), f"measured at {stored.measured_at}, stored in {store.path}", stored)
    started = time.monotonic()
    try:
        measurement = probe()
        effective = measurement.faster()
    except (ProbeSkipped, RuntimeError, ValueError) as exc:
        log.warning("flash_attn_unmeasured", reason=str(exc), hint="`llamad check` measures it with no time limit")
        return FlashAttnChoice(
            setting, "auto", f"not measured ({exc}): llama.cpp's own choice; `llamad check` measures it and stores the result"
        )
    saved = store.save(key, measurement)
    log.info(
        "flash_attn_measured", depth=measurement.depth, on_tok_s=round(measurement.on_tok_s, 1),
        off_tok_s=round(measurement.off_tok_s, 1), chosen=effective, seconds=round(time.monotonic() - started, 1),
        stored=str(store.path) if saved else None,
    )
    where = f"stored in {store.path}" if saved else "not stored: the file could not be written"
    return FlashAttnChoice(setting, effective, f"measured now, {where}", measurement)
