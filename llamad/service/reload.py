"""`systemctl reload llamad` (SIGHUP): re-read the TOML and apply what can change live.

A model change loads the new model beside the old one and swaps it in, the old engine
finishing the requests it already holds. A config with an error is refused with one log
line and the running configuration stays.

The engine class comes from the caller (the CLI passes llamad.engine.llama.LlamaEngine), so neither this
module nor llamad.service.systemd imports llama.cpp; the sd_notify side of a reload (RELOADING=1,
READY=1) is llamad.service.systemd's.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from llamad.config import Config, ConfigError, LoadedConfig, api_keys, file_identity, load_config, resolve_model, sampling_defaults
from llamad.engine import Engine

log = structlog.get_logger("llamad.reload")

# Settings only a restart can apply (the socket is bound, the app is built).
RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.max_body_bytes",
    "server.write_timeout",  # the response observer and uvicorn took their values at start
    "server.shutdown_grace",
    "logging.format",
    "cache.dir",  # the engine opened its disk cache at load
    "cache.max_bytes",
)


def _flat(config: Config) -> dict[str, Any]:
    import msgspec

    out: dict[str, Any] = {}
    for section, values in msgspec.to_builtins(config).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    before, after = _flat(old), _flat(new)
    return sorted(key for key in after if before.get(key) != after.get(key))


@dataclass
class ReloadResult:
    ok: bool
    message: str
    changed: list[str] = field(default_factory=list)
    model_swapped: bool = False
    needs_restart: list[str] = field(default_factory=list)


# Builds the engine for a configuration and a model file (llamad.engine.llama.LlamaEngine, or a fake).
EngineFactory = Callable[[Config, Path], Engine]


def _model_file_changed(engine: Any, loaded: LoadedConfig) -> bool:
    """Whether the configuration now resolves to another model file than the engine serves."""
    served = getattr(engine, "model_identity", None)
    if served is None:
        return False
    try:
        choice = resolve_model(loaded)
    except (ConfigError, OSError):
        return True  # let the model path of the reload report what is wrong
    return file_identity(choice.path) != served


async def retire_engine(engine: Any, poll_s: float = 0.2) -> None:
    """Closes a swapped-out engine once the requests it holds (running, queued, or still
    reading their body and preparing their prompt) are done."""
    while engine.scheduler.busy or engine.scheduler.queue_depth or getattr(engine, "holders", 0):
        await asyncio.sleep(poll_s)
    await asyncio.to_thread(engine.close)
    log.info("engine_retired", model=getattr(engine, "model_id", "?"))


async def reload_service(
    state: Any,
    config_path: str | os.PathLike[str] | None,
    *,
    engine_factory: EngineFactory,
    set_log_level: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> ReloadResult:
    """Re-reads the configuration into `state` (the app's state: `.loaded` or `.config`,
    `.engine`, optional `.api_keys` holder). Nothing changes unless everything checks out."""
    old = _current_config(state)
    try:
        loaded = load_config(config_path, env=env)
        keys = api_keys(loaded.config)
    except (ConfigError, OSError) as exc:
        log.error("reload_refused", error=str(exc), kept="running configuration")
        return ReloadResult(ok=False, message=str(exc))
    new = loaded.config
    changed = changed_keys(old, new)
    needs_restart = [key for key in changed if key in RESTART_ONLY]
    # server.parallel shapes the engine's context: a change loads a new engine, like a model change.
    model_changed = any(key.startswith("model.") or key == "server.parallel" for key in changed)
    model_changed = model_changed or getattr(state, "engine", None) is None
    if not model_changed and _model_file_changed(getattr(state, "engine", None), loaded):
        # Same settings, other file: a new .gguf in model.dir, or the served file replaced.
        model_changed = True
        changed = changed + ["model file"]

    new_engine = None
    if model_changed:
        try:
            choice = resolve_model(loaded)
        except (ConfigError, OSError) as exc:
            log.error("reload_refused", error=str(exc), kept="running configuration and model")
            return ReloadResult(ok=False, message=str(exc), changed=changed)
        log.info("reload_loading_model", path=str(choice.path), reason=choice.reason)
        new_engine = engine_factory(new, choice.path)
        try:
            await new_engine.load()
        except Exception as exc:
            log.error("reload_refused", error=f"new model failed to load: {exc}", kept="running model")
            await asyncio.to_thread(new_engine.close)
            return ReloadResult(ok=False, message=str(exc), changed=changed)

    # Everything checked out: apply it all at once (no awaits from here on until the swap).
    old_engine = getattr(state, "engine", None)
    if new_engine is not None:
        state.engine = new_engine
    elif old_engine is not None:
        old_engine.scheduler.reconfigure(new.server.max_queue, new.server.queue_timeout)
        old_engine.default_sampling = sampling_defaults(new)
        configure_speculation = getattr(old_engine, "configure_speculation", None)
        if configure_speculation is not None:  # [speculative]: for the requests admitted from now on
            configure_speculation(new)
    if isinstance(getattr(state, "loaded", None), LoadedConfig):
        state.loaded = loaded
    if hasattr(state, "config"):
        state.config = new
    holder = getattr(state, "api_keys", None)
    if holder is not None and hasattr(holder, "replace"):
        holder.replace(keys, require_for_metrics=new.server.metrics_require_key)
    if set_log_level is not None and old.logging.level != new.logging.level:
        set_log_level(new.logging.level)

    if needs_restart:
        log.warning("reload_needs_restart", keys=needs_restart, hint="systemctl restart llamad applies them")
    log.info("reload_applied", changed=changed, model_swapped=new_engine is not None)
    if new_engine is not None and old_engine is not None:
        # Requests already holding the old engine finish on it; then it is freed.
        task = asyncio.ensure_future(retire_engine(old_engine))
        _background.add(task)
        task.add_done_callback(_background.discard)
    return ReloadResult(
        ok=True,
        message="applied",
        changed=changed,
        model_swapped=new_engine is not None,
        needs_restart=needs_restart,
    )


def _current_config(state: Any) -> Config:
    loaded = getattr(state, "loaded", None)
    if isinstance(loaded, LoadedConfig):
        return loaded.config
    return state.config


_background: set[asyncio.Task[None]] = set()
