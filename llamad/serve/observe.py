"""Per-request bookkeeping: request id, one log line per request, metrics, write timeout.

An ASGI middleware wraps every request. It gives the request an id (echoed in the
`request-id` header and bound into every log line), lets handlers fill a `RequestRecord`
(tokens, time to first token), and logs and counts the request when its last body byte is
sent, which for a stream is when the stream ends; a response whose end is never sent (the
client hung up, or stopped reading) is a 499. It also bounds how long one `send` may
block, so a client that stops reading cannot hold the engine.

Requests are counted by route template (`/v1/models/{model_id}`), never by raw path, so a
client cannot make new metric series; a path no route matches is "unmatched".
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import structlog
from litestar import Request

from llamad.serve.answer import Answer, AnswerEvent, fold_event

# A deadline per send. asyncio.timeout (3.11+) is a timer; wait_for (3.10, and 3.11's
# implementation) wraps every send in a new task, which showed up as ~15% of the event
# loop's time in a profile of a token stream.
try:
    from asyncio import timeout as _deadline
except ImportError:  # Python 3.10
    _deadline = None

log = structlog.get_logger("llamad.request")

UNMATCHED = "unmatched"  # the route label of a path no route matches
CLIENT_GONE = 499


@dataclass
class RequestRecord:
    request_id: str
    method: str
    route: str  # the route template
    path: str = ""
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    time_to_first_token_s: float | None = None
    decode_s: float = 0.0
    finished: int = 0  # choices whose answer is complete
    error: str | None = None
    error_status: int | None = None
    # With logging.log_content on: the prompt as the model saw it, and the answer folded.
    prompt_text: str | None = None
    answer: Answer | None = None
    # A stream's last event went out: a client that closes the connection then (Codex does,
    # on response.completed) has its whole answer and is not a hang-up.
    answer_sent: bool = False
    choices: int = 1  # generations in the answer (n)
    answer_ending: bool = False  # every choice has ended: the frames sent now close the answer
    # The model that served it (llamad.serve.models), for the log line.
    model: str | None = None
    # Run when the request is over (answer sent, or failed): e.g. letting go of the engine.
    releases: list[Callable[[], None]] = field(default_factory=list)

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def finish(self, finish: Any) -> None:
        """A choice's answer is complete; a request with several choices counts them all."""
        if finish is None:
            return
        first = self.finished == 0
        self.finished += 1
        self.finish_reason = finish.reason
        self.prompt_tokens = finish.usage.prompt_tokens + (0 if first else self.prompt_tokens)
        self.completion_tokens = finish.usage.completion_tokens + (0 if first else self.completion_tokens)
        self.cached_tokens = finish.usage.cached_tokens + (0 if first else self.cached_tokens)
        if first:
            self.time_to_first_token_s = finish.time_to_first_token_s
        self.decode_s += finish.decode_s

    def fail(self, error: Any) -> None:
        self.error = str(error)
        self.error_status = getattr(error, "status", None)


_NULL = RequestRecord(request_id="-", method="-", route="-")


def record_of(request: Request) -> RequestRecord:
    return request.scope.get("state", {}).get("llamad_record", _NULL)


def with_content_logged(request: Request, prompt_text: str, events: AsyncIterator[AnswerEvent]) -> AsyncIterator[AnswerEvent]:
    """With `logging.log_content` on, the request's log line will carry `prompt_text` and
    the answer these events make; off (the default: content may be private), `events` is
    returned as it is, so the token path pays nothing."""
    if not request.app.state.config.logging.log_content:
        return events
    record = record_of(request)
    record.prompt_text = prompt_text
    answer = record.answer = Answer()

    async def noted() -> AsyncIterator[AnswerEvent]:
        async with aclosing(events) as stream:
            async for event in stream:
                fold_event(answer, event)
                yield event

    return noted()


class WriteTimeout(Exception):
    pass


class ObserveMiddleware:
    def __init__(self, app: Any, write_timeout: float, metrics: Any = None):
        self.app = app
        self.write_timeout = write_timeout
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else "req_" + secrets.token_hex(12)
        # Litestar routes before it runs middleware, so the template is known here.
        route = scope.get("path_template") or UNMATCHED
        record = RequestRecord(request_id=request_id, method=scope["method"], route=route, path=scope["path"])
        scope.setdefault("state", {})["llamad_record"] = record
        logged = False
        raised = False

        def done() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            self._log(record)

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    (b"request-id", request_id.encode()),
                    (b"x-request-id", request_id.encode()),
                ]
            try:
                if _deadline is not None:
                    async with _deadline(self.write_timeout):
                        await send(message)
                else:
                    await asyncio.wait_for(send(message), timeout=self.write_timeout)
            except asyncio.TimeoutError:
                record.error = f"client stopped reading for {self.write_timeout:.0f} s"
                raise WriteTimeout(record.error) from None
            if message["type"] == "http.response.body":
                if record.answer_ending and message.get("body"):
                    record.answer_sent = True  # a frame after the last choice's end is out (pipeline.framed)
                if not message.get("more_body", False):
                    done()

        structlog.contextvars.bind_contextvars(request_id=request_id)
        if self.metrics is not None:
            self.metrics.in_flight(+1)
        try:
            await self.app(scope, receive, send_wrapper)
        except WriteTimeout:
            pass
        except Exception as exc:
            raised = True
            record.error = record.error or f"{exc.__class__.__name__}: {exc}"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.in_flight(-1)
            if record.status is None:
                record.status = CLIENT_GONE  # nothing was sent: the client went away first
            elif not logged and not raised and not record.answer_sent:
                # The answer began but its end was never sent: Litestar stops a stream when
                # the client disconnects, and a stalled reader is cut off (WriteTimeout).
                record.status = CLIENT_GONE
                record.error = record.error or "client closed the connection before the answer ended"
            done()
            for release in record.releases:
                release()
            structlog.contextvars.unbind_contextvars("request_id")

    def _log(self, record: RequestRecord) -> None:
        duration = time.monotonic() - record.started
        fields: dict[str, Any] = {
            "method": record.method,
            "route": record.route,
            "path": record.path,
            "status": record.error_status if record.error_status and record.status == 200 else record.status,
            "duration_s": round(duration, 4),
        }
        if record.model is not None:
            fields["model"] = record.model
        if record.prompt_tokens or record.completion_tokens:
            fields.update(
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
                cached_tokens=record.cached_tokens,
                finish_reason=record.finish_reason,
            )
            if record.time_to_first_token_s is not None:
                fields["ttft_s"] = round(record.time_to_first_token_s, 4)
            if record.decode_s > 0 and record.completion_tokens > 1:
                fields["tokens_per_s"] = round((record.completion_tokens - 1) / record.decode_s, 2)
        if record.error:
            fields["error"] = record.error
        if record.prompt_text is not None:
            fields["prompt"] = record.prompt_text
        if record.answer is not None:
            fields["completion"] = record.answer.text
            if record.answer.reasoning:
                fields["reasoning"] = record.answer.reasoning
            if record.answer.tool_calls:
                fields["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in record.answer.tool_calls]
        if self.metrics is not None:
            self.metrics.observe_request(record, fields["status"], duration)
        if record.route in ("/health", "/metrics"):
            log.debug("request", **fields)
        else:
            log.info("request", **fields)
