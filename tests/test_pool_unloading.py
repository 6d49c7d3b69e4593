"""A model being unloaded stays listed, and its memory counted, until its engine is closed."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fake_engine import FakeEngine
from llamad.config import Config
from llamad.models.catalog import Catalog, ModelSpec
from llamad.models.pool import ModelPool


class SlowClosingEngine(FakeEngine):
    """Its close waits for `release` (as a real engine's waits for its slots to reach disk)."""

    def __init__(self, release: threading.Event):
        super().__init__()
        self.release = release

    def close(self) -> None:
        self.release.wait(10)
        super().close()


def pool_of_two(release: threading.Event, budget: int) -> ModelPool:
    specs = {name: ModelSpec(name=name, path=Path(f"/models/{name}.gguf"), config=Config()) for name in ("a", "b")}
    catalog = Catalog(models=specs, default_name="a")
    return ModelPool(catalog, lambda spec: SlowClosingEngine(release), budget=budget, estimate=lambda spec: 100)


def states(pool: ModelPool) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in pool.describe()}


def test_an_unload_is_listed_and_its_memory_held_until_the_engine_is_closed() -> None:
    async def scenario() -> None:
        release = threading.Event()
        pool = pool_of_two(release, budget=150)  # room for one model
        await pool.acquire(pool.catalog.models["b"])
        unloading = asyncio.ensure_future(pool.unload("b", "request"))
        await asyncio.sleep(0.05)
        assert states(pool)["b"] == "unloading"
        assert pool.used_bytes() == 100
        # A load that needs b's room waits for b's close instead of loading beside it.
        loading = asyncio.ensure_future(pool.acquire(pool.catalog.models["a"]))
        await asyncio.sleep(0.2)
        assert not loading.done() and states(pool)["a"] == "loading"
        release.set()
        assert await unloading is True
        await asyncio.wait_for(loading, 5)
        assert states(pool) == {"a": "ready", "b": "unloaded"}
        assert pool.used_bytes() == 100
        pool.close()

    asyncio.run(scenario())


def test_the_default_model_being_unloaded_is_not_served_as_the_default() -> None:
    async def scenario() -> None:
        release = threading.Event()
        pool = pool_of_two(release, budget=1000)
        await pool.acquire(pool.catalog.models["a"])
        assert pool.default_engine is not None
        unloading = asyncio.ensure_future(pool.unload("a", "request"))
        await asyncio.sleep(0.05)
        assert pool.default_engine is None  # /health: "unloaded", not a closed engine's "draining"
        release.set()
        await unloading
        pool.close()

    asyncio.run(scenario())
