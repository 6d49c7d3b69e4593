"""Thirty-odd malformed requests, each on both API families, against the real server:
each gets the right 4xx in the family's own error shape, and the server stays healthy."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.real

VALID = {
    "openai": {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    "anthropic": {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
}
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


def with_(family: str, **changes) -> bytes:
    body = json.loads(json.dumps(VALID[family]))
    for key, value in changes.items():
        if value is DELETE:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body).encode()


DELETE = object()
NESTED = b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"

# (name, body for openai, body for anthropic, expected status)
CASES = [
    ("malformed JSON", b"{", b"{", 400),
    ("empty body", b"", b"", 400),
    ("JSON null", b"null", b"null", 400),
    ("JSON array", b"[]", b"[]", 400),
    ("JSON string", b'"hello"', b'"hello"', 400),
    ("NaN literal", b'{"messages": NaN}', b'{"messages": NaN}', 400),
    ("invalid UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 4}',
     b'{"messages": [{"role": "user", "content": "\xff\xfe"}], "max_tokens": 4}', 400),
    ("deeply nested JSON", NESTED, NESTED, 400),
    ("number too large for a float", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}',
     b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}', 400),
    ("messages missing", with_("openai", messages=DELETE), with_("anthropic", messages=DELETE), 400),
    ("messages empty", with_("openai", messages=[]), with_("anthropic", messages=[]), 400),
    ("messages not a list", with_("openai", messages="hi"), with_("anthropic", messages="hi"), 400),
    ("message not an object", with_("openai", messages=["hi"]), with_("anthropic", messages=["hi"]), 400),
    ("message is null", with_("openai", messages=[None]), with_("anthropic", messages=[None]), 400),
    ("role missing", with_("openai", messages=[{"content": "x"}]), with_("anthropic", messages=[{"content": "x"}]), 400),
    ("role unknown", with_("openai", messages=[{"role": "wizard", "content": "x"}]),
     with_("anthropic", messages=[{"role": "wizard", "content": "x"}]), 400),
    ("content is a number", with_("openai", messages=[{"role": "user", "content": 5}]),
     with_("anthropic", messages=[{"role": "user", "content": 5}]), 400),
    ("unknown content part type", with_("openai", messages=[{"role": "user", "content": [{"type": "hologram"}]}]),
     with_("anthropic", messages=[{"role": "user", "content": [{"type": "hologram"}]}]), 400),
    ("image content", with_("openai", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     with_("anthropic", messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]), 400),
    ("text part without text", with_("openai", messages=[{"role": "user", "content": [{"type": "text"}]}]),
     with_("anthropic", messages=[{"role": "user", "content": [{"type": "text"}]}]), 400),
    ("max_tokens negative", with_("openai", max_tokens=-5), with_("anthropic", max_tokens=-5), 400),
    ("max_tokens zero", with_("openai", max_tokens=0), with_("anthropic", max_tokens=0), 400),
    ("max_tokens a string", with_("openai", max_tokens="ten"), with_("anthropic", max_tokens="ten"), 400),
    ("max_tokens a float", with_("openai", max_tokens=4.5), with_("anthropic", max_tokens=4.5), 400),
    ("temperature out of range", with_("openai", temperature=7), with_("anthropic", temperature=7), 400),
    ("temperature a string", with_("openai", temperature="hot"), with_("anthropic", temperature="hot"), 400),
    ("top_p above 1", with_("openai", top_p=1.5), with_("anthropic", top_p=1.5), 400),
    ("top_k negative", with_("openai", top_k=-3), with_("anthropic", top_k=-3), 400),
    ("stop is a number", with_("openai", stop=5), with_("anthropic", stop_sequences=5), 400),
    ("stream is a string", with_("openai", stream="yes"), with_("anthropic", stream="yes"), 400),
    ("tools not a list", with_("openai", tools="search"), with_("anthropic", tools="search"), 400),
    ("tool without a name", with_("openai", tools=[{"type": "function", "function": {"description": "x"}}]),
     with_("anthropic", tools=[{"description": "x", "input_schema": {"type": "object"}}]), 400),
    ("prompt longer than the context", with_("openai", messages=[{"role": "user", "content": "lorem ipsum " * 5000}]),
     with_("anthropic", messages=[{"role": "user", "content": "lorem ipsum " * 5000}]), 400),
    ("body larger than the limit", with_("openai", messages=[{"role": "user", "content": "x" * 5_000_000}]),
     with_("anthropic", messages=[{"role": "user", "content": "x" * 5_000_000}]), 413),
]


@pytest.mark.parametrize("family", ["openai", "anthropic"])
@pytest.mark.parametrize("name,openai_body,anthropic_body,status", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(real_server, family, name, openai_body, anthropic_body, status):
    body = openai_body if family == "openai" else anthropic_body
    response = httpx.post(
        real_server + PATHS[family], content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    payload = response.json()
    if family == "openai":
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        assert payload["error"]["message"]
    else:
        assert payload["type"] == "error"
        expected = "request_too_large" if status == 413 else "invalid_request_error"
        assert payload["error"]["type"] == expected and payload["error"]["message"]
        assert response.headers.get("request-id")


def test_anthropic_max_tokens_is_required(real_server):
    response = httpx.post(real_server + "/v1/messages", json={"model": "x", "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400 and "max_tokens" in response.json()["error"]["message"]


@pytest.mark.parametrize("path,family", [("/v1/chat/completion", "openai"), ("/v1/messages/nope", "anthropic")])
def test_unknown_routes_are_404_in_the_family_shape(real_server, path, family):
    response = httpx.post(real_server + path, json={})
    assert response.status_code == 404
    if family == "openai":
        assert response.json()["error"]["type"] == "not_found_error"
    else:
        assert response.json()["error"]["type"] == "not_found_error" and response.json()["type"] == "error"


def test_server_is_healthy_after_the_table(real_server):
    health = httpx.get(real_server + "/health").json()
    assert health["status"] == "ok" and not health["generating"] and health["queue_depth"] == 0
    ok = httpx.post(real_server + "/v1/chat/completions", json=VALID["openai"], timeout=60)
    assert ok.status_code == 200
