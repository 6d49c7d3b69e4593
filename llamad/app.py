"""create_app(config, engine): routes, lifespan, error handlers."""

from __future__ import annotations

import secrets
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import structlog
from litestar import Litestar, Request, Response, get, route
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware

from llamad.api import embeddings
from llamad.api.anthropic import messages as anthropic_messages
from llamad.api.llama_server import infill, tokenize
from llamad.api.ollama import chat as ollama_chat
from llamad.api.ollama import models as ollama_models
from llamad.api.openai import chat as openai_chat
from llamad.api.openai import completions as openai_completions
from llamad.api.openai import models as openai_models
from llamad.api.responses import routes as responses
from llamad.config import Config, api_keys
from llamad.engine import Engine
from llamad.engine.background import idle_loads_allowed
from llamad.models.catalog import Catalog, ModelSpec
from llamad.models.pool import ModelPool
from llamad.serve.auth import ApiKeys, AuthMiddleware
from llamad.serve.errors import REFUSE_WITH_HEADER, body_of, family_of, from_exception, refused_for_balancer
from llamad.serve.metrics import Metrics
from llamad.serve.observe import UNMATCHED, ObserveMiddleware, RequestRecord, record_of

log = structlog.get_logger("llamad.app")

# Every face's routes: each a translation onto the one request path (llamad.serve.pipeline).
FACES = [
    openai_chat.router,
    openai_completions.router,
    openai_models.router,
    anthropic_messages.router,
    responses.router,
    ollama_chat.router,
    ollama_models.router,
    infill.router,
    tokenize.router,
    embeddings.router,
]


def error_handler(request: Request, exc: Exception) -> Response:
    """Every error, in the shape of the API family the path belongs to."""
    family = family_of(request.url.path, "anthropic-version" in request.headers)
    # Raised here, an error is sent before any response byte: a refusal a balancer can retry.
    error = refused_for_balancer(from_exception(exc, family), exc, request.headers.get(REFUSE_WITH_HEADER))
    if error.status >= 500 and not isinstance(exc, HTTPException) and error.kind == "server":
        log.exception("request_failed", route=request.url.path)
    record = record_of(request)
    record.fail(error)
    headers = dict(error.headers)
    if record.request_id == "-":  # no route matched (404/405), so the observer never ran
        headers["request-id"] = "req_" + secrets.token_hex(12)
        unmatched = RequestRecord(request_id=headers["request-id"], method=request.method, route=UNMATCHED)
        request.app.state.metrics.observe_request(unmatched, error.status, 0.0)
    return Response(body_of(error, family), status_code=error.status, headers=headers)


@get("/health", sync_to_thread=False)
def health(request: Request) -> Response:
    """The default model's state is the server's: a load balancer sends requests while it is
    ready. Every model of the set is listed under `models`."""
    pool: ModelPool = request.app.state.models
    engine: Engine | None = pool.default_engine
    default = pool.catalog.default_name
    if engine is not None:
        # A drain (SIGTERM) is a 503 at once, so a load balancer stops sending new requests
        # while the running ones finish.
        state = "draining" if engine.scheduler.closed and engine.state == "ready" else engine.state
    else:  # unloaded (keep_alive, or room for another): the next request loads it
        state = "failed" if default in pool.failures else ("draining" if pool.closed else "unloaded")
    serving = state in ("ready", "unloaded")
    body: dict[str, Any] = {"status": "ok" if serving else state, "model": default, "state": state}
    if engine is not None:
        body.update(
            generating=engine.generating,
            queue_depth=engine.scheduler.queue_depth,
            max_queue=engine.scheduler.max_queue,
            slots={"total": engine.scheduler.capacity, "busy": engine.scheduler.active},
        )
        if engine.info:
            body["model_info"] = engine.info
        if engine.error:
            body["error"] = engine.error
    elif default in pool.failures:
        body["error"] = pool.failures[default]
    if len(pool.catalog.models) > 1 or any(r.spec.name != default for r in pool.residents.values()):
        body["models"] = pool.describe()
    embedder: Engine | None = request.app.state.embedder
    if embedder is not None:  # a dedicated embedding model: its own state, not the server's
        body["embedding_model"] = {"model": embedder.model_id, "state": embedder.state, "error": embedder.error}
    return Response(body, status_code=200 if serving else 503)


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(request: Request) -> str:
    return request.app.state.metrics.render(request.app.state.engine, request.app.state.models)


@route("/", http_method=["GET", "HEAD"], sync_to_thread=False)
def root(request: Request) -> dict[str, Any]:
    # Claude Code probes `HEAD /` before it starts; answer it (and GET) plainly.
    return {"name": "llamad", "model": request.app.state.models.catalog.default_name}


def create_app(
    config: Config,
    engine: Engine | None = None,
    load_engine: bool = True,
    metrics_registry: Metrics | None = None,
    embedder: Engine | None = None,
    pool: ModelPool | None = None,
) -> Litestar:
    """Serves `pool` (the server's models, loaded on demand; the CLI builds it), or the one
    `engine` given (a model set of one, loaded here unless `load_engine` is false).
    `embedder`: the engine of a dedicated embedding model ([embeddings] path); None: the
    chat engine embeds."""
    metrics_registry = metrics_registry or Metrics()
    if pool is None:
        assert engine is not None, "create_app needs an engine or a pool"
        pool = single_model_pool(config, engine)
    if embedder is None and config.embeddings.path:
        from llamad.engine.llama_embed import EmbeddingEngine

        embedder = EmbeddingEngine(config)
    keys = ApiKeys(api_keys(config), require_for_metrics=config.server.metrics_require_key)
    state = State({"engine": pool.default_engine, "models": pool, "embedder": embedder, "config": config,
                   "metrics": metrics_registry, "api_keys": keys})

    def default_changed(new_engine: Engine) -> None:  # app.state.engine: the default model's engine
        state.engine = new_engine

    pool.on_default = default_changed

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if load_engine:
            # How a model loads beside models that serve (llamad.engine.background): the
            # systemd unit's syscall filter and LimitNICE decide it, so the journal says it.
            allowed, how = idle_loads_allowed()  # one short-lived thread
            log.info("model_load_priority", beside_serving=how, sched_idle=allowed)
            adopted = pool.default_engine
            if adopted is not None and adopted.state == "loading":
                try:
                    await adopted.load()
                except Exception as exc:  # keep serving /health with the reason
                    log.error("model_load_failed", error=str(exc))
            await pool.start()
        if load_engine and embedder is not None and embedder.state == "loading":
            try:
                await embedder.load()
            except Exception as exc:  # embeddings answer 503 with the reason; chat still works
                log.error("embedding_model_load_failed", error=str(exc))
        try:
            yield
        finally:
            if embedder is not None:
                embedder.close()
            pool.close()

    route_handlers: list[Any] = [health, metrics, root, *FACES]

    return Litestar(
        route_handlers=route_handlers,
        lifespan=[lifespan],
        # api_keys: a holder, so `systemctl reload` can swap keys (llamad.service.systemd.reload_service).
        state=state,
        exception_handlers={Exception: error_handler},
        middleware=[
            DefineMiddleware(ObserveMiddleware, write_timeout=config.server.write_timeout, metrics=metrics_registry),
            DefineMiddleware(AuthMiddleware, keys=keys),
        ],
        request_max_body_size=config.server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
        debug=False,
    )


def single_model_pool(config: Config, engine: Engine) -> ModelPool:
    """A set of one: `engine` serves every model name (unless router.strict), stays loaded."""
    path = Path(str(getattr(engine, "model_path", "") or config.model.path or engine.model_id))
    spec = ModelSpec(name=engine.model_id, path=path, config=config, default=True, source="engine")
    catalog = Catalog(models={spec.name: spec}, default_name=spec.name, strict=config.router.strict)

    def no_second_engine(wanted: ModelSpec) -> Engine:
        raise RuntimeError("this server was given one engine and cannot load another")

    pool = ModelPool(catalog, no_second_engine)
    pool.adopt(spec, engine)
    return pool
