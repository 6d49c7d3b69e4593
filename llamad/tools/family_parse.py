"""Streamed parsers for the tool-call formats that are not JSON objects (llamad.tools.formats):
Qwen3-Coder's XML and gpt-oss's harmony messages. The JSON families (hermes, llama3,
mistral, mistral-args, json) are read by llamad.tools.parse.ToolCallParser.

Both parsers take the answer text in arbitrary pieces and give the same events whatever
the borders: text, then for each call a ToolCallStart as soon as its name is known,
argument fragments that join to one JSON object, and a ToolCallEnd. A call cut off by
max_tokens is closed (its finished members kept); a block that turns out not to be a call
to an offered tool is text after all.

Qwen3-Coder (`<tool_call>\\n<function=n>\\n<parameter=k>\\nv\\n</parameter>\\n</function>\\n</tool_call>`):
a parameter whose schema type is string keeps its raw text (one newline on each side
trimmed); any other value is read as JSON, and kept as a string when it is not JSON. Its
arguments stream one parameter at a time. `<function=…>` without `<tool_call>` is read too.

Harmony (gpt-oss): the analysis channel is reasoning (split by llamad.serve.reasoning with
the family's markers, before this parser); here the message headers
(`<|start|>assistant`, `<|channel|>final<|message|>`, …) are dropped, the final and
commentary channels' messages are text, and a message addressed `to=functions.n` is a
call whose body is the JSON arguments (held until complete; the model ends it with the
end-of-generation token `<|call|>`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llamad.serve.answer import AnswerEvent, TextDelta, ToolCallDelta, ToolCallEnd, ToolCallStart
from llamad.tools.family_grammar import is_string_schema
from llamad.tools.json_repair import JsonPrefix
from llamad.tools.parse import new_call_id

_NAME = re.compile(r"[A-Za-z0-9_.\-:]+")


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    longest = max(len(m) for m in markers)
    for size in range(min(len(text), longest - 1), 0, -1):
        if any(m.startswith(text[-size:]) for m in markers):
            return size
    return 0


class _Calls:
    """What both parsers share: call numbering, the ToolParser properties, and feeding text to
the parser's `_run`."""

    def __init__(self, tools: dict[str, dict], id_prefix: str, parallel: bool):
        self.tools = tools  # name -> parameters schema
        self.id_prefix = id_prefix
        self.parallel = parallel
        self.calls = 0
        self.ended_on_call = False
        self.pending = ""

    def _emit(self, out: list[AnswerEvent], text: str) -> None:
        if text:
            if self.calls and self.ended_on_call:
                if not text.strip():
                    return  # whitespace between or after calls
                text = text.lstrip()
            self.ended_on_call = False
            out.append(TextDelta(text))

    def feed(self, text: str) -> list[AnswerEvent]:
        self.pending += text
        out: list[AnswerEvent] = []
        self._run(out, final=False)
        return out

    def _run(self, out: list[AnswerEvent], final: bool) -> None:
        raise NotImplementedError


class QwenXmlParser(_Calls):
    OPENERS = ("<tool_call>", "<function=")

    def __init__(self, tools: dict[str, dict], id_prefix: str = "call_", parallel: bool = True):
        super().__init__(tools, id_prefix, parallel)
        self.mode = "text"  # text | head | params | tail
        self.raw = ""  # the block's text so far (text again if it is not a call)
        self.name = ""
        self.members = 0

    def finish(self) -> list[AnswerEvent]:
        out: list[AnswerEvent] = []
        self._run(out, final=True)
        if self.mode == "params":  # cut off inside a call: close it with what it has
            self.pending = ""  # the unfinished parameter's markup
            out.append(ToolCallDelta(self.calls, "}" if self.members else "{}"))
            out.append(ToolCallEnd(self.calls))
            self.calls += 1
            self.ended_on_call = False
        elif self.mode == "head":
            self.raw = self.pending = ""  # cut off before the tool name: no call, and no answer text
        self.mode = "text"
        if self.pending:
            self._emit(out, self.pending)
            self.pending = ""
        return out

    def _run(self, out: list[AnswerEvent], final: bool) -> None:
        while True:
            before = (self.mode, self.pending)
            handler = {"text": self._scan, "head": self._head, "params": self._params, "tail": self._tail}[self.mode]
            handler(out, final)
            if (self.mode, self.pending) == before:
                return

    def _text_mode_allowed(self) -> bool:
        return self.parallel or self.calls == 0

    def _scan(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        if not text:
            return
        if not self._text_mode_allowed():
            self._emit(out, text)
            self.pending = ""
            return
        found = [(text.find(m), m) for m in self.OPENERS if m in text]
        if found:
            index, marker = min(found)
            self._emit(out, text[:index])
            self.raw = text[index : index + (len(marker) if marker == "<tool_call>" else 0)]
            self.pending = text[index + len(self.raw) :]
            self.mode = "head"
            return
        keep = 0 if final else _partial_suffix(text, self.OPENERS)
        self._emit(out, text[: len(text) - keep])
        self.pending = text[len(text) - keep :]

    def _give_up(self, out: list[AnswerEvent]) -> None:
        raw, self.raw = self.raw, ""
        self.mode = "text"
        if raw:
            self.ended_on_call = False
            out.append(TextDelta(raw))
        # what follows the opener is scanned again as text
        if self.pending.startswith("<function="):
            out.append(TextDelta("<function="))
            self.pending = self.pending[len("<function=") :]

    def _head(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        stripped = text.lstrip()
        opener = "<function="
        if len(stripped) < len(opener):
            if not opener.startswith(stripped):
                self._give_up(out)
            return
        if not stripped.startswith(opener):
            self._give_up(out)
            return
        close = stripped.find(">")
        if close < 0:
            if not _NAME.fullmatch(stripped[len(opener) :] or "x"):
                self._give_up(out)
            return
        name = stripped[len(opener) : close]
        if name not in self.tools:
            self._give_up(out)
            return
        used = len(text) - len(stripped) + close + 1
        self.raw += text[:used]
        self.pending = text[used:]
        self.name = name
        self.members = 0
        out.append(ToolCallStart(self.calls, new_call_id(self.id_prefix), name))
        self.mode = "params"

    def _params(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        stripped = text.lstrip()
        if stripped.startswith("</function>"):
            out.append(ToolCallDelta(self.calls, "}" if self.members else "{}"))
            out.append(ToolCallEnd(self.calls))
            self.calls += 1
            self.ended_on_call = True
            self.pending = stripped[len("</function>") :]
            self.raw = ""
            self.mode = "tail"
            return
        opener = "<parameter="
        if not stripped.startswith(opener):
            if opener.startswith(stripped) or "</function>".startswith(stripped):
                if final:
                    self._cut(out, "")
                return
            self._cut(out, stripped)
            return
        close = stripped.find(">")
        end = stripped.find("</parameter>")
        if close < 0 or end < 0:
            return  # the parameter is still arriving
        key = stripped[len(opener) : close]
        value = stripped[close + 1 : end]
        if value.startswith("\n"):
            value = value[1:]
        if value.endswith("\n"):
            value = value[:-1]
        schema = ((self.tools.get(self.name) or {}).get("properties") or {}).get(key)
        parsed: Any = value
        if not is_string_schema(schema):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:  # the template renders Python's True/False/None
                parsed = {"True": True, "False": False, "None": None}.get(value.strip(), value)
        piece = ("{" if not self.members else ", ") + json.dumps(key, ensure_ascii=False) + ": "
        out.append(ToolCallDelta(self.calls, piece + json.dumps(parsed, ensure_ascii=False)))
        self.members += 1
        self.pending = stripped[end + len("</parameter>") :]

    def _cut(self, out: list[AnswerEvent], rest: str) -> None:
        """Not the call's shape any more: close the call, the rest is text."""
        out.append(ToolCallDelta(self.calls, "}" if self.members else "{}"))
        out.append(ToolCallEnd(self.calls))
        self.calls += 1
        self.ended_on_call = False
        self.raw = ""
        self.pending = rest
        self.mode = "text"

    def _tail(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending.lstrip()
        if text.startswith("</tool_call>"):
            self.pending = text[len("</tool_call>") :]
            self.mode = "text"
        elif "</tool_call>".startswith(text) and not final:
            if text != self.pending:
                self.pending = text
        else:
            self.pending = "" if "</tool_call>".startswith(text) else text
            self.mode = "text"


class HarmonyParser(_Calls):
    """gpt-oss output after the analysis channel was split off (see the module doc)."""

    HEADER_END = "<|message|>"
    MARKERS = ("<|start|>", "<|channel|>", " to=functions.", "<|end|>", "<|return|>", "<|call|>")

    def __init__(self, tools: dict[str, dict], id_prefix: str = "call_", parallel: bool = True):
        super().__init__(tools, id_prefix, parallel)
        self.mode = "text"  # text | header | call
        self.header = ""
        self.name = ""
        self.scanner = JsonPrefix()
        self.body = ""

    def finish(self) -> list[AnswerEvent]:
        out: list[AnswerEvent] = []
        self._run(out, final=True)
        if self.mode == "call":
            self._end_call(out, complete=False)
        self.mode = "text"
        if self.pending:
            self._emit(out, self.pending)
            self.pending = ""
        return out

    def _run(self, out: list[AnswerEvent], final: bool) -> None:
        while True:
            before = (self.mode, self.pending)
            {"text": self._text_mode, "header": self._header, "call": self._call}[self.mode](out, final)
            if (self.mode, self.pending) == before:
                return

    def _text_mode(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        found = [(text.find(m), m) for m in self.MARKERS if m in text]
        if found:
            index, marker = min(found)
            self._emit(out, text[:index])
            if marker in ("<|end|>", "<|return|>", "<|call|>"):
                self.pending = text[index + len(marker) :]
                return
            self.header = ""
            self.pending = text[index:]
            self.mode = "header"
            return
        keep = 0 if final else _partial_suffix(text, self.MARKERS)
        self._emit(out, text[: len(text) - keep])
        self.pending = text[len(text) - keep :]

    def _header(self, out: list[AnswerEvent], final: bool) -> None:
        """`<|start|>assistant … <|channel|>name [to=functions.n] [<|constrain|>json]<|message|>`."""
        text = self.pending
        end = text.find(self.HEADER_END)
        if end < 0:
            if final:
                self.pending = ""  # a header cut off: no text in it
                self.mode = "text"
            return
        header = text[:end]
        self.pending = text[end + len(self.HEADER_END) :]
        match = re.search(r"to=functions\.([A-Za-z0-9_.\-]+)", header)
        if match and match.group(1) in self.tools and (self.parallel or self.calls == 0):
            self.name = match.group(1)
            self.scanner = JsonPrefix()
            self.body = ""
            self.header = header
            self.mode = "call"
        elif match:  # a call to a tool that was not offered: its message is text
            self.mode = "text"
        else:
            self.mode = "text"

    def _call(self, out: list[AnswerEvent], final: bool) -> None:
        consumed = 0
        for c in self.pending:
            if not self.scanner.feed(c):
                break
            consumed += 1
            if self.scanner.done:
                break
        self.body += self.pending[:consumed]
        self.pending = self.pending[consumed:]
        if self.scanner.done or self.scanner.failed or final:
            self._end_call(out, complete=self.scanner.done)

    def _end_call(self, out: list[AnswerEvent], complete: bool) -> None:
        self.mode = "text"
        try:
            arguments = json.loads(self.body) if complete else None
        except json.JSONDecodeError:
            arguments = None
        if arguments is None and not complete:
            self.scanner.finish()
            closer = None if self.scanner.failed else self.scanner.closer()
            if closer is not None:
                try:
                    arguments = json.loads(self.body + closer)
                except json.JSONDecodeError:
                    arguments = None
        if not isinstance(arguments, dict):
            self._emit(out, self.body)
            return
        out.append(ToolCallStart(self.calls, new_call_id(self.id_prefix), self.name))
        out.append(ToolCallDelta(self.calls, json.dumps(arguments, ensure_ascii=False)))
        out.append(ToolCallEnd(self.calls))
        self.calls += 1
        self.ended_on_call = complete
