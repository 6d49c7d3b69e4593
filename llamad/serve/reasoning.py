"""Splits `<think>…</think>` reasoning (or the family's own markers, such as gpt-oss's
`<|channel|>analysis<|message|>…<|end|>`) from answer text, incrementally.

Text arrives in arbitrary pieces (one per token, tags split anywhere). The splitter holds
back only the few characters that could still become a tag, so answer text streams with
no added delay. Covers: tags split across pieces; output that starts inside reasoning
because the prompt already opened `<think>` (only `</think>` appears); and an unterminated
block at the token limit, which is all reasoning.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


class ReasoningSplitter:
    def __init__(self, starts_in_reasoning: bool = False, markers: tuple[str, str] | None = None):
        """`markers`: the family's (open, close) reasoning markers (llamad.tools.formats:
        `<think>`/`</think>`, or harmony's analysis channel); `<think>` when None."""
        self.open, self.close = markers or (OPEN, CLOSE)
        self.in_reasoning = starts_in_reasoning
        self._held = ""
        # Whitespace right after a tag is dropped: templates put "\n" around them.
        self._skip_leading_ws = starts_in_reasoning
        self._seen_answer = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        """-> [("reasoning" | "text", piece), …] for what is certain so far."""
        out: list[tuple[str, str]] = []
        data = self._held + text
        self._held = ""
        while data:
            tag = self.close if self.in_reasoning else self.open
            index = data.find(tag)
            if index == -1:
                keep = _partial_tag_suffix(data, tag)
                self._emit(out, data[: len(data) - keep])
                self._held = data[len(data) - keep :]
                break
            self._emit(out, data[:index])
            data = data[index + len(tag) :]
            self.in_reasoning = not self.in_reasoning
            self._skip_leading_ws = True
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        held, self._held = self._held, ""
        self._emit(out, held)
        return out

    def _emit(self, out: list[tuple[str, str]], piece: str) -> None:
        if self._skip_leading_ws:
            stripped = piece.lstrip()
            if not stripped:
                return
            piece = stripped
            self._skip_leading_ws = False
        if not piece:
            return
        kind = "reasoning" if self.in_reasoning else "text"
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + piece)
        else:
            out.append((kind, piece))


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
