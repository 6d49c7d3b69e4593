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

from llamad.config import Config, ConfigError, LoadedConfig, api_keys, file_identity, load_config, sampling_defaults
from llamad.engine import Engine
from llamad.models.catalog import ModelSpec, build_catalog
from llamad.models.pool import ModelPool, Resident

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
    # Models whose loaded engine was replaced, and those taken out of the set.
    swapped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


# Builds the engine for a configuration and a model file (llamad.engine.llama.LlamaEngine, or a fake).
EngineFactory = Callable[[Config, Path], Engine]


def _file_changed(engine: Any, spec: ModelSpec) -> bool:
    """Whether the model's file is another (or was replaced) since the engine loaded it."""
    served = getattr(engine, "model_identity", None)
    return served is not None and file_identity(spec.path) != served


def reconfigure(engine: Any, config: Config) -> None:
    """What a loaded engine takes without a reload of its model: the queue, the sampling
    defaults, [speculative] (for the requests admitted from now on)."""
    engine.scheduler.reconfigure(config.server.max_queue, config.server.queue_timeout)
    engine.default_sampling = sampling_defaults(config)
    configure_speculation = getattr(engine, "configure_speculation", None)
    if configure_speculation is not None:
        configure_speculation(config)


async def reload_service(
    state: Any,
    config_path: str | os.PathLike[str] | None,
    *,
    engine_factory: EngineFactory | None = None,
    set_log_level: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
) -> ReloadResult:
    """Re-reads the configuration into `state` (the app's state: `.loaded` or `.config`,
    `.models` (the pool), `.engine`, optional `.api_keys` holder). Nothing changes unless
    everything checks out: the new set of models is built, every loaded model whose file
    or settings changed is loaded again beside the old one, and only then is it all
    swapped in. A model taken out of the set, or swapped, finishes the requests it holds."""
    old = _current_config(state)
    pool: ModelPool = state.models
    try:
        loaded = load_config(config_path, env=env)
        keys = api_keys(loaded.config)
        catalog = build_catalog(loaded)
    except (ConfigError, OSError) as exc:
        log.error("reload_refused", error=str(exc), kept="running configuration and models")
        return ReloadResult(ok=False, message=str(exc))
    new = loaded.config
    changed = changed_keys(old, new)
    needs_restart = [key for key in changed if key in RESTART_ONLY]
    make = pool.factory if engine_factory is None else (lambda spec: engine_factory(spec.config, spec.path))

    # Which loaded models stay as they are, which load again, which go.
    swaps: dict[str, ModelSpec] = {}
    removed: list[Resident] = []
    for name, resident in list(pool.residents.items()):
        if resident.state == "unloading":  # already on its way out: its unload removes it
            continue
        spec = catalog.models.get(name)
        if spec is None:
            removed.append(resident)
        elif spec.settings() != resident.spec.settings() or _file_changed(resident.engine, spec):
            swaps[name] = spec
    default = catalog.default
    if default.name not in pool.residents and default.name not in swaps:
        swaps[default.name] = default  # a new default is loaded before it is served
    other_file = [
        name for name, spec in swaps.items()
        if name in pool.residents and (pool.residents[name].spec.path != spec.path or _file_changed(pool.residents[name].engine, spec))
    ]
    if other_file or default.name != pool.catalog.default_name:
        changed = changed + ["model file"]  # a file replaced, another file, or another default

    fresh: dict[str, Engine] = {}
    for name, spec in swaps.items():
        log.info("reload_loading_model", model=name, path=str(spec.path))
        engine = make(spec)
        try:
            await engine.load()
        except Exception as exc:
            log.error("reload_refused", error=f"model '{name}' failed to load: {exc}", kept="running configuration and models")
            for made in [*fresh.values(), engine]:
                await asyncio.to_thread(made.close)
            return ReloadResult(ok=False, message=f"model '{name}' failed to load: {exc}", changed=changed)
        fresh[name] = engine

    # Everything checked out: apply it all at once (no awaits from here on until the swap).
    retiring: list[Resident] = []
    for resident in removed:
        del pool.residents[resident.spec.name]
        retiring.append(resident)
    for name, engine in fresh.items():
        before = pool.residents.get(name)
        if before is not None:
            retiring.append(before)
        pool.install(catalog.models[name], engine)
    for name, resident in pool.residents.items():
        if name not in fresh:
            resident.spec = catalog.models[name]
            reconfigure(resident.engine, resident.spec.config)
    pool.catalog = catalog
    if hasattr(state, "engine") and pool.default_engine is not None:
        state.engine = pool.default_engine
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
    log.info("reload_applied", changed=changed, swapped=sorted(fresh), removed=sorted(r.spec.name for r in removed),
             models=list(catalog.models), default=catalog.default_name)
    for resident in retiring:
        # Requests already holding the old engine finish on it; then it is freed.
        task = asyncio.ensure_future(pool.retire(resident, "reload"))
        _background.add(task)
        task.add_done_callback(_background.discard)
    return ReloadResult(
        ok=True,
        message="applied",
        changed=changed,
        model_swapped=bool(fresh),
        needs_restart=needs_restart,
        swapped=sorted(fresh),
        removed=sorted(r.spec.name for r in removed),
    )


def _current_config(state: Any) -> Config:
    loaded = getattr(state, "loaded", None)
    if isinstance(loaded, LoadedConfig):
        return loaded.config
    return state.config


_background: set[asyncio.Task[None]] = set()
