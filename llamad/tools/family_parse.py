"""Streamed parsers for the tool-call formats that are not JSON objects (llamad.tools.formats):
Qwen3-Coder's and GLM's XML and gpt-oss's harmony messages. The JSON families (hermes, llama3,
mistral, mistral-args, json) are read by llamad.tools.parse.ToolCallParser.

The parsers take the answer text in arbitrary pieces and give the same events whatever
the borders: text, then for each call a ToolCallStart as soon as its name is known,
argument fragments that join to one JSON object, and a ToolCallEnd. A call cut off by
max_tokens is closed (its finished members kept); a block that turns out not to be a call
to an offered tool is text after all.

Qwen3-Coder (`<tool_call>\\n<function=n>\\n<parameter=k>\\nv\\n</parameter>\\n</function>\\n</tool_call>`):
a parameter whose schema type is string keeps its raw text (one newline on each side
trimmed); any other value is read as JSON, and kept as a string when it is not JSON. Its
arguments stream one parameter at a time. `<function=…>` without `<tool_call>` is read too.

GLM (`<tool_call>n\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>`, the newlines
optional as GLM 4.7 leaves them out): the value of a string property is its raw text, untrimmed; any
other is read as JSON, as Qwen3-Coder's. The call starts once its name is complete (at the
newline or the first `<`); its arguments stream one at a time.

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


def _member(tools: dict[str, dict], name: str, key: str, value: str, members: int) -> str:
    """The JSON text of one argument of a call to `name`, the first one opening the object: a
    string property keeps `value` as it is, any other is read as JSON (kept as the string
    when it is not JSON)."""
    schema = ((tools.get(name) or {}).get("properties") or {}).get(key)
    parsed: Any = value
    if not is_string_schema(schema):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:  # Qwen3-Coder's template renders Python's True/False/None
            parsed = {"True": True, "False": False, "None": None}.get(value.strip(), value)
    piece = ("{" if not members else ", ") + json.dumps(key, ensure_ascii=False) + ": "
    return piece + json.dumps(parsed, ensure_ascii=False)


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
        out.append(ToolCallDelta(self.calls, _member(self.tools, self.name, key, value, self.members)))
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


class GlmParser(_Calls):
    """GLM 4.5-4.7 calls (see the module doc)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    KEY, KEY_END, VALUE, VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"

    def __init__(self, tools: dict[str, dict], id_prefix: str = "call_", parallel: bool = True):
        super().__init__(tools, id_prefix, parallel)
        self.mode = "text"  # text | name | args
        self.name = ""
        self.members = 0

    def finish(self) -> list[AnswerEvent]:
        out: list[AnswerEvent] = []
        self._run(out, final=True)
        if self.mode != "text":  # an unfinished argument or name is neither call nor text
            self.pending = ""
        if self.mode == "args":  # cut off inside a call: close it with the arguments it has
            self._close(out, ended=False)
        self.mode = "text"
        if self.pending:
            self._emit(out, self.pending)
            self.pending = ""
        return out

    def _run(self, out: list[AnswerEvent], final: bool) -> None:
        while True:
            before = (self.mode, self.pending)
            {"text": self._text, "name": self._name, "args": self._args}[self.mode](out, final)
            if (self.mode, self.pending) == before:
                return

    def _text(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        if not text:
            return
        if not (self.parallel or self.calls == 0):
            self._emit(out, text)
            self.pending = ""
            return
        index = text.find(self.OPEN)
        if index >= 0:
            self._emit(out, text[:index])
            self.pending = text[index + len(self.OPEN) :]
            self.mode = "name"
            return
        keep = 0 if final else _partial_suffix(text, (self.OPEN,))
        self._emit(out, text[: len(text) - keep])
        self.pending = text[len(text) - keep :]

    def _name(self, out: list[AnswerEvent], final: bool) -> None:
        text = self.pending
        ends = [i for i in (text.find("\n"), text.find("<")) if i >= 0]
        if not ends:  # the name is still arriving, if it is the start of an offered one
            if not any(tool.startswith(text.lstrip()) for tool in self.tools):
                self._not_a_call(out)
            return
        name = text[: min(ends)].strip()
        if name not in self.tools:
            self._not_a_call(out)
            return
        self.pending = text[min(ends) :]
        self.name = name
        self.members = 0
        out.append(ToolCallStart(self.calls, new_call_id(self.id_prefix), name))
        self.mode = "args"

    def _not_a_call(self, out: list[AnswerEvent]) -> None:
        """The opener was text after all; what follows it is scanned again as text."""
        self.ended_on_call = False
        out.append(TextDelta(self.OPEN))
        self.mode = "text"

    def _args(self, out: list[AnswerEvent], final: bool) -> None:
        stripped = self.pending.lstrip()
        if stripped.startswith(self.CLOSE):
            self._close(out, ended=True)
            self.pending = stripped[len(self.CLOSE) :]
            return
        if not stripped.startswith(self.KEY):
            if not (self.KEY.startswith(stripped) or self.CLOSE.startswith(stripped)):
                self._cut(out, stripped)
            return  # else the next marker is still arriving
        key_end = stripped.find(self.KEY_END)
        if key_end < 0:
            return
        rest = stripped[key_end + len(self.KEY_END) :].lstrip()
        if not rest.startswith(self.VALUE):
            if not self.VALUE.startswith(rest):
                self._cut(out, stripped)
            return
        value_end = rest.find(self.VALUE_END)
        if value_end < 0:
            return
        key = stripped[len(self.KEY) : key_end]
        out.append(ToolCallDelta(self.calls, _member(self.tools, self.name, key, rest[len(self.VALUE) : value_end], self.members)))
        self.members += 1
        self.pending = rest[value_end + len(self.VALUE_END) :]

    def _close(self, out: list[AnswerEvent], ended: bool) -> None:
        out.append(ToolCallDelta(self.calls, "}" if self.members else "{}"))
        out.append(ToolCallEnd(self.calls))
        self.calls += 1
        self.ended_on_call = ended
        self.mode = "text"

    def _cut(self, out: list[AnswerEvent], rest: str) -> None:
        """Not the call's shape any more: the call ends with what it has, the rest is text."""
        self._close(out, ended=False)
        self.pending = rest


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
