"""Answer events -> OpenAI Responses stream events, and the response they add up to.

`ResponseStream` is the state machine between the shared answer pipeline (llamad.serve.answer)
and the wire. It opens with `response.created` and `response.in_progress`, turns each
stretch of reasoning, text or tool call into one output item (`reasoning`, `message`,
`function_call`) with its added / delta / done events, repeats `response.in_progress` as
a keep-alive while the request waits, numbers every event with a strictly
increasing `sequence_number`, and ends with `response.completed` or `response.incomplete`
(or, after an error, `error` and `response.failed`). The terminal event carries the whole
response: a non-streamed reply is that object, so both come from one code path.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llamad.serve.answer import (
    AnswerEvent,
    Finish,
    Keepalive,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from llamad.serve.errors import OPENAI_TYPES, ApiError
from llamad.api.logprobs import token_objects

# (event type, payload); the payload's "type" equals the event type.
WireEvent = tuple[str, dict[str, Any]]
TERMINAL = ("response.completed", "response.incomplete", "response.failed")

# response.failed's error.code must be one of OpenAI's; the kinds llamad has map to these.
FAILED_CODES = {"rate_limit": "rate_limit_exceeded", "invalid_request": "invalid_prompt"}


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def usage_of(finish: Finish, reasoning_tokens: int) -> dict[str, Any]:
    u = finish.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


@dataclass
class ResponseStream:
    """One response's stream state: feed answer events in, get wire events out.

    `echo` holds the request fields a response object repeats (model, instructions, tools,
    tool_choice, text, temperature, …). `count_tokens` counts the reasoning text for
    `usage.output_tokens_details.reasoning_tokens` (the pipeline does not label tokens)."""

    echo: dict[str, Any]
    count_tokens: Callable[[str], int] | None = None
    # The output_text parts carry token log probabilities (the request asked for them).
    with_logprobs: bool = False
    response_id: str = field(default_factory=lambda: new_id("resp_"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = field(default_factory=list)
    _sequence: int = 0
    _open: str | None = None  # type of the open item: "reasoning" | "message" | "function_call"
    _open_call: int | None = None  # answer-pipeline index of the open function call
    _text: str = ""  # text (or arguments) of the open item so far
    _reasoning: str = ""  # all reasoning text, for the token count
    _logprobs: list[dict[str, Any]] = field(default_factory=list)  # the open message's
    finished: bool = False

    # -- the response object ------------------------------------------------------------------
    def response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            **self.echo,
            "output": [dict(item) for item in self.output],
            "usage": None,
            **fields,
        }

    def _event(self, kind: str, **fields: Any) -> WireEvent:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return (kind, payload)

    def start(self) -> list[WireEvent]:
        return [
            self._event("response.created", response=self.response("in_progress")),
            self._event("response.in_progress", response=self.response("in_progress")),
        ]

    # -- answer events ------------------------------------------------------------------------
    def feed(self, event: AnswerEvent) -> list[WireEvent]:
        if isinstance(event, Keepalive):
            # While queued or evaluating a long prompt: a real event, not an SSE comment,
            # because Codex's idle timeout (5 min) counts events and skips comments.
            return [self._event("response.in_progress", response=self.response("in_progress"))]
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return []
            self._reasoning += event.text
            out = self._ensure_open("reasoning")
            self._text += event.text
            return out + [self._event("response.reasoning_text.delta", **self._where(), content_index=0, delta=event.text)]
        if isinstance(event, TextDelta):
            if not event.text:
                return []
            out = self._ensure_open("message")
            self._text += event.text
            logprobs = token_objects(event.logprobs) if self.with_logprobs else []
            self._logprobs += logprobs
            return out + [
                self._event("response.output_text.delta", **self._where(), content_index=0, delta=event.text, logprobs=logprobs)
            ]
        if isinstance(event, ToolCallStart):
            out = self._close()
            item = {
                "id": new_id("fc_"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": event.id,
                "name": event.name,
                "arguments": "",
            }
            out += self._add(item)
            self._open_call = event.index
            return out
        if isinstance(event, ToolCallDelta):
            if self._open != "function_call" or self._open_call != event.index or not event.arguments:
                return []
            self._text += event.arguments
            return [self._event("response.function_call_arguments.delta", **self._where(), delta=event.arguments)]
        if isinstance(event, ToolCallEnd):
            return self._close() if self._open == "function_call" and self._open_call == event.index else []
        if isinstance(event, Finish):
            return self.finish(event)
        return []

    def finish(self, finish: Finish) -> list[WireEvent]:
        cut_off = finish.reason == "length"
        out = self._close(status="incomplete" if cut_off else "completed")
        self.finished = True
        reasoning_tokens = 0
        if self._reasoning and self.count_tokens is not None:
            reasoning_tokens = min(self.count_tokens(self._reasoning), finish.usage.completion_tokens)
        usage = usage_of(finish, reasoning_tokens)
        if cut_off:
            response = self.response("incomplete", incomplete_details={"reason": "max_output_tokens"}, usage=usage)
            out.append(self._event("response.incomplete", response=response))
        else:
            out.append(self._event("response.completed", response=self.response("completed", usage=usage)))
        return out

    def fail(self, error: ApiError) -> list[WireEvent]:
        """After an error mid-stream: the `error` event, then `response.failed`."""
        out = self._close(status="incomplete")
        self.finished = True
        detail = {
            "type": OPENAI_TYPES.get(error.kind, "server_error"),
            "code": error.code,
            "message": error.message,
            "param": error.param,
        }
        # Flat fields for the Responses event type; `error` as well, so the SDK raises on it.
        out.append(self._event("error", code=error.code, message=error.message, param=error.param, error=detail))
        failed = {"code": FAILED_CODES.get(error.kind, "server_error"), "message": error.message}
        out.append(self._event("response.failed", response=self.response("failed", error=failed)))
        return out

    # -- output items -------------------------------------------------------------------------
    def _where(self) -> dict[str, Any]:
        index = len(self.output) - 1
        return {"item_id": self.output[index]["id"], "output_index": index}

    def _add(self, item: dict[str, Any]) -> list[WireEvent]:
        self.output.append(item)
        self._open = item["type"]
        self._text = ""
        return [self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))]

    def _ensure_open(self, kind: str) -> list[WireEvent]:
        if self._open == kind:
            return []
        out = self._close()
        if kind == "message":
            item = {"id": new_id("msg_"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("rs_"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        out += self._add(item)
        out.append(self._event("response.content_part.added", **self._where(), content_index=0, part=part))
        return out

    def _close(self, status: str = "completed") -> list[WireEvent]:
        if self._open is None:
            return []
        where = self._where()
        item = self.output[-1]
        text = self._text
        out: list[WireEvent] = []
        if self._open == "message":
            logprobs, self._logprobs = self._logprobs, []
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
            out.append(self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=logprobs))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        elif self._open == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=text))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=part))
            item["content"] = [part]
        else:
            out.append(self._event("response.function_call_arguments.done", **where, arguments=text))
            item["arguments"] = text
        item["status"] = status
        out.append(self._event("response.output_item.done", output_index=where["output_index"], item=dict(item)))
        self._open = None
        self._open_call = None
        self._text = ""
        return out


def final_response(events: list[WireEvent]) -> dict[str, Any]:
    """The non-streamed reply: the response the terminal event of the same stream carries."""
    for kind, payload in reversed(events):
        if kind in TERMINAL:
            return payload["response"]
    raise RuntimeError("the answer ended without a terminal response event")
