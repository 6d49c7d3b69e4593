"""Answer events -> Anthropic Messages stream events, and those events folded into a message.

`MessageStream` is the small state machine between the shared answer pipeline
(llamad.serve.answer) and the wire: it numbers content blocks from 0, keeps exactly one block
open at a time, closes a thinking block with one `signature_delta`, and ends with
`message_delta` (stop reason, cumulative usage) and `message_stop`. A streamed reply
frames its events; a non-streamed reply is the same events folded by `fold_message`.

`cleaned` (with `CleanText`) is the filter behind `/v1/messages/clean`: no reasoning,
and answer text without the chat-template markers the model wrote as text or surrounding
whitespace, incrementally.
"""

from __future__ import annotations

import json
import re
import secrets
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import structlog

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

log = structlog.get_logger("llamad.anthropic")

# A local model signs nothing; clients only need an opaque, non-empty string to replay.
THINKING_SIGNATURE = "llamad-unsigned"

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}

# (event type, payload) — the payload's own "type" always equals the event type.
WireEvent = tuple[str, dict[str, Any]]


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def stop_reason(finish: Finish) -> str:
    if finish.stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish.reason, "end_turn")


def _usage(prompt_tokens: int, output_tokens: int, reused_tokens: int) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` is the part of the prompt not read from the cache;
    the prompt's KV states reused from an earlier request are `cache_read_input_tokens`."""
    return {
        "input_tokens": prompt_tokens - reused_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": reused_tokens,
    }


@dataclass
class MessageStream:
    """One reply's stream state: feed answer events in, get wire events out."""

    model: str
    input_tokens: int  # the whole prompt
    # Prompt tokens the KV cache is expected to reuse: message_start goes out before the
    # engine has evaluated the prompt; message_delta then carries the real count.
    expected_reuse: int = 0
    message_id: str = field(default_factory=new_message_id)
    _index: int = -1
    _open: str | None = None  # kind of the open block: "thinking" | "text" | "tool_use"
    _open_tool: int | None = None  # answer-pipeline index of the open tool call
    finished: bool = False

    def start(self) -> list[WireEvent]:
        message = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(self.input_tokens, 0, self.expected_reuse),
        }
        # A ping follows at once, as Anthropic's own stream has it: the answer is under way.
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def feed(self, event: AnswerEvent) -> list[WireEvent]:
        if isinstance(event, Keepalive):
            return [("ping", {"type": "ping"})]
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return []
            out = self._ensure_open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            return out + [self._delta({"type": "thinking_delta", "thinking": event.text})]
        if isinstance(event, TextDelta):
            if not event.text:
                return []
            out = self._ensure_open("text", {"type": "text", "text": ""})
            return out + [self._delta({"type": "text_delta", "text": event.text})]
        if isinstance(event, ToolCallStart):
            out = self._close()
            out += self._open_block("tool_use", {"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
            self._open_tool = event.index
            return out
        if isinstance(event, ToolCallDelta):
            if self._open != "tool_use" or self._open_tool != event.index or not event.arguments:
                return []
            return [self._delta({"type": "input_json_delta", "partial_json": event.arguments})]
        if isinstance(event, ToolCallEnd):
            return self._close() if self._open == "tool_use" and self._open_tool == event.index else []
        if isinstance(event, Finish):
            return self.finish(event)
        return []

    def finish(self, finish: Finish) -> list[WireEvent]:
        out = self._close()
        self.finished = True
        reason = stop_reason(finish)
        out.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": reason,
                        "stop_sequence": finish.stop_sequence if reason == "stop_sequence" else None,
                    },
                    "usage": _usage(self.input_tokens, finish.usage.completion_tokens, finish.usage.cached_tokens),
                },
            )
        )
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    # -- blocks -----------------------------------------------------------------------------
    def _ensure_open(self, kind: str, block: dict[str, Any]) -> list[WireEvent]:
        if self._open == kind:
            return []
        return self._close() + self._open_block(kind, block)

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[WireEvent]:
        self._index += 1
        self._open = kind
        return [("content_block_start", {"type": "content_block_start", "index": self._index, "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> WireEvent:
        return ("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def _close(self) -> list[WireEvent]:
        if self._open is None:
            return []
        out: list[WireEvent] = []
        if self._open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": THINKING_SIGNATURE}))
        out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._open = None
        self._open_tool = None
        return out


def fold_message(events: list[WireEvent]) -> dict[str, Any]:
    """The non-streamed message: the wire events of a stream, folded together."""
    message: dict[str, Any] = {}
    partial_json: dict[int, str] = {}
    for kind, payload in events:
        if kind == "message_start":
            message = {**payload["message"], "content": []}
        elif kind == "content_block_start":
            message["content"].append(dict(payload["content_block"]))
        elif kind == "content_block_delta":
            block = message["content"][payload["index"]]
            delta = payload["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial_json[payload["index"]] = partial_json.get(payload["index"], "") + delta["partial_json"]
        elif kind == "message_delta":
            message.update(payload["delta"])
            message["usage"] = {**message["usage"], **payload["usage"]}
    for index, text in partial_json.items():
        message["content"][index]["input"] = tool_input(text)
    return message


def tool_input(arguments: str) -> dict[str, Any]:
    """Tool-call arguments as the object `tool_use.input` must be."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        log.warning("tool_arguments_not_json", arguments=arguments[:200])
        return {}
    return value if isinstance(value, dict) else {"value": value}


# -- /v1/messages/clean -------------------------------------------------------------------
# Turn markers of the common chat templates (Gemma, ChatML, Llama 3, Phi, Mistral, ...).
_MARKER = re.compile(
    r"<\|[A-Za-z0-9_]+\|>"
    r"|<(?:start|end)_of_turn>"
    r"|</?s>|<eos>|<bos>|<pad>"
    r"|\[/?INST\]"
)
# Longest text that may still grow into a marker: held back until it is decided.
_MAX_MARKER = 32


class CleanText:
    """Removes template markers from answer text and trims it, across chunk borders."""

    def __init__(self) -> None:
        self._held = ""
        self._started = False  # a non-space character has been sent

    def feed(self, text: str) -> str:
        data = _MARKER.sub("", self._held + text)
        cut = _undecided_tail(data)
        ready, self._held = data[:cut], data[cut:]
        # Trailing whitespace waits: it is sent only if more text follows it.
        body = ready.rstrip()
        self._held = ready[len(body) :] + self._held
        if not self._started:
            body = body.lstrip()
            if not body:
                self._held = self._held.lstrip()
                return ""
            self._started = True
        return body

    def finish(self) -> str:
        data, self._held = _MARKER.sub("", self._held), ""
        data = data.strip() if not self._started else data.rstrip()
        if data:
            self._started = True
        return data


def _undecided_tail(text: str) -> int:
    """Where the part that could still become a marker begins (len(text) if none)."""
    window = max(0, len(text) - _MAX_MARKER)
    cut = len(text)
    for opener, closer in (("<", ">"), ("[", "]")):
        start = text.rfind(opener, window)
        if start != -1 and closer not in text[start:]:
            cut = min(cut, start)
    return cut


async def cleaned(events: AsyncIterator[AnswerEvent]) -> AsyncIterator[AnswerEvent]:
    """/clean: no reasoning, and text without template markers or surrounding whitespace."""
    cleaner = CleanText()
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, ReasoningDelta):
                continue
            if isinstance(event, TextDelta):
                text = cleaner.feed(event.text)
                if text:
                    yield TextDelta(text)
                continue
            if not isinstance(event, Keepalive):
                tail = cleaner.finish()
                cleaner = CleanText()
                if tail:
                    yield TextDelta(tail)
            yield event
