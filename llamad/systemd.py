"""Living under systemd: readiness, status and watchdog notifications, and reload on SIGHUP.

`Notifier` speaks the sd_notify protocol (one datagram to `$NOTIFY_SOCKET`, abstract
sockets written with a leading '@') without libsystemd. Outside systemd every call is a
no-op, so the serve loop calls it unconditionally.

`reload_service` is what `systemctl reload llamad` (SIGHUP) runs: it re-reads the TOML and
applies what can change live; a model change loads the new model beside the old one and
swaps it in, the old engine finishing the requests it already holds. A config with an
error is refused with one log line and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from llamad.config import Config, ConfigError, LoadedConfig, api_keys, load_config, resolve_model

log = structlog.get_logger("llamad.systemd")

# Sent while the model loads so a large model never trips TimeoutStartSec.
EXTEND_TIMEOUT_S = 60.0


class Notifier:
    """sd_notify(3) without libsystemd: a datagram to the socket systemd names."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace socket
        self.address = address
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *assignments: str) -> bool:
        """Sends `KEY=value` lines in one datagram; False when not under systemd or it failed."""
        if not self.address:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return False
        return True

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def ready(self, status: str = "ready") -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings systemd expects, or None when the watchdog is off."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    return int(usec) / 1_000_000


async def watchdog_loop(notifier: Notifier) -> None:
    """Pings from the event loop itself: a loop blocked longer than WatchdogSec stops
    pinging and systemd restarts the service (Restart=on-failure covers watchdog kills)."""
    if notifier.watchdog_s is None:
        return
    interval = max(notifier.watchdog_s / 3, 0.05)
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def status_line(engine: Any) -> str:
    """One line for `systemctl status`: state, requests served, queue."""
    if engine is None:
        return "no model configured; set model.path in /etc/llamad.toml and restart"
    state = getattr(engine, "state", "?")
    if state != "ready":
        error = getattr(engine, "error", None)
        return f"model {state}" + (f": {error}" if error else "")
    stats = engine.stats
    queue = engine.scheduler.queue_depth
    busy = "generating" if engine.scheduler.busy else "idle"
    return f"ready, {busy}; served {stats.requests} requests; {queue} queued; model {engine.model_id}"


async def supervise(
    server: Any,
    state: Any,
    config_path: str | os.PathLike[str] | None,
    *,
    set_log_level: Callable[[str], None] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Runs beside `uvicorn.Server.serve()` until cancelled: keeps the start alive while the
    model loads, sends READY=1 once the model is loaded and the socket is bound, pings the
    watchdog, keeps STATUS= current, reloads on SIGHUP and says STOPPING=1 on shutdown.

    `state` is the app's state (`.engine`, `.config`, `.api_keys`), which a reload updates."""
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    reload_lock = asyncio.Lock()

    async def reload() -> None:
        async with reload_lock:  # a second SIGHUP waits for the first reload to finish
            await reload_service(state, config_path, set_log_level=set_log_level, notifier=notifier)

    def on_sighup() -> None:
        log.info("reload_requested", signal="SIGHUP", config_file=str(config_path or "default"))
        task = asyncio.ensure_future(reload())
        _background.add(task)
        task.add_done_callback(_background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watchdog = asyncio.ensure_future(watchdog_loop(notifier))
    try:
        notifier.status("loading model")
        extended_at = 0.0
        while not server.started:
            if server.should_exit:
                break
            if time.monotonic() - extended_at >= EXTEND_TIMEOUT_S:
                notifier.extend_timeout(EXTEND_TIMEOUT_S * 2)
                extended_at = time.monotonic()
            await asyncio.sleep(0.1)
        else:
            engine = getattr(state, "engine", None)
            if engine is not None and engine.state == "ready":
                notifier.ready(status_line(engine))
                log.info("service_ready", model=engine.model_id, systemd=notifier.enabled)
            elif notifier.enabled:
                # Under systemd a service without its model is a failure: exit non-zero and
                # let Restart=on-failure try again (the reason is in the log and STATUS=).
                reason = getattr(engine, "error", None) or "no model"
                notifier.status(f"model failed to load: {reason}")
                log.error("service_not_ready", reason=reason, hint="systemd will restart llamad")
                server.should_exit = True
        last = ""
        while not server.should_exit:
            line = status_line(getattr(state, "engine", None))
            if line != last:
                notifier.status(line)
                last = line
            await asyncio.sleep(1.0)
        notifier.stopping()
        await asyncio.Event().wait()  # the watchdog keeps pinging through graceful shutdown
    finally:
        watchdog.cancel()
        loop.remove_signal_handler(signal.SIGHUP)


# -- reload -------------------------------------------------------------------------------

# Settings only a restart can apply (the socket is bound, the app is built).
RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.max_body_bytes",
    "server.write_timeout",  # the response observer and uvicorn took their values at start
    "server.shutdown_grace",
    "logging.format",
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


EngineFactory = Callable[[Config, Path], Any]


def default_engine_factory(config: Config, model_path: Path) -> Any:
    from llamad.slots_llama import engine_for

    return engine_for(config, model_path)


def file_identity(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns)


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
    engine_factory: EngineFactory = default_engine_factory,
    set_log_level: Callable[[str], None] | None = None,
    notifier: Notifier | None = None,
    env: Mapping[str, str] | None = None,
) -> ReloadResult:
    """Re-reads the configuration into `state` (the app's state: `.loaded` or `.config`,
    `.engine`, optional `.api_keys` holder). Nothing changes unless everything checks out."""
    notifier = notifier or Notifier(env)
    notifier.reloading()
    try:
        result = await _reload(state, config_path, engine_factory, set_log_level, env)
    finally:
        notifier.send("READY=1")
    notifier.status(status_line(getattr(state, "engine", None)))
    return result


def _current_config(state: Any) -> Config:
    loaded = getattr(state, "loaded", None)
    if isinstance(loaded, LoadedConfig):
        return loaded.config
    return state.config


async def _reload(state, config_path, engine_factory, set_log_level, env) -> ReloadResult:
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


_background: set[asyncio.Task[None]] = set()
