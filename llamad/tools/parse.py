"""Tool calls out of model text, incrementally: answer text in, answer events out.

Recognised call formats (each checked against the offered tools; anything that does not
name an offered tool with object arguments stays text):

- Hermes / Qwen:   `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the
                   format llamad prompts with and constrains with its grammar)
- Llama 3:         `<|python_tag|>{"name": ..., "parameters": {...}}`, or the bare object
- Mistral:         `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` and
                   `[TOOL_CALLS]name[ARGS]{...}`
- a plain JSON object `{"name": <offered tool>, "arguments"|"parameters": {...}}`, or an
  array of them, at the start of the answer or right after another call (this is also
  what Llama 3 and Mistral calls look like when the engine hides their special tokens).

Streaming: a call whose shape the grammar guarantees (`live=True`, Hermes format) is
reported as soon as its name is known, and its argument text streams at points where a
closing suffix exists, so a call cut off by `max_tokens` is still closed into valid JSON.
Any other call is held back until it is complete, then validated: only a valid call to an
offered tool becomes a call, everything else is emitted as the text it was.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from llamad.serve.answer import AnswerEvent, TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart
from llamad.tools.grammar import CALL_CLOSE, CALL_OPEN, call_prefix
from llamad.tools.json_repair import JsonPrefix

PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MARKERS = (CALL_OPEN, PYTHON_TAG, MISTRAL_CALLS)
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")
_ALNUM = string.ascii_letters + string.digits


def new_call_id(prefix: str) -> str:
    """`call_…` (OpenAI) or `toolu_…` (Anthropic) with 24 random letters and digits."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(24))


def call_arguments(item: Any, tools: set[str]) -> tuple[str, dict] | None:
    """(name, arguments) if `item` is a call object naming an offered tool, else None."""
    if not isinstance(item, dict) or item.get("name") not in tools:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return item["name"], arguments


class ToolCallParser:
    """The `answer.ToolParser` for requests that offer tools."""

    def __init__(self, tools: list[str], id_prefix: str = "call_", parallel: bool = True, live: bool = False):
        self.tools = set(tools)
        self.id_prefix = id_prefix
        self.parallel = parallel
        self.live = live
        self.calls = 0
        self.pending = ""  # text received but not yet handled
        self.mode = "text"  # text | live_head | live_args | buffered | mistral_name | tail
        self.at_boundary = True  # only whitespace since the start or since the last call
        # The answer so far ends with a finished call (no text after it, not cut off).
        self.ended_on_call = False
        self.marker = ""  # the marker that opened the call in progress ("" for a bare object)
        self.raw = ""  # the call's text so far, emitted as text if it turns out not to be one
        self.body = ""  # the JSON read so far (buffered calls)
        self.mistral_name: str | None = None
        self.scanner = JsonPrefix()
        self.held = ""  # argument text read but not yet safe to emit (live calls)
        self.emitted_closer = ""  # what closes the argument text emitted so far
        self.expect_brace = False  # a live call's object still needs its closing brace

    # -- the ToolParser protocol ---------------------------------------------------------
    def feed(self, text: str) -> list[AnswerEvent]:
        self.pending += text
        out: list[AnswerEvent] = []
        self._run(out, final=False)
        return out

    def finish(self) -> list[AnswerEvent]:
        out: list[AnswerEvent] = []
        self._run(out, final=True)
        if self.pending:
            self._emit_text(out, self.pending)
            self.pending = ""
        return out

    def _run(self, out: list[AnswerEvent], final: bool) -> None:
        while True:
            before = (self.mode, self.pending)
            getattr(self, f"_{self.mode}")(out, final)
            if (self.mode, self.pending) == before:
                return  # needs more text (or, when final, nothing is left to do)

    # -- text between calls ----------------------------------------------------------------
    def _text(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        if not text:
            return
        if not (self.parallel or self.calls == 0):
            self._emit_text(out, text)
            self.pending = ""
            return
        if self.at_boundary:
            stripped = text.lstrip(" \t\r\n;" if self.calls else " \t\r\n")
            if not stripped:
                if final:
                    self._emit_text(out, text)
                    self.pending = ""
                return
            if final and self.live and self.calls and CALL_OPEN.startswith(stripped):
                self.pending = ""  # the next call's tag, cut off by max_tokens
                return
            like_marker = any(m.startswith(stripped[: len(m)]) for m in MARKERS)
            if like_marker and not final and not any(stripped.startswith(m) for m in MARKERS):
                return  # "[TOOL_CALLS]" or a JSON array? wait and see
            if stripped[0] in "{[" and not like_marker:
                self._open("", len(text) - len(stripped))
                return
        found = [(text.find(m), m) for m in MARKERS if m in text]
        if found:
            index, marker = min(found)
            self._emit_text(out, text[:index])
            self._open(marker, index)
            return
        keep = 0 if final else _partial_marker(text)
        self._emit_text(out, text[: len(text) - keep])
        self.pending = text[len(text) - keep :]

    def _emit_text(self, out: list[AnswerEvent], text: str) -> None:
        if not text:
            return
        if self.at_boundary and self.calls:
            if not text.strip(" \t\r\n;"):
                return  # separators between calls
            text = text.lstrip(" \t\r\n")
        self.at_boundary = False
        self.ended_on_call = False
        out.append(TextDelta(text))

    def _open(self, marker: str, index: int) -> None:
        """A call may start after `marker`, which begins at pending[index]."""
        self.marker = marker
        self.raw = self.pending[: index + len(marker)]
        self.pending = self.pending[index + len(marker) :]
        self.body = ""
        self.scanner = JsonPrefix()
        self.mistral_name = None
        self.mode = "live_head" if (self.live and marker == CALL_OPEN) else "buffered"

    def _start_call(self, out: list[AnswerEvent], name: str) -> None:
        out.append(ToolCallStart(self.calls, new_call_id(self.id_prefix), name))

    def _end_call(self, out: list[AnswerEvent], complete: bool = True) -> None:
        out.append(ToolCallEnd(self.calls))
        self.ended_on_call = complete
        self.calls += 1
        self.mode = "tail" if self.marker == CALL_OPEN else "text"
        self.at_boundary = True
        self.raw = ""

    # -- calls whose shape the grammar guarantees: streamed --------------------------------
    def _live_head(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending.lstrip(" \n")
        for name in self.tools:
            head = call_prefix(name)
            if text.startswith(head):
                after = text[len(head) :].lstrip()
                if not after and not final:
                    return
                if not after.startswith("{"):
                    break  # arguments as a string (or missing): not the grammar's shape
                self.raw += self.pending[: len(self.pending) - len(text) + len(head)]
                self.pending = text[len(head) :]
                self._start_call(out, name)
                self.held = ""
                self.emitted_closer = "{}"
                self.mode = "live_args"
                return
        else:
            if not text or any(call_prefix(name).startswith(text) for name in self.tools):
                if not final:
                    return  # could still become one of the calls
                # Cut off (max_tokens) before the grammar had written a tool name: there is
                # no call to report, and the markup is not answer text.
                self.raw = self.pending = ""
                self.mode = "text"
                return
        self.mode = "buffered"  # not the grammar's shape: read it whole and validate it

    def _live_args(self, out: list[AnswerEvent], final: bool) -> None:
        index = self.calls
        consumed = 0
        safe = 0  # how much of `held` can be emitted: a closer exists right after it
        for c in self.pending:
            if not self.scanner.feed(c):
                break
            consumed += 1
            self.held += c
            closer = self.scanner.closer()
            if closer is not None:
                safe = len(self.held)
                self.emitted_closer = closer
            if self.scanner.done:
                break
        if safe:
            out.append(ToolCallDelta(index, self.held[:safe]))
            self.held = self.held[safe:]
        self.raw += self.pending[:consumed]
        self.pending = self.pending[consumed:]
        if self.scanner.done:
            self.expect_brace = True
            self._end_call(out)
        elif self.scanner.failed or final:
            # Cut off (max_tokens) or malformed: close what was emitted so it still parses.
            self.scanner.finish()
            closer = None if self.scanner.failed else self.scanner.closer()
            if closer is not None and self.held:
                out.append(ToolCallDelta(index, self.held))
                self.emitted_closer = closer
            if self.emitted_closer:
                out.append(ToolCallDelta(index, self.emitted_closer))
            self.expect_brace = not self.scanner.failed
            self._end_call(out, complete=False)

    def _tail(self, out: list[AnswerEvent], final: bool) -> None:
        """After a Hermes call: the object's closing brace (live calls) and `</tool_call>`."""
        text = self.pending.lstrip(" \t\r\n")
        if self.expect_brace and text:
            self.expect_brace = False
            if text[0] == "}":
                text = text[1:].lstrip(" \t\r\n")
        if text.startswith(CALL_CLOSE):
            self.pending = text[len(CALL_CLOSE) :]
            self.mode = "text"
        elif CALL_CLOSE.startswith(text) and not final:
            self.pending = text  # maybe the closing tag, still arriving
        else:
            self.pending = "" if CALL_CLOSE.startswith(text) else text
            self.mode = "text"
            self.expect_brace = False

    # -- other calls: held back until complete, then validated ----------------------------
    def _buffered(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        if self.marker == MISTRAL_CALLS and self.mistral_name is None and not self.body:
            stripped = text.lstrip()
            if not stripped and not final:
                return
            if stripped and stripped[0] not in "[{":
                self.mode = "mistral_name"
                return
        consumed = 0
        for c in text:
            if not self.scanner.feed(c):
                break
            consumed += 1
            if self.scanner.done:
                break
        self.raw += text[:consumed]
        self.body += text[:consumed]
        self.pending = text[consumed:]
        if not self.scanner.done and final:
            self.scanner.finish()
        if self.scanner.done:
            self._validated(out)
        elif self.scanner.failed or final:
            self._give_up(out)

    def _mistral_name(self, out: list[AnswerEvent], final: bool) -> None:
        """`[TOOL_CALLS]name[ARGS]{...}`: the name, then the arguments object."""
        text = self.pending
        bracket = text.find("[")
        name = (text if bracket < 0 else text[:bracket]).strip()
        rest = "" if bracket < 0 else text[bracket:]
        if not _NAME_CHARS.fullmatch(name) or not (rest.startswith(MISTRAL_ARGS) or MISTRAL_ARGS.startswith(rest)):
            self._give_up(out)
        elif rest.startswith(MISTRAL_ARGS):
            self.raw += text[: bracket + len(MISTRAL_ARGS)]
            self.pending = text[bracket + len(MISTRAL_ARGS) :]
            self.mistral_name = name
            self.mode = "buffered"
        elif final:
            self._give_up(out)

    def _validated(self, out: list[AnswerEvent]) -> None:
        try:
            value = json.loads(self.body)
        except json.JSONDecodeError:
            self._give_up(out)
            return
        if self.mistral_name is not None:
            value = {"name": self.mistral_name, "arguments": value}
        items = value if isinstance(value, list) else [value]
        calls = [call_arguments(item, self.tools) for item in items]
        if not calls or any(call is None for call in calls) or (len(calls) > 1 and not self.parallel):
            self._give_up(out)
            return
        for name, arguments in calls:  # type: ignore[misc]
            self._start_call(out, name)
            out.append(ToolCallDelta(self.calls, json.dumps(arguments, ensure_ascii=False)))
            self.expect_brace = False
            self._end_call(out)

    def _give_up(self, out: list[AnswerEvent]) -> None:
        """Not a valid call: everything read for it is text after all; what follows is
        scanned again as text (the marker itself is behind us)."""
        self.mode = "text"
        raw, self.raw = self.raw, ""
        self.at_boundary = False
        if raw:
            self.ended_on_call = False
            out.append(TextDelta(raw))


def _partial_marker(text: str) -> int:
    """How many trailing characters could be the start of a call marker."""
    longest = max(len(m) for m in MARKERS)
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in MARKERS):
            return size
    return 0
