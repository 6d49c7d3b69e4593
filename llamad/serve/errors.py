"""Errors as values, and their wire shapes (OpenAI, Anthropic, Ollama).

Translators raise `InvalidRequest` (llamad.serve.request), the tools layer its typed
errors, the engine its own; `from_exception` is the one place that gives each a status,
and `body_of` renders it in the family's shape, before any byte or inside a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from litestar.exceptions import HTTPException

from llamad.engine import (
    ContextOverflow,
    EngineNotReady,
    GrammarRejected,
    Overloaded,
    PromptError,
    ShuttingDown,
    TokenOutOfRange,
)
from llamad.models.catalog import ModelNotFound, WrongRole
from llamad.models.pool import ModelLoadFailed
from llamad.serve.request import InvalidRequest
from llamad.tools.grammar import ToolSchemaError


@dataclass
class ApiError(Exception):
    status: int
    message: str
    # A family-neutral kind; each family maps it to its own type name.
    kind: str = "invalid_request"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message




HTTP_KINDS = {401: "authentication", 403: "permission", 404: "not_found", 413: "too_large", 429: "rate_limit"}
MESSAGES = {
    404: "no such route; see GET /v1/models, POST /v1/chat/completions, POST /v1/messages",
    405: "this method is not allowed on this route",
    413: "the request body is larger than the server's limit (server.max_body_bytes)",
}

OPENAI_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "too_large": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "overloaded": "server_error",
    "unavailable": "server_error",
    "server": "server_error",
}

ANTHROPIC_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "overloaded": "overloaded_error",
    "unavailable": "api_error",
    "server": "api_error",
}


def family_of(path: str, anthropic_version: bool) -> str:
    """Which API family's error shape a request gets: Ollama's clients call /api/… (without
    an anthropic-version header), Anthropic clients /v1/messages… and `HEAD /`, OpenAI's /v1/chat/…; on any other path (/v1/models, or a route llamad
    does not have, such as Claude Code's telemetry) the `anthropic-version` header tells."""
    if path.startswith("/api/"):  # Claude Code posts telemetry under /api/ too
        return "anthropic" if anthropic_version else "ollama"
    if path == "/" or path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/v1/chat/"):
        return "openai"
    return "anthropic" if anthropic_version else "openai"


def from_exception(exc: BaseException, family: str) -> ApiError:
    """Maps request, tool, engine and framework exceptions to an ApiError for `family`
    ("openai", "anthropic", "ollama"): the one place that gives each its status."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequest):
        return ApiError(400, exc.message, "invalid_request", param=exc.param, code=exc.code)
    if isinstance(exc, ToolSchemaError):
        return ApiError(400, str(exc), "invalid_request", param=exc.param or "tools")
    if isinstance(exc, ContextOverflow):
        if family == "anthropic":
            # Anthropic's own wording, which Claude Code matches exactly (then it compacts the
            # conversation); the maximum leaves room for one generated token.
            message = f"prompt is too long: {exc.prompt_tokens} tokens > {exc.n_ctx - 1} maximum"
            return ApiError(400, message, "invalid_request", param="messages", code="context_length_exceeded")
        return ApiError(400, str(exc), "invalid_request", param="messages", code="context_length_exceeded")
    if isinstance(exc, GrammarRejected):
        message = f"{exc}: simplify the tool parameters or response schema"
        return ApiError(400, message, "invalid_request")
    if isinstance(exc, TokenOutOfRange):
        return ApiError(400, str(exc), "invalid_request", param="prompt")
    if isinstance(exc, PromptError):
        return ApiError(400, str(exc), "invalid_request", param="messages")
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(exc.retry_after)}
        if family == "anthropic":
            return ApiError(529, str(exc), "overloaded", headers=headers)
        status = 503 if isinstance(exc, ShuttingDown) else 429
        kind = "unavailable" if status == 503 else "rate_limit"
        return ApiError(status, str(exc), kind, code="server_overloaded" if status == 429 else None, headers=headers)
    if isinstance(exc, HTTPException):
        kind = HTTP_KINDS.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "server")
        message = MESSAGES.get(exc.status_code, exc.detail)
        return ApiError(exc.status_code, message, kind, headers=dict(exc.headers or {}))
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), "not_found", param="model", code="model_not_found")
    if isinstance(exc, WrongRole):
        return ApiError(400, str(exc), "invalid_request", param="model")
    if isinstance(exc, ModelLoadFailed):
        return ApiError(503, str(exc), "unavailable", code="model_load_failed", headers={"Retry-After": "30"})
    if isinstance(exc, EngineNotReady):
        return ApiError(503, str(exc), "unavailable", code="model_not_loaded", headers={"Retry-After": "5"})
    return ApiError(500, "internal error while generating; see the server log", "server")


# A load balancer that retries a refused request on another board sets this request header
# to a status it can retry (HAProxy 2.6 retries a 503, never a 429 or 529): an overload
# refusal then goes out with that status, and REFUSED_HEADER names the status a direct
# client would have got, so the balancer can restore it when every board refused.
REFUSE_WITH_HEADER = "x-llamad-refuse-with"
REFUSED_HEADER = "X-Llamad-Refused"


def refused_for_balancer(error: ApiError, exc: BaseException, refuse_with: str | None) -> ApiError:
    """`error` (from `exc`) as sent before any response byte to a request that carried
    REFUSE_WITH_HEADER: an overload refusal (queue full, queue timeout, shutting down) takes
    the header's status, keeping body and Retry-After; anything else is unchanged. A value
    that is not an error status (400-599) is ignored."""
    if not isinstance(exc, Overloaded) or refuse_with is None:
        return error
    value = refuse_with.strip()
    if not (value.isdigit() and 400 <= int(value) <= 599):
        return error
    return replace(error, status=int(value), headers={**error.headers, REFUSED_HEADER: str(error.status)})


def openai_body(error: ApiError) -> dict:
    return {
        "error": {
            "message": error.message,
            "type": OPENAI_TYPES.get(error.kind, "invalid_request_error"),
            "param": error.param,
            "code": error.code,
        }
    }


def ollama_body(error: ApiError) -> dict:
    """Ollama's error shape: one string (its clients read `error` and raise it)."""
    return {"error": error.message}


def body_of(error: ApiError, family: str) -> dict:
    if family == "anthropic":
        return anthropic_body(error)
    if family == "ollama":
        return ollama_body(error)
    return openai_body(error)


def anthropic_body(error: ApiError) -> dict:
    return {
        "type": "error",
        "error": {"type": ANTHROPIC_TYPES.get(error.kind, "invalid_request_error"), "message": error.message},
    }
