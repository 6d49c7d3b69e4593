"""API keys: `Authorization: Bearer <key>` or `x-api-key: <key>`, checked in constant time.

The keys live in an `ApiKeys` holder that the app keeps in its state, so a reload can swap
them without rebuilding the app. No keys configured means no authentication. `/health` is
always open; `/metrics` is open unless `server.metrics_require_key` is set. A refusal is a
401 in the shape of the API family the path belongs to. Keys are never logged.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Iterable

import structlog

from llamad.serve.errors import ApiError, body_of, family_of

log = structlog.get_logger("llamad.auth")

OPEN_PATHS = frozenset({"/health"})
METRICS_PATH = "/metrics"


class ApiKeys:
    """The accepted keys; `replace` swaps them atomically (a reload)."""

    def __init__(self, keys: Iterable[str] = (), require_for_metrics: bool = False):
        self.replace(keys, require_for_metrics)

    def replace(self, keys: Iterable[str], require_for_metrics: bool = False) -> None:
        encoded = tuple(k.encode("utf-8") for k in keys if k)
        self._state = (encoded, require_for_metrics)

    @property
    def enabled(self) -> bool:
        return bool(self._state[0])

    @property
    def require_for_metrics(self) -> bool:
        return self._state[1]

    def accepts(self, presented: str | None) -> bool:
        keys = self._state[0]
        if not keys:
            return True
        if not presented:
            return False
        candidate = presented.encode("utf-8")
        # Compare against every key so the time taken does not tell which key nearly matched.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def __repr__(self) -> str:  # never show the keys themselves
        return f"ApiKeys({len(self._state[0])} keys, metrics_require_key={self._state[1]})"


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every key the request presents: a client may send both headers (the Anthropic SDK
    does when given both `api_key` and `auth_token`), and either may be the right one."""
    keys = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                keys.append(token.strip())
        elif lowered == b"x-api-key" and value.strip():
            keys.append(value.decode("latin-1").strip())
    return keys


def needs_key(path: str, keys: ApiKeys) -> bool:
    if not keys.enabled or path in OPEN_PATHS:
        return False
    if path == METRICS_PATH:
        return keys.require_for_metrics
    return True


class AuthMiddleware:
    """ASGI middleware. Use as `AuthMiddleware(app, keys=holder)`, or in Litestar as
    `DefineMiddleware(AuthMiddleware, keys=holder)`."""

    def __init__(self, app: Any, keys: ApiKeys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "/")
        if not needs_key(path, self.keys):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope.get("headers", ()))
        # Every presented key is checked, so the time taken does not depend on which matched.
        if sum(self.keys.accepts(key) for key in presented):
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        family = family_of(path, any(name.lower() == b"anthropic-version" for name, _ in headers))
        reason = "wrong" if presented else "missing"
        log.warning("auth_failed", path=path, family=family, reason=reason, method=scope.get("method"))
        await _refuse(send, family, reason)


async def _refuse(send: Any, family: str, reason: str) -> None:
    if reason == "missing":
        message = "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
    else:
        message = "invalid API key"
    error = ApiError(401, message, "authentication", code="invalid_api_key" if family == "openai" else None)
    body = json.dumps(body_of(error, family)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="llamad"'),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
