"""Incremental JSON scanning: where a JSON value ends, and how to close a cut-off one.

`JsonPrefix` reads a JSON value one character at a time. At any point it can say what
suffix turns the text read so far into valid JSON (`closer`), or that none can yet (in
the middle of a number, an escape, an object key, or before a member's value). The
tool-call parser streams argument text only at points where a closer exists, so a call
cut off by `max_tokens` still ends with arguments that parse, holding only the members
the model finished writing (a string value may be cut short).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERAL_CHARS = set("0123456789+-.eEtruefalsn")
_WS = " \t\r\n"


class JsonPrefix:
    def __init__(self) -> None:
        self.stack: list[str] = []
        # value | first_item | first_key | key | in_key | colon | in_string | literal | after | done
        self.mode = "value"
        self.escape = 0  # characters of an escape sequence still to come (\ then u + 4 hex)
        self.literal = ""
        self.failed = False

    @property
    def done(self) -> bool:
        return self.mode == "done"

    def _closers(self) -> str:
        return "".join("}" if c == "{" else "]" for c in reversed(self.stack))

    def closer(self) -> str | None:
        """The suffix that completes the text so far as valid JSON, or None if none can now."""
        mode = self.mode
        if self.failed:
            return None
        if mode == "done":
            return ""
        if mode in ("first_item", "first_key", "after"):
            return self._closers()
        # No closer inside a key or before its value: inventing `"partial_key": null` would
        # hand the client a member nobody wrote. Text stops at the last complete member.
        if mode == "in_string":
            return None if self.escape else '"' + self._closers()
        if mode == "literal":
            if self.literal in ("true", "false", "null") or _NUMBER.fullmatch(self.literal):
                return self._closers()
            return None
        return None  # "key": after a comma in an object

    def feed(self, c: str) -> bool:
        """Reads one character; False when it cannot belong to the value (or after the end)."""
        if self.failed or self.mode == "done":
            return False
        mode = self.mode
        if mode in ("in_string", "in_key"):
            if self.escape:
                if self.escape == 5 and c == "u":
                    self.escape = 4
                elif self.escape == 5:
                    if c not in '"\\/bfnrt':
                        return self._fail()
                    self.escape = 0
                else:
                    if c not in "0123456789abcdefABCDEF":
                        return self._fail()
                    self.escape -= 1
            elif c == "\\":
                self.escape = 5
            elif c == '"':
                self.mode = "colon" if mode == "in_key" else "after"
                self._maybe_done()
            return True
        if mode == "literal":
            if c in _LITERAL_CHARS:
                self.literal += c
                return True
            if not (self.literal in ("true", "false", "null") or _NUMBER.fullmatch(self.literal)):
                return self._fail()
            self.mode = "after"
            self._maybe_done()
            if self.mode == "done":
                return False  # the character after a top-level scalar is not part of it
            return self.feed(c)
        if c in _WS:
            return True
        if mode in ("value", "first_item"):
            if mode == "first_item" and c == "]":
                return self._close("[")
            if c == "{":
                self.stack.append("{")
                self.mode = "first_key"
            elif c == "[":
                self.stack.append("[")
                self.mode = "first_item"
            elif c == '"':
                self.mode = "in_string"
            elif c in "-0123456789tfn":
                self.mode = "literal"
                self.literal = c
            else:
                return self._fail()
            return True
        if mode in ("first_key", "key"):
            if mode == "first_key" and c == "}":
                return self._close("{")
            if c != '"':
                return self._fail()
            self.mode = "in_key"
            return True
        if mode == "colon":
            if c != ":":
                return self._fail()
            self.mode = "value"
            return True
        if mode == "after":
            if c == ",":
                self.mode = "key" if self.stack[-1] == "{" else "value"
                return True
            if c in "}]":
                return self._close("{" if c == "}" else "[")
            return self._fail()
        return self._fail()

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return self._fail()
        self.stack.pop()
        self.mode = "after"
        self._maybe_done()
        return True

    def _maybe_done(self) -> None:
        if self.mode == "after" and not self.stack:
            self.mode = "done"

    def _fail(self) -> bool:
        self.failed = True
        return False

    def finish(self) -> None:
        """End of input: a top-level number or literal is complete here."""
        if self.mode == "literal" and not self.stack and self.closer() is not None:
            self.mode = "done"


def close_json(text: str) -> str | None:
    """`text` completed into valid JSON (a cut-off value closed, a member cut off before
    its value dropped), or None if it cannot be."""
    scanner = JsonPrefix()
    safe_at, safe_closer = 0, None  # the last point a closer existed, and that closer
    for i, c in enumerate(text):
        if not scanner.feed(c):
            if scanner.done and not text[i:].strip():
                return text
            return None
        closer = scanner.closer()
        if closer is not None:
            safe_at, safe_closer = i + 1, closer
    scanner.finish()
    if scanner.done:
        return text
    closer = scanner.closer()
    if closer is not None:
        return text + closer
    return None if safe_closer is None else text[:safe_at] + safe_closer
