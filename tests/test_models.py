"""Several models on one board (llamad.models), fast tier: the catalog the TOML makes, routing
by name, alias and pattern, the pool (load on demand, room made under a budget, keep_alive,
a failed load), and every face routing through the real ASGI stack to fake engines."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from litestar.testing import AsyncTestClient

from fake_engine import FakeEngine
from llamad.app import create_app
from llamad.config import ConfigError, load_config, parse_bytes, parse_duration
from llamad.models.catalog import build_catalog
from llamad.models.pool import ModelLoadFailed, ModelPool
from llamad.service.reload import reload_service

pytestmark = pytest.mark.timeout(60)


def gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 64)  # enough for the catalog's check; fakes load it
    return path


def write(tmp_path: Path, toml: str, name: str = "llamad.toml") -> Path:
    path = tmp_path / name
    path.write_text(toml)
    return path


def two_models(tmp_path: Path, extra: str = "") -> Path:
    a, b = gguf(tmp_path / "coder.gguf"), gguf(tmp_path / "small.gguf")
    return write(
        tmp_path,
        f"""
[models.coder]
path = "{a}"
default = true
aliases = ["claude-*", "gpt-4o"]
n_ctx = 2048
[models.small]
path = "{b}"
aliases = ["claude-*haiku*"]
keep_alive = "10m"
parallel = 2
temperature = 0.1
{extra}""",
    )


class ScriptedEngine(FakeEngine):
    """A fake whose load takes `load_s` and may fail, answering with its own name."""

    def __init__(self, name: str, load_s: float = 0.0, fail: str | None = None, **kwargs):
        super().__init__(model_id=name, script=lambda g, name=name: [f"from {name}"], **kwargs)
        self.load_s = load_s
        self.fail = fail

    def _load(self) -> None:
        time.sleep(self.load_s)
        if self.fail:
            raise RuntimeError(self.fail)


class Factory:
    def __init__(self, load_s: float = 0.0, failing: dict[str, str] | None = None):
        self.load_s = load_s
        self.failing = failing or {}
        self.made: list[ScriptedEngine] = []

    def __call__(self, spec) -> ScriptedEngine:
        engine = ScriptedEngine(spec.name, load_s=self.load_s, fail=self.failing.get(spec.name))
        engine.model_path = spec.path
        self.made.append(engine)
        return engine


def pool_for(path: Path, factory: Factory, budget: int | None = None, **kwargs) -> ModelPool:
    catalog = build_catalog(load_config(path, env={}))
    return ModelPool(catalog, factory, budget=budget, estimate=lambda spec: 100, **kwargs)


# -- configuration and catalog --------------------------------------------------------------


def test_durations_and_sizes_read_as_ollama_and_operators_write_them():
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25
    assert parse_duration(0) == 0 and parse_duration("0") == 0 and parse_duration(90) == 90
    assert parse_duration(-1) is None and parse_duration("-1m") is None  # negative: stay loaded
    assert parse_bytes("auto") is None and parse_bytes("12G") == 12 << 30 and parse_bytes("512MiB") == 512 << 20
    for bad in ("soon", "5x", "", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_tables_make_models_with_their_own_settings(tmp_path):
    catalog = build_catalog(load_config(two_models(tmp_path), env={}))
    assert list(catalog.models) == ["coder", "small"] and catalog.default_name == "coder"
    coder, small = catalog.models["coder"], catalog.models["small"]
    assert coder.config.model.n_ctx == 2048 and coder.config.model.name == "coder"
    assert small.config.server.parallel == 2 and small.config.sampling.temperature == 0.1
    assert small.config.model.n_ctx == 4096  # left out: [model]'s
    assert coder.keep_alive_s is None  # the default model stays loaded
    assert small.keep_alive_s == 600


def test_routing_by_name_alias_pattern_and_tag(tmp_path):
    catalog = build_catalog(load_config(two_models(tmp_path), env={}))
    route = lambda name: catalog.route(name).name  # noqa: E731
    assert route("small") == "small" and route("small:latest") == "small" and route("SMALL") == "small"
    assert route("gpt-4o") == "coder"
    # Both patterns match a haiku name; the one with more literal characters wins.
    assert route("claude-3-5-haiku-20241022") == "small"
    assert route("claude-sonnet-4-5") == "coder"
    assert route("something-else") == "coder" and route(None) == "coder"


def test_strict_mode_leaves_unknown_names_unrouted(tmp_path):
    catalog = build_catalog(load_config(two_models(tmp_path, "[router]\nstrict = true\n"), env={}))
    assert catalog.route("something-else") is None
    assert catalog.route("claude-opus").name == "coder"


def test_every_gguf_in_model_dir_is_a_model_under_its_stem(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    gguf(models / "alpha.gguf"), gguf(models / "beta.gguf")
    (models / "notes.txt").write_text("not a model")
    catalog = build_catalog(load_config(write(tmp_path, f'[model]\ndir = "{models}"\nname = "beta"\n'), env={}))
    assert list(catalog.models) == ["alpha", "beta"]
    assert catalog.default_name == "beta"  # model.name picks the default, as it picked the file
    # Without a matching name the first file is the default, served as model.name (the
    # seed's MODEL_NAME: the id in responses), and answers to its stem too.
    catalog = build_catalog(load_config(write(tmp_path, f'[model]\ndir = "{models}"\n'), env={}))
    assert list(catalog.models) == ["llama-local", "beta"] and catalog.default_name == "llama-local"
    assert catalog.route("alpha").name == "llama-local" and catalog.default.path.name == "alpha.gguf"


def test_model_path_alone_is_a_set_of_one_named_model_name(tmp_path):
    model = gguf(tmp_path / "m.gguf")
    catalog = build_catalog(load_config(write(tmp_path, f'[model]\npath = "{model}"\nname = "mine"\n'), env={}))
    assert list(catalog.models) == ["mine"] and catalog.default.keep_alive_s is None


@pytest.mark.parametrize(
    "table, words",
    [
        ('[models.x]\npath = "{a}"\ncolour = "red"\n', ["unknown key 'models.x.colour'", "llamad.toml:3"]),
        ('[models.x]\npath = "{missing}"\n', ["models.x.path", "existing .gguf"]),
        ('[models.x]\npath = "{a}"\nn_ctx = 8\n', ["[models.x]", "model.n_ctx", "at least 64"]),
        ('[models.x]\npath = "{a}"\nrole = "vision"\n', ["models.x.role", "chat, embeddings"]),
        ('[models.x]\npath = "{a}"\nkeep_alive = "soon"\n', ["models.x.keep_alive", "duration"]),
        ('[models.x]\npath = "{a}"\ndefault = true\n[models.y]\npath = "{a}"\ndefault = true\n', ["one model may be the default"]),
        ('[router]\nmemory_budget = "lots"\n[models.x]\npath = "{a}"\n', ["router.memory_budget"]),
    ],
)
def test_a_bad_models_table_is_refused_naming_its_key(tmp_path, table, words):
    a = gguf(tmp_path / "a.gguf")
    path = write(tmp_path, table.format(a=a, missing=tmp_path / "gone.gguf"))
    with pytest.raises(ConfigError) as caught:
        build_catalog(load_config(path, env={}))
    for word in words:
        assert word in str(caught.value)


# -- the pool --------------------------------------------------------------------------------


async def test_a_model_loads_on_its_first_request_and_waiters_share_the_load(tmp_path):
    factory = Factory(load_s=0.3)
    pool = pool_for(two_models(tmp_path), factory)
    spec = pool.catalog.models["small"]
    first, second = await asyncio.gather(pool.acquire(spec), pool.acquire(spec))
    assert first is second and first.engine.state == "ready" and len(factory.made) == 1
    assert pool.counters["small"].loads == 1
    pool.close()


async def test_room_is_made_by_unloading_the_least_recently_used_idle_model(tmp_path):
    factory = Factory()
    pool = pool_for(two_models(tmp_path), factory, budget=150)  # one model of 100 fits
    coder = await pool.acquire(pool.catalog.models["coder"])
    small = await pool.acquire(pool.catalog.models["small"])
    assert list(pool.residents) == ["small"] and coder.engine.scheduler.closed
    assert pool.counters["coder"].unloads["room"] == 1
    assert small.engine.state == "ready"
    pool.close()


async def test_a_model_holding_a_request_is_never_unloaded_for_room(tmp_path):
    factory = Factory()
    pool = pool_for(two_models(tmp_path), factory, budget=150, load_timeout=1.2)
    coder = await pool.acquire(pool.catalog.models["coder"])
    coder.engine.holders += 1  # a request in flight (llamad.serve.models.engine_for)
    with pytest.raises(ModelLoadFailed, match="no room in the memory budget while coder serve"):
        await pool.acquire(pool.catalog.models["small"])
    assert "coder" in pool.residents and not coder.engine.scheduler.closed
    # Once the request is over the room is made.
    coder.engine.holders -= 1
    small = await pool.acquire(pool.catalog.models["small"])
    assert small.state == "ready" and "coder" not in pool.residents
    pool.close()


async def test_max_loaded_bounds_the_set_without_a_budget(tmp_path):
    pool = pool_for(two_models(tmp_path), Factory(), max_loaded=1)
    await pool.acquire(pool.catalog.models["coder"])
    await pool.acquire(pool.catalog.models["small"])
    assert list(pool.residents) == ["small"]
    pool.close()


async def test_keep_alive_expires_idle_models_and_zero_unloads_after_the_request(tmp_path):
    now = [1000.0]
    pool = pool_for(two_models(tmp_path), Factory(), clock=lambda: now[0])
    await pool.start()  # loads the default (coder), which stays
    small = await pool.acquire(pool.catalog.models["small"], keep_alive=5.0)
    now[0] += 4.0
    await asyncio.sleep(0.6)
    assert "small" in pool.residents  # 4 s idle of 5
    now[0] += 2.0
    await asyncio.sleep(0.6)
    assert "small" not in pool.residents and pool.counters["small"].unloads["keep_alive"] == 1
    now[0] += 3600
    await asyncio.sleep(0.6)
    assert "coder" in pool.residents  # no keep_alive: stays
    small = await pool.acquire(pool.catalog.models["small"], keep_alive=0.0)
    small.engine.holders += 1
    await asyncio.sleep(0.6)
    assert "small" in pool.residents  # busy: kept while the request runs
    small.engine.holders -= 1
    pool.released(small)
    await asyncio.sleep(0.3)
    assert "small" not in pool.residents and pool.counters["small"].unloads["request"] == 1
    pool.close()


async def test_a_model_that_fails_to_load_names_itself_and_leaves_the_others(tmp_path):
    factory = Factory(failing={"small": "llama.cpp could not load small.gguf: bad magic"})
    pool = pool_for(two_models(tmp_path), factory)
    await pool.start()
    with pytest.raises(ModelLoadFailed, match="model 'small' could not be loaded: llama.cpp could not load"):
        await pool.acquire(pool.catalog.models["small"])
    assert pool.failures["small"].startswith("llama.cpp") and "small" not in pool.residents
    assert (await pool.acquire(pool.catalog.models["coder"])).state == "ready"
    # The next request tries again (the file may have been replaced).
    factory.failing.clear()
    assert (await pool.acquire(pool.catalog.models["small"])).state == "ready"
    pool.close()


# -- through the faces -----------------------------------------------------------------------


def app_for(tmp_path: Path, extra: str = "", factory: Factory | None = None, **pool_kwargs):
    path = two_models(tmp_path, extra)
    loaded = load_config(path, env={})
    pool = ModelPool(build_catalog(loaded), factory or Factory(), estimate=lambda spec: 100, **pool_kwargs)
    app = create_app(loaded.config, pool=pool)
    app.state.loaded = loaded
    return app, pool, path


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_every_face_routes_by_the_requests_model(tmp_path):
    app, pool, _ = app_for(tmp_path)
    async with AsyncTestClient(app=app) as client:
        openai = await client.post("/v1/chat/completions", json={**CHAT, "model": "small"})
        anthropic = await client.post(
            "/v1/messages", json={**CHAT, "model": "claude-3-5-haiku-latest"}, headers={"anthropic-version": "2023-06-01"}
        )
        sonnet = await client.post("/v1/messages", json={**CHAT, "model": "claude-sonnet-4"}, headers={"anthropic-version": "2023-06-01"})
        responses = await client.post("/v1/responses", json={"model": "small", "input": "hi", "max_output_tokens": 8})
        completions = await client.post("/v1/completions", json={"model": "small", "prompt": "hi", "max_tokens": 8})
        ollama = await client.post("/api/chat", json={**CHAT, "model": "small:latest", "stream": False})
        generate = await client.post("/api/generate", json={"model": "coder", "prompt": "hi", "stream": False})
        embed = await client.post("/v1/embeddings", json={"model": "small", "input": "hi"})
    assert openai.json()["choices"][0]["message"]["content"] == "from small" and openai.json()["model"] == "small"
    assert anthropic.json()["content"][0]["text"] == "from small"
    assert sonnet.json()["content"][0]["text"] == "from coder"
    assert responses.json()["output"][0]["content"][0]["text"] == "from small"
    assert completions.json()["choices"][0]["text"] == "from small"
    assert ollama.json()["message"]["content"] == "from small" and ollama.json()["model"] == "small:latest"
    assert generate.json()["response"] == "from coder"
    assert embed.status_code == 200 and embed.json()["model"] == "small"


async def test_listings_show_the_whole_set_and_what_is_loaded(tmp_path):
    app, pool, _ = app_for(tmp_path)
    async with AsyncTestClient(app=app) as client:
        before = (await client.get("/api/ps")).json()
        await client.post("/api/generate", json={"model": "small"})  # Ollama's load idiom
        after = (await client.get("/api/ps")).json()
        tags = (await client.get("/api/tags")).json()
        models = (await client.get("/v1/models")).json()
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
        unload = (await client.post("/api/generate", json={"model": "small", "keep_alive": 0})).json()
        gone = (await client.get("/api/ps")).json()
    assert [m["name"] for m in before["models"]] == ["coder:latest"]
    assert before["models"][0]["expires_at"].startswith("9999")  # the default stays
    small = next(m for m in after["models"] if m["name"] == "small:latest")
    assert not small["expires_at"].startswith("9999")  # keep_alive 10m
    assert [m["name"] for m in tags["models"]] == ["coder:latest", "small:latest"]
    assert [m["id"] for m in models["data"]] == ["coder", "small"]
    assert {m["model"]: m["state"] for m in health["models"]} == {"coder": "ready", "small": "ready"}
    assert 'llamad_model_loaded{model="small"} 1' in metrics and 'llamad_model_loads_total{model="small"} 1' in metrics
    assert unload["done_reason"] == "unload" and [m["name"] for m in gone["models"]] == ["coder:latest"]
    assert pool.counters["small"].unloads["request"] == 1


@pytest.mark.parametrize(
    "path, body, headers, shape",
    [
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, {}, lambda b: b["error"]["code"] == "model_not_found"),
        ("/v1/messages", {**CHAT, "model": "nope"}, {"anthropic-version": "2023-06-01"}, lambda b: b["error"]["type"] == "not_found_error"),
        ("/api/chat", {**CHAT, "model": "nope"}, {}, lambda b: list(b) == ["error"] and "nope" in b["error"]),
        ("/v1/responses", {"model": "nope", "input": "hi"}, {}, lambda b: b["error"]["code"] == "model_not_found"),
    ],
)
async def test_strict_mode_refuses_an_unknown_name_with_the_familys_404(tmp_path, path, body, headers, shape):
    app, _, _ = app_for(tmp_path, "[router]\nstrict = true\n")
    async with AsyncTestClient(app=app) as client:
        response = await client.post(path, json=body, headers=headers)
        known = await client.post("/v1/chat/completions", json={**CHAT, "model": "small"})
    assert response.status_code == 404 and shape(response.json()) and "coder, small" in response.text
    assert known.status_code == 200


async def test_a_failed_load_is_a_503_naming_the_model_and_others_still_answer(tmp_path):
    app, _, _ = app_for(tmp_path, factory=Factory(failing={"small": "file is corrupt"}))
    async with AsyncTestClient(app=app) as client:
        failed = await client.post("/v1/chat/completions", json={**CHAT, "model": "small"})
        ollama = await client.post("/api/chat", json={**CHAT, "model": "small", "stream": False})
        fine = await client.post("/v1/chat/completions", json={**CHAT, "model": "coder"})
        health = await client.get("/health")
    assert failed.status_code == 503 and "model 'small' could not be loaded: file is corrupt" in failed.json()["error"]["message"]
    assert ollama.status_code == 503 and "small" in ollama.json()["error"]
    assert fine.status_code == 200
    assert health.status_code == 200  # the default model is fine
    assert {m["model"]: m["state"] for m in health.json()["models"]}["small"] == "failed"


async def test_a_loaded_model_keeps_answering_while_another_loads(tmp_path):
    app, pool, _ = app_for(tmp_path, factory=Factory(load_s=1.0))
    transport = httpx.ASGITransport(app=app)
    async with AsyncTestClient(app=app):  # runs the lifespan: coder loads at start
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            loading = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "model": "small"}))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            coder = await client.post("/v1/chat/completions", json={**CHAT, "model": "coder"})
            took = time.monotonic() - started
            small = await loading
    assert coder.status_code == 200 and took < 0.7  # not behind small's 1 s load
    assert small.json()["choices"][0]["message"]["content"] == "from small"


async def test_a_hang_up_while_the_model_loads_is_a_499_and_the_load_goes_on(tmp_path):
    app, pool, _ = app_for(tmp_path, factory=Factory(load_s=0.8))
    body = json.dumps({**CHAT, "model": "small"}).encode()
    sent: list[dict] = []
    async with AsyncTestClient(app=app) as client:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(0.2)  # the client hangs up while the model loads
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"test")], "client": ("127.0.0.1", 1),
                 "server": ("test", 80), "root_path": "", "app": app, "state": {}}
        started = time.monotonic()
        await app(scope, receive, send)
        answered_in = time.monotonic() - started
        for _ in range(40):
            if "small" in pool.residents and pool.residents["small"].state == "ready":
                break
            await asyncio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
        loaded = pool.residents.get("small")
        assert loaded is not None and loaded.state == "ready" and loaded.engine.holders == 0
    assert answered_in < 0.7  # the request ended at the hang-up, not after the load
    assert 'route="/v1/chat/completions",status="499"' in metrics


async def test_a_reload_removes_a_busy_model_only_after_its_request(tmp_path):
    app, pool, path = app_for(tmp_path)
    async with AsyncTestClient(app=app) as client:
        await client.post("/api/generate", json={"model": "small"})
        small = pool.residents["small"]
        small.engine.holders += 1  # a request in flight on it
        coder = gguf(tmp_path / "coder.gguf")
        path.write_text(f'[models.coder]\npath = "{coder}"\ndefault = true\n[models.third]\npath = "{coder}"\n')
        result = await reload_service(app.state, path, env={})
        assert result.ok and result.removed == ["small"]
        listed = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert listed == ["coder", "third"]
        await asyncio.sleep(0.5)
        assert not small.engine.scheduler.closed  # still serving its request
        small.engine.holders -= 1
        for _ in range(30):
            if small.engine.scheduler.closed:
                break
            await asyncio.sleep(0.1)
        assert small.engine.scheduler.closed
        third = await client.post("/v1/chat/completions", json={**CHAT, "model": "third"})
    assert third.json()["choices"][0]["message"]["content"] == "from third"


async def test_an_embedding_model_embeds_and_refuses_chat(tmp_path):
    vectors = gguf(tmp_path / "vectors.gguf")
    app, pool, _ = app_for(tmp_path, f'[models.vectors]\npath = "{vectors}"\nrole = "embeddings"\n')
    async with AsyncTestClient(app=app) as client:
        chat = await client.post("/v1/chat/completions", json={**CHAT, "model": "vectors"})
        embed = await client.post("/v1/embeddings", json={"model": "vectors", "input": ["a", "b"]})
        ollama = await client.post("/api/embed", json={"model": "vectors", "input": "a"})
        shown = await client.post("/api/show", json={"model": "vectors"})
        assert "vectors" in pool.residents
    assert chat.status_code == 400 and "'vectors' is an embedding model" in chat.json()["error"]["message"]
    assert embed.status_code == 200 and embed.json()["model"] == "vectors" and len(embed.json()["data"]) == 2
    assert ollama.json()["model"] == "vectors" and len(ollama.json()["embeddings"]) == 1
    assert shown.json()["capabilities"] == ["embedding"]
