"""API keys: each route family with no key, a wrong key, and the right key in each header form."""

from __future__ import annotations

import pytest
from litestar import Litestar, get, head, post
from litestar.middleware import DefineMiddleware
from litestar.testing import AsyncTestClient

from llamad.serve.auth import ApiKeys, AuthMiddleware
from llamad.serve.errors import family_of

KEY = "sk-local-0123456789"


@get("/health")
async def health() -> dict:
    return {"status": "ok"}


@get("/metrics", media_type="text/plain")
async def metrics() -> str:
    return "llamad_requests_total 0\n"


@get("/v1/models")
async def models() -> dict:
    return {"object": "list", "data": []}


@post("/v1/chat/completions", status_code=200)
async def chat() -> dict:
    return {"object": "chat.completion"}


@post("/v1/messages", status_code=200)
async def messages() -> dict:
    return {"type": "message"}


@head("/")
async def root_head() -> None:
    return None


def make_app(keys: ApiKeys) -> Litestar:
    return Litestar(
        route_handlers=[health, metrics, models, chat, messages, root_head],
        middleware=[DefineMiddleware(AuthMiddleware, keys=keys)],
        # Litestar's default logging config would attach a handler to this test's captured
        # stderr, which later tests' loggers then write to after pytest closed it.
        logging_config=None,
    )


ROUTES = [
    ("POST", "/v1/chat/completions", "openai"),
    ("GET", "/v1/models", "openai"),
    ("POST", "/v1/messages", "anthropic"),
    ("POST", "/v1/messages?beta=true", "anthropic"),
]


def assert_refused(response, family: str) -> None:
    assert response.status_code == 401
    body = response.json()
    if family == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    else:
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("method,path,family", ROUTES)
async def test_missing_key_is_refused_in_the_family_shape(method, path, family):
    async with AsyncTestClient(make_app(ApiKeys([KEY]))) as client:
        response = await client.request(method, path, json={})
    assert_refused(response, family)
    assert "Bearer" in response.json().get("error", {}).get("message", "") or family == "anthropic"


@pytest.mark.parametrize("method,path,family", ROUTES)
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
async def test_wrong_key_is_refused(method, path, family, header):
    value = "Bearer nope" if header == "authorization" else "nope"
    async with AsyncTestClient(make_app(ApiKeys([KEY]))) as client:
        response = await client.request(method, path, json={}, headers={header: value})
    assert_refused(response, family)
    assert response.json()["error"]["message"] == "invalid API key"


@pytest.mark.parametrize("method,path,family", ROUTES)
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
async def test_right_key_in_either_header_is_accepted(method, path, family, header):
    value = f"Bearer {KEY}" if header == "authorization" else KEY
    async with AsyncTestClient(make_app(ApiKeys(["another-key", KEY]))) as client:
        response = await client.request(method, path, json={}, headers={header: value})
    assert response.status_code == 200


@pytest.mark.parametrize("bearer, x_api_key, accepted", [
    ("nope", KEY, True), (KEY, "nope", True), ("nope", "nope2", False),
])
async def test_both_headers_sent_either_right_key_is_enough(bearer, x_api_key, accepted):
    async with AsyncTestClient(make_app(ApiKeys([KEY]))) as client:
        response = await client.post("/v1/messages", json={},
                                     headers={"authorization": f"Bearer {bearer}", "x-api-key": x_api_key})
    if accepted:
        assert response.status_code == 200
    else:
        assert_refused(response, "anthropic")


async def test_head_root_is_anthropic_and_protected():
    async with AsyncTestClient(make_app(ApiKeys([KEY]))) as client:
        refused = await client.head("/")
        allowed = await client.head("/", headers={"x-api-key": KEY})
    assert refused.status_code == 401 and allowed.status_code == 200
    assert family_of("/", False) == "anthropic" and family_of("/v1/messages/count_tokens", False) == "anthropic"
    assert family_of("/v1/messages_x", False) == "openai" and family_of("/v1/chat/completions", True) == "openai"
    # elsewhere the anthropic-version header decides (Claude Code calls /v1/models, telemetry routes)
    assert family_of("/v1/models", True) == "anthropic" and family_of("/api/event_logging/batch", True) == "anthropic"
    assert family_of("/v1/models", False) == "openai"


async def test_no_keys_configured_means_no_auth():
    async with AsyncTestClient(make_app(ApiKeys([]))) as client:
        response = await client.post("/v1/chat/completions", json={})
    assert response.status_code == 200


async def test_health_is_open_and_metrics_only_when_asked():
    keys = ApiKeys([KEY], require_for_metrics=False)
    async with AsyncTestClient(make_app(keys)) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        keys.replace([KEY], require_for_metrics=True)
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})).status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_replaced_keys_take_effect_at_once():
    keys = ApiKeys(["old-key"])
    async with AsyncTestClient(make_app(keys)) as client:
        assert (await client.get("/v1/models", headers={"x-api-key": "old-key"})).status_code == 200
        keys.replace(["new-key"])
        assert (await client.get("/v1/models", headers={"x-api-key": "old-key"})).status_code == 401
        assert (await client.get("/v1/models", headers={"x-api-key": "new-key"})).status_code == 200


async def test_keys_never_reach_the_log(capsys, caplog):
    async with AsyncTestClient(make_app(ApiKeys([KEY]))) as client:
        await client.get("/v1/models", headers={"x-api-key": KEY[:-1] + "X"})
        await client.get("/v1/models", headers={"x-api-key": KEY})
    captured = capsys.readouterr()
    everything = captured.out + captured.err + caplog.text
    assert "auth_failed" in everything  # the refusal is logged...
    assert KEY[:-1] not in everything  # ...without the key or the near miss
    assert KEY not in repr(ApiKeys([KEY]))


def test_prefix_of_a_key_is_not_accepted():
    keys = ApiKeys([KEY])
    assert keys.accepts(KEY)
    assert not keys.accepts(KEY[:-1]) and not keys.accepts(KEY + "x") and not keys.accepts("")


# -- through the real app (create_app with the fake engine) -------------------------------

CHAT = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


async def test_real_app_refuses_and_accepts_per_family(make_client):
    async with make_client(LLAMAD_SERVER_API_KEYS="sk-a,sk-b") as client:
        assert (await client.get("/health")).status_code in (200, 503)
        refused = await client.post("/v1/chat/completions", json=CHAT)
        assert_refused(refused, "openai")
        refused = await client.post("/v1/messages", json=CHAT, headers={"x-api-key": "sk-c"})
        assert_refused(refused, "anthropic")
        ok = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-b"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
        ok = await client.post("/v1/messages", json=CHAT, headers={"x-api-key": "sk-a", "anthropic-version": "2023-06-01"})
        assert ok.status_code == 200 and ok.json()["type"] == "message"


async def test_real_app_swaps_keys_through_its_state(make_client):
    async with make_client(LLAMAD_SERVER_API_KEYS="sk-old") as client:
        client.app.state.api_keys.replace(["sk-new"])
        assert (await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "sk-old"})).status_code == 401
        assert (await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "sk-new"})).status_code == 200
