"""Which model serves a request: its `model` name routed through the pool
(llamad.models.pool), the model loaded first when it is not, and held until the request is
over, so it is neither unloaded nor retired by a reload under a running request, nor while
the request is still reading its body or preparing its prompt."""

from __future__ import annotations

from typing import Any

from litestar import Request

from llamad.config import parse_duration
from llamad.engine import Engine
from llamad.models.pool import KEEP, ModelPool
from llamad.serve.body import unless_disconnected
from llamad.serve.observe import _NULL, record_of
from llamad.serve.request import InvalidRequest


def pool_of(request: Request) -> ModelPool:
    return request.app.state.models


async def engine_for(request: Request, name: str | None, *, role: str = "chat", keep_alive: Any = KEEP) -> Engine:
    """The engine of the model `name` routes to, loaded and held for this request. A
    hang-up while the model loads ends the request (499); the load goes on for the next."""
    pool = pool_of(request)
    spec = pool.route(name, role)
    record = record_of(request)
    if record is not _NULL:
        record.model = spec.name  # also on the log line of a request that ends while it loads
    resident = pool.residents.get(spec.name)
    if resident is not None and resident.state == "ready":
        resident = await pool.acquire(spec, keep_alive)  # returns at once: no load to wait for
    else:
        resident = await unless_disconnected(request, pool.acquire(spec, keep_alive))
    engine = resident.engine
    request.app.state.metrics.track(engine)
    if record is not _NULL:  # without the observer nothing would release it
        engine.holders += 1

        def release() -> None:
            engine.holders -= 1
            pool.released(resident)

        record.releases.append(release)
    return engine


def keep_alive_of(value: Any) -> Any:
    """Ollama's keep_alive as seconds (None: stay loaded); KEEP when the request sent none."""
    if value is None:
        return KEEP
    try:
        return parse_duration(value)
    except ValueError:
        raise InvalidRequest(f"'keep_alive' must be a duration such as \"5m\" or a number of seconds, got {value!r}", param="keep_alive") from None
