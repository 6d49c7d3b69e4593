"""A model's load beside models that serve (llamad.engine.background): SCHED_IDLE where the
process may undo it, moved back to nice +10 when it starves, and the count of engines
serving that decides it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest

from llamad.engine import background
from llamad.engine.background import LOAD_NICENESS, LoadPriority, idle_loads_allowed
from fake_engine import FakeEngine

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def needs_idle_loads() -> None:
    allowed, how = idle_loads_allowed()
    if not allowed:
        pytest.skip(f"this process may not undo SCHED_IDLE: {how}")


class Busy(threading.Thread):
    """A load's stand-in: enters `priority` and then works in C without the GIL (hashing),
    as llama.cpp's load does, until told to stop."""

    def __init__(self, priority: LoadPriority):
        super().__init__(daemon=True)
        self.priority = priority
        self.entered = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        self.priority.enter()
        self.entered.set()
        block = os.urandom(8 << 20)
        while not self.stop.is_set():
            hashlib.sha256(block).digest()

    def policy(self) -> tuple[int, int]:
        thread = self.priority.thread
        assert thread is not None
        return os.sched_getscheduler(thread), os.getpriority(os.PRIO_PROCESS, thread)


@linux_only
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("use_idle", "policy", "described"),
    [(True, "SCHED_IDLE", "SCHED_IDLE"), (False, "SCHED_OTHER", f"nice +{LOAD_NICENESS}")],
    ids=["beside-serving-models", "beside-nothing"],
)
def test_a_loads_thread_is_sched_idle_beside_serving_models_and_nice_10_always(use_idle, policy, described):
    if use_idle:
        needs_idle_loads()
    load = Busy(LoadPriority(use_idle=use_idle))
    load.start()
    try:
        assert load.entered.wait(10)
        assert load.policy()[0] == getattr(os, policy) and load.policy()[1] >= LOAD_NICENESS
        assert load.priority.described == described
    finally:
        load.stop.set()
        load.join(10)


@linux_only
@pytest.mark.timeout(90)
def test_a_starved_idle_load_goes_back_to_nice_10():
    """Every core busy at normal priority (one spinning process each): the SCHED_IDLE load
    gets no CPU, so the watch moves it to SCHED_OTHER at nice +10, within a few seconds."""
    needs_idle_loads()
    load = Busy(LoadPriority(use_idle=True))
    load.start()
    hogs = [
        subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 60\nwhile time.time() < end: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        assert load.entered.wait(10)
        deadline = time.monotonic() + 30
        while not load.priority.promoted and time.monotonic() < deadline:
            load.priority.watch()
            time.sleep(background.WATCH_S)
        assert load.priority.promoted, "the starved load was left at SCHED_IDLE"
        policy, nice = load.policy()
        assert policy == os.SCHED_OTHER and nice == LOAD_NICENESS
        assert load.priority.described.endswith("(starved)")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)
        load.stop.set()
        load.join(10)


@pytest.mark.timeout(30)
def test_engines_serving_are_counted_from_load_to_close():
    """The count that makes a load SCHED_IDLE: an engine counts once loaded, until closed."""
    before = background.serving()

    async def scenario() -> None:
        first, second = FakeEngine(), FakeEngine()
        await first.load()
        assert background.serving() == before + 1
        await second.load()
        assert background.serving() == before + 2
        first.close()
        first.close()  # a second close does not count twice
        assert background.serving() == before + 1
        second.close()
        assert background.serving() == before

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_load_is_idle_only_beside_an_engine_that_serves(monkeypatch):
    monkeypatch.setattr(background, "idle_loads_allowed", lambda: (True, "test"))
    monkeypatch.setattr(background, "_serving", 0)
    assert not LoadPriority.for_load().use_idle
    background.serving_started()
    assert LoadPriority.for_load().use_idle
    background.serving_stopped()
    monkeypatch.setattr(background, "idle_loads_allowed", lambda: (False, "test"))
    background.serving_started()
    assert not LoadPriority.for_load().use_idle
