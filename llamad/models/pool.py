"""The loaded models: loaded on demand, unloaded when idle or to make room.

A request takes its model with `acquire`: a loaded model is returned at once; one that is
loading is waited for (bounded by server.max_queue waiters and router.load_timeout); one
that is not loaded starts loading. Loads run one at a time, each after room was made
under the memory budget by unloading the least recently used idle model. A model holding
requests (running, queued, or still preparing their prompt) is never unloaded.

keep_alive (Ollama's meaning) counts from a model's last request: each request's own value
(Ollama's `keep_alive`) replaces the model's until the next request; None keeps it loaded;
0 unloads it as soon as it is idle.

Every load and unload is one journal line with its reason; /health, /api/ps and /metrics
read `residents` and `counters`.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from llamad.engine import Engine, QueueTimeout
from llamad.engine.scheduler import Overloaded
from llamad.models.catalog import Catalog, ModelNotFound, ModelSpec, WrongRole
from llamad.models.memory import draft_bytes, estimate_bytes, measured_bytes

log = structlog.get_logger("llamad.models")

# Builds a model's engine (llamad.engine.llama.LlamaEngine for a chat model); not loaded yet.
EngineFactory = Callable[[ModelSpec], Engine]
KEEP = object()  # acquire(): the request sent no keep_alive
EXPIRY_POLL_S = 0.25
# Unload reasons, the bounded label of llamad_model_unloads_total.
UNLOAD_REASONS = ("keep_alive", "room", "request", "reload", "shutdown")


class ModelLoadFailed(Exception):
    """The model could not be loaded (a 503 naming it); the other models are unaffected."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"model '{name}' could not be loaded: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class Resident:
    """A model in memory, or on its way there."""

    spec: ModelSpec
    engine: Engine
    state: str = "loading"  # loading | ready | failed | unloading
    memory: int = 0
    loaded_at: float = 0.0
    last_used: float = 0.0
    keep_alive_s: float | None = None
    waiting: int = 0
    error: str | None = None
    task: asyncio.Future | None = field(default=None, repr=False)
    # An engine the pool did not make (create_app's single-engine form): never unloaded.
    pinned: bool = False

    @property
    def idle(self) -> bool:
        engine = self.engine
        return engine.holders == 0 and not engine.scheduler.busy and engine.scheduler.queue_depth == 0

    def expires_at(self, now: float) -> float | None:
        """When it unloads if nothing uses it (monotonic seconds); None: it stays."""
        if self.keep_alive_s is None:
            return None
        return (now if not self.idle else self.last_used) + self.keep_alive_s


@dataclass
class ModelCounters:
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    last_load_s: float = 0.0
    unloads: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Token counts of this model's engines already closed (live engines add their own).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0


class ModelPool:
    def __init__(
        self,
        catalog: Catalog,
        factory: EngineFactory,
        *,
        budget: int | None = None,
        max_loaded: int = 0,
        load_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        estimate: Callable[[ModelSpec], int] | None = None,
    ):
        self.catalog = catalog
        self.factory = factory
        self.budget = budget
        self.max_loaded = max_loaded
        self.load_timeout = load_timeout
        self.clock = clock
        self.estimate = estimate or (lambda spec: estimate_bytes(spec.path, spec.config))
        self.residents: dict[str, Resident] = {}
        self.counters: dict[str, ModelCounters] = defaultdict(ModelCounters)
        self.failures: dict[str, str] = {}  # the last load error of a model not loaded
        self._load_lock = asyncio.Lock()
        self._expiry: asyncio.Task | None = None
        self.closed = False
        # Called with the default model's engine whenever it changes (app.state.engine).
        self.on_default: Callable[[Engine], None] | None = None

    # -- routing -----------------------------------------------------------------------------
    def route(self, name: str | None, role: str = "chat") -> ModelSpec:
        """The model a request naming `name` reaches. A chat request for an embedding model
        is refused; an embedding request may take a chat model (it embeds too)."""
        spec = self.catalog.route(name)
        if spec is None:
            raise ModelNotFound(name or "", list(self.catalog.models))
        if role == "chat" and spec.role != "chat":
            raise WrongRole(spec.name, spec.role, "chat")
        return spec

    @property
    def default_engine(self) -> Engine | None:
        resident = self.residents.get(self.catalog.default_name)
        return resident.engine if resident is not None and resident.state != "unloading" else None

    # -- taking a model ----------------------------------------------------------------------
    async def acquire(self, spec: ModelSpec, keep_alive: Any = KEEP, reason: str = "request") -> Resident:
        """The loaded model for `spec`, loading it first when needed. The caller holds its
        engine (engine.holders) from the moment this returns, without an await between."""
        if self.closed:
            from llamad.engine.scheduler import ShuttingDown

            raise ShuttingDown()
        resident = self.residents.get(spec.name)
        if resident is None or resident.state in ("failed", "unloading"):
            resident = self._start_load(spec, reason)
        if resident.state == "loading":
            if resident.waiting >= spec.config.server.max_queue + spec.config.server.parallel:
                raise Overloaded(resident.waiting)
            resident.waiting += 1
            try:
                assert resident.task is not None
                await asyncio.wait_for(asyncio.shield(resident.task), self.load_timeout)
            except asyncio.TimeoutError:
                raise QueueTimeout(self.load_timeout) from None
            finally:
                resident.waiting -= 1
        if resident.state == "failed":
            raise ModelLoadFailed(spec.name, resident.error or "unknown error")
        if resident.state != "ready":
            raise ModelLoadFailed(spec.name, f"it is {resident.state}")
        resident.last_used = self.clock()
        if not resident.pinned:
            resident.keep_alive_s = spec.keep_alive_s if keep_alive is KEEP else keep_alive
        return resident

    def released(self, resident: Resident) -> None:
        """A request is done with `resident` (its engine holder already dropped): its
        keep_alive counts from now (the expiry watch unloads it; keep_alive 0 at once)."""
        resident.last_used = self.clock()

    async def expire(self, name: str) -> None:
        """Ollama's unload idiom (keep_alive 0 with nothing to answer): unloaded now when
        idle, else as soon as its requests are done."""
        resident = self.residents.get(name)
        if resident is None or resident.pinned:
            return
        resident.keep_alive_s = 0
        if resident.state == "ready" and resident.idle:
            await self.unload(name, "request")

    # -- loading -------------------------------------------------------------------------------
    def _start_load(self, spec: ModelSpec, reason: str) -> Resident:
        resident = Resident(spec=spec, engine=self.factory(spec), keep_alive_s=spec.keep_alive_s)
        self.residents[spec.name] = resident
        self._default_changed(resident)
        resident.task = asyncio.ensure_future(self._load(resident, reason))
        return resident

    def adopt(self, spec: ModelSpec, engine: Engine) -> Resident:
        """An engine made elsewhere (create_app's single-engine form): it is the model's,
        loaded or loading on its own; the pool neither loads nor measures it."""
        resident = Resident(spec=spec, engine=engine, state="ready", keep_alive_s=None, pinned=True)
        resident.loaded_at = resident.last_used = self.clock()
        self.residents[spec.name] = resident
        self._default_changed(resident)
        return resident

    def install(self, spec: ModelSpec, engine: Engine) -> Resident:
        """A model loaded elsewhere (a reload loads the new one beside the old): it takes
        the name's place; the caller retires the engine it replaces."""
        resident = Resident(spec=spec, engine=engine, state="ready", keep_alive_s=spec.keep_alive_s)
        resident.memory = measured_bytes(engine, self.estimate(spec), draft_bytes(spec.config))
        resident.loaded_at = resident.last_used = self.clock()
        self.residents[spec.name] = resident
        self.counters[spec.name].loads += 1
        self._default_changed(resident)
        return resident

    def _default_changed(self, resident: Resident) -> None:
        if resident.spec.name == self.catalog.default_name and self.on_default is not None:
            self.on_default(resident.engine)

    async def _load(self, resident: Resident, reason: str) -> None:
        spec = resident.spec
        counters = self.counters[spec.name]
        async with self._load_lock:
            # Off the event loop: a header without the optional key/value lengths is read to
            # its end (SmolLM2's 49k tokens and merges: ~40 ms), which would stall every stream.
            need = await asyncio.to_thread(self.estimate, spec)
            try:
                await self._make_room(resident, need)
            except ModelLoadFailed as exc:
                self._failed(resident, exc.reason)
                return
            started = self.clock()
            resident.memory = need
            log.info("model_loading", model=spec.name, path=str(spec.path), reason=reason, estimated_bytes=need)
            try:
                await resident.engine.load()
            except Exception as exc:  # the reason goes to the waiters, /health and the journal
                self._failed(resident, str(exc) or exc.__class__.__name__)
                counters.load_failures += 1
                await resident.engine.unload()
                return
            if resident.state != "loading":  # removed by a reload while it loaded
                await resident.engine.unload()
                return
            took = self.clock() - started
            counters.loads += 1
            counters.load_seconds += took
            counters.last_load_s = took
            resident.memory = measured_bytes(resident.engine, need, draft_bytes(spec.config))
            resident.loaded_at = resident.last_used = self.clock()
            resident.state = "ready"
            self.failures.pop(spec.name, None)
            log.info("model_loaded", model=spec.name, reason=reason, load_s=round(took, 3), memory_bytes=resident.memory,
                     loaded=sorted(self.residents))

    def _failed(self, resident: Resident, error: str) -> None:
        name = resident.spec.name
        resident.state = "failed"
        resident.error = error
        self.failures[name] = error
        if self.residents.get(name) is resident:
            del self.residents[name]
        log.error("model_load_failed", model=name, path=str(resident.spec.path), error=error)

    def used_bytes(self, besides: Resident | None = None) -> int:
        return sum(r.memory for r in self.residents.values() if r is not besides and r.state in ("ready", "loading", "unloading"))

    async def _make_room(self, resident: Resident, need: int) -> None:
        """Unloads idle models, least recently used first, until `need` bytes fit the budget
        and the set is under router.max_loaded. Waits for busy ones up to half of
        load_timeout (the other half is the load's), then fails with the reason."""
        deadline = self.clock() + self.load_timeout / 2
        while True:
            others = [r for r in self.residents.values() if r is not resident and r.state == "ready"]
            closing = [r for r in self.residents.values() if r.state == "unloading"]
            fits_memory = self.budget is None or self.used_bytes(resident) + need <= self.budget
            fits_count = self.max_loaded == 0 or len(others) + len(closing) < self.max_loaded
            if fits_memory and fits_count:
                return
            if closing:  # an unload under way (keep_alive, a request's) frees its room when done
                await asyncio.sleep(EXPIRY_POLL_S / 5)
                continue
            idle = sorted((r for r in others if r.idle), key=lambda r: r.last_used)
            if idle:
                await self.unload(idle[0].spec.name, "room", wanted=resident.spec.name)
                continue
            if not others:  # alone and still too big: the budget is an estimate, try it
                log.warning("model_over_budget", model=resident.spec.name, estimated_bytes=need, budget_bytes=self.budget)
                return
            if self.clock() >= deadline:
                busy = ", ".join(sorted(r.spec.name for r in others))
                raise ModelLoadFailed(resident.spec.name, f"no room in the memory budget while {busy} serve requests")
            await asyncio.sleep(EXPIRY_POLL_S)

    # -- unloading -----------------------------------------------------------------------------
    async def unload(self, name: str, reason: str, wanted: str | None = None) -> bool:
        """Unloads `name` if it is loaded and idle (True); a busy model stays (False)."""
        resident = self.residents.get(name)
        if resident is None or resident.state != "ready" or not resident.idle or resident.pinned:
            return False
        # Listed as unloading, its memory still counted, until its engine is closed (the
        # slots saved to disk, the context freed): a load that needs that room waits for it.
        resident.state = "unloading"
        try:
            await self._close(resident)
        finally:
            if self.residents.get(name) is resident:  # not replaced by a new load meanwhile
                del self.residents[name]
        self.counters[name].unloads[reason] += 1
        fields = {"for_model": wanted} if wanted else {}
        log.info("model_unloaded", model=name, reason=reason, memory_bytes=resident.memory,
                 loaded_s=round(self.clock() - resident.loaded_at, 1), **fields)
        return True

    async def retire(self, resident: Resident, reason: str, poll_s: float = 0.2) -> None:
        """Closes a model taken out of the set (a reload) once its requests are done."""
        while not resident.idle:
            await asyncio.sleep(poll_s)
        await self._close(resident)
        self.counters[resident.spec.name].unloads[reason] += 1
        log.info("model_unloaded", model=resident.spec.name, reason=reason, memory_bytes=resident.memory)

    async def _close(self, resident: Resident) -> None:
        engine = resident.engine
        counters = self.counters[resident.spec.name]
        counters.prompt_tokens += engine.stats.prompt_tokens
        counters.completion_tokens += engine.stats.completion_tokens
        counters.requests += engine.stats.requests
        await engine.unload()

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the default model and those marked preload; starts the keep_alive watch.
        A failed load is logged and kept for /health; the server still starts."""
        for spec in self.catalog.models.values():
            if spec.default or spec.preload:
                try:
                    await self.acquire(spec, reason="start")
                except (ModelLoadFailed, Overloaded) as exc:
                    log.error("model_load_failed_at_start", model=spec.name, error=str(exc))
        self._expiry = asyncio.ensure_future(self._watch_expiry())

    async def _watch_expiry(self) -> None:
        while not self.closed:
            await asyncio.sleep(EXPIRY_POLL_S)
            now = self.clock()
            for resident in list(self.residents.values()):
                if resident.state != "ready" or not resident.idle:
                    continue
                expires = resident.expires_at(now)
                if expires is not None and now >= expires:
                    await self.unload(resident.spec.name, "request" if resident.keep_alive_s == 0 else "keep_alive")

    def stop_admitting(self) -> None:
        """SIGTERM: every model's queue answers with a retryable error from now on."""
        self.closed = True
        for resident in self.residents.values():
            resident.engine.scheduler.close()

    def close(self) -> None:
        """Closes every engine (blocking: the lifespan's end)."""
        self.closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        for resident in list(self.residents.values()):
            if resident.state == "unloading":  # its close is running; asyncio.run waits for it
                continue
            if resident.task is not None and not resident.task.done():
                resident.task.cancel()
            resident.engine.close()
        self.residents.clear()

    # -- what operators see --------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Every configured model's state, for /health."""
        now = self.clock()
        out = []
        for name, spec in self.catalog.models.items():
            resident = self.residents.get(name)
            entry: dict[str, Any] = {"model": name, "role": spec.role, "path": str(spec.path)}
            if resident is None:
                entry["state"] = "failed" if name in self.failures else "unloaded"
                if name in self.failures:
                    entry["error"] = self.failures[name]
            else:
                entry["state"] = resident.state
                entry["memory_bytes"] = resident.memory
                if resident.state == "ready":
                    expires = resident.expires_at(now)
                    entry["expires_in_s"] = None if expires is None else round(max(0.0, expires - now), 1)
                    entry["busy"] = not resident.idle
            if spec.default:
                entry["default"] = True
            out.append(entry)
        return out
