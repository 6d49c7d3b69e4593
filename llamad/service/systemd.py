"""Living under systemd: readiness, status and watchdog notifications, and reload on SIGHUP.

`Notifier` speaks the sd_notify protocol (one datagram to `$NOTIFY_SOCKET`, abstract
sockets written with a leading '@') without libsystemd. Outside systemd every call is a
no-op, so the serve loop calls it unconditionally.

On SIGHUP (`systemctl reload llamad`) `supervise` runs `llamad.service.reload.reload_service`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any, Awaitable, Callable, Mapping

import structlog

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


async def notify_reload(notifier: Notifier, state: Any, reload: Callable[[], Awaitable[Any]]) -> Any:
    """Runs one reload inside sd_notify's reload protocol: RELOADING=1 before, READY=1 after
    whatever happened (or `systemctl reload` waits for its timeout), then a fresh STATUS=."""
    notifier.reloading()
    try:
        return await reload()
    finally:
        notifier.send("READY=1")
        notifier.status(status_line(getattr(state, "engine", None)))


async def supervise(
    server: Any,
    state: Any,
    *,
    reload: Callable[[], Awaitable[Any]] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Runs beside `uvicorn.Server.serve()` until cancelled: keeps the start alive while the
    model loads, sends READY=1 once the model is loaded and the socket is bound, pings the
    watchdog, keeps STATUS= current, runs `reload` on SIGHUP and says STOPPING=1 on shutdown.

    `state` is the app's state (`.engine`, `.config`, `.api_keys`), which a reload updates;
    `reload` is the CLI's (llamad.service.reload.reload_service with the engine class bound)."""
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    reload_lock = asyncio.Lock()

    async def reload_once() -> None:
        async with reload_lock:  # a second SIGHUP waits for the first reload to finish
            try:
                await notify_reload(notifier, state, reload)
            except Exception:
                log.exception("reload_failed", kept="running configuration")

    def on_sighup() -> None:
        if reload is None:
            log.warning("reload_unavailable", signal="SIGHUP")
            return
        log.info("reload_requested", signal="SIGHUP")
        task = asyncio.ensure_future(reload_once())
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


_background: set[asyncio.Task[None]] = set()
