"""A model's load beside the models that serve: the thread it runs on, and its priority.

On a machine with few cores, a load (reading the file, repacking the weights, clearing the KV
cache) takes a core that a loaded model's step needs. llama.cpp's OpenMP threads spin at
every barrier, so a step with one thread off its core waits for it.

A nice value alone did not stop that here. With the load at nice +10, a loaded model's first
token still took 2x its idle time: a CPU running a nice task is not idle, so the scheduler
may wake both of a step's threads onto one core while the load keeps the other. So did a
plain memset of fresh memory at nice +10 in *another* process: stalls of 100-290 ms. A
SCHED_IDLE thread never holds a core a normal thread wants: a CPU running only SCHED_IDLE
work counts as idle, and a waking thread is put there at once. With the load SCHED_IDLE, the
stalls were gone (a first token of at most 33 ms against 27 idle).

SCHED_IDLE alone starves: under a model's steady decoding a SCHED_IDLE load made no progress
(167 s against 4 s at nice +10), and a starved thread that holds the GIL would stall the
whole process. So a load is SCHED_IDLE only where the process may move it back, and a
watch (`LoadPriority.watch`, from the event loop) moves it back to nice +10 as soon as it
is starved: runnable in every sample of the last second, with under a tenth of a core. A
load beside nothing that serves runs at nice +10 from the start, as before.

Linux only; elsewhere the priority calls are no-ops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

import structlog

log = structlog.get_logger("llamad.engine")

LOAD_NICENESS = 10
WATCH_S = 0.25  # how often the event loop looks at a SCHED_IDLE load
STARVED_SAMPLES = 4  # runnable in this many samples in a row (one second) ...
STARVED_CPU_SHARE = 0.1  # ... with less than this share of one core: starved

_serving = 0  # engines loaded and serving in this process
_serving_lock = threading.Lock()


def serving_started() -> None:
    global _serving
    with _serving_lock:
        _serving += 1


def serving_stopped() -> None:
    global _serving
    with _serving_lock:
        _serving = max(0, _serving - 1)


def serving() -> int:
    return _serving


def _nicer(thread: int) -> None:
    os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + LOAD_NICENESS))


@cache
def idle_loads_allowed() -> tuple[bool, str]:
    """Whether a thread here may go SCHED_IDLE and come back (an unprivileged process comes
    back only within RLIMIT_NICE; the systemd unit sets LimitNICE for it). Tried once, on a
    thread of its own."""
    if not hasattr(os, "SCHED_IDLE"):
        return False, "no SCHED_IDLE on this system"
    outcome: list[tuple[bool, str]] = []

    def attempt() -> None:
        thread = threading.get_native_id()
        steps = [
            (lambda: _nicer(thread), "normal priority: setpriority was refused"),
            (lambda: os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0)), "nice +10 only: SCHED_IDLE was refused"),
            (lambda: os.sched_setscheduler(thread, os.SCHED_OTHER, os.sched_param(0)),
             "nice +10 only: a SCHED_IDLE thread could not be moved back (RLIMIT_NICE below 10)"),
        ]
        for step, failed in steps:
            try:
                step()
            except OSError as exc:
                outcome.append((False, f"{failed} ({exc.strerror})"))
                return
        outcome.append((True, "SCHED_IDLE, back to nice +10 if starved"))

    probe = threading.Thread(target=attempt, name="llamad-priority-probe")
    probe.start()
    probe.join()
    return outcome[0]


@dataclass
class LoadPriority:
    """The priority of one load's thread: `enter` runs on that thread before the load, and
    `watch` on the event loop while it runs. Built on the event loop's thread (`for_load`),
    which is where the probe's thread must start: a thread inherits its creator's nice value."""

    use_idle: bool  # models serve beside this load, and the process may undo SCHED_IDLE
    idle: bool = False
    thread: int | None = None  # native id
    clock: int | None = None  # the thread's CPU-time clock
    samples: deque = field(default_factory=lambda: deque(maxlen=STARVED_SAMPLES + 1))
    promoted: bool = False

    @classmethod
    def for_load(cls) -> "LoadPriority":
        return cls(use_idle=serving() > 0 and idle_loads_allowed()[0])

    async def run(self, *steps: Callable[[], Any]) -> list[Any]:
        """Runs `steps` in turn on one thread of their own at this priority, watching it
        from the event loop meanwhile; their results, in order."""
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamad-load", initializer=self.enter)
        results = []
        try:
            for step in steps:
                future = asyncio.get_running_loop().run_in_executor(thread, step)
                while not (await asyncio.wait({future}, timeout=WATCH_S))[0]:
                    self.watch()
                results.append(future.result())
        finally:
            thread.shutdown(wait=False)
        return results

    def enter(self) -> None:
        try:
            self.thread = threading.get_native_id()
            self.clock = time.pthread_getcpuclockid(threading.get_ident())
            _nicer(self.thread)
            if self.use_idle:
                os.sched_setscheduler(self.thread, os.SCHED_IDLE, os.sched_param(0))
                self.idle = True
        except (AttributeError, OSError):
            pass

    def watch(self) -> None:
        """One sample; moves a starved SCHED_IDLE load back to nice +10."""
        if not self.idle or self.promoted or self.thread is None or self.clock is None:
            return
        try:
            cpu = time.clock_gettime(self.clock)
            with open(f"/proc/self/task/{self.thread}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:  # the thread has ended
            return
        self.samples.append((time.monotonic(), cpu, state))
        if len(self.samples) <= STARVED_SAMPLES:
            return
        (t0, cpu0, _), (t1, cpu1, _) = self.samples[0], self.samples[-1]
        runnable = all(s == "R" for _, _, s in list(self.samples)[1:])
        if runnable and (cpu1 - cpu0) < STARVED_CPU_SHARE * (t1 - t0):
            try:
                os.sched_setscheduler(self.thread, os.SCHED_OTHER, os.sched_param(0))
                self.promoted = True
                log.info("model_load_priority_raised", reason="starved at SCHED_IDLE", to=f"nice +{LOAD_NICENESS}")
            except OSError:
                pass

    @property
    def described(self) -> str:
        if self.promoted:
            return f"SCHED_IDLE, then nice +{LOAD_NICENESS} (starved)"
        return "SCHED_IDLE" if self.idle else f"nice +{LOAD_NICENESS}"
