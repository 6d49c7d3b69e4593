"""Grammar-constrained sampling that stays fast on large vocabularies, and lazy grammars.

llama-cpp-python's own `grammar=` puts llama.cpp's grammar sampler in front of top-k, so
every step checks every token of the vocabulary against the grammar (262k tokens for
Gemma 3: several times slower than free decoding, and far worse for grammars that allow
free text). `GrammarConstraint` is a logits processor that does what llama.cpp's own
server does instead: it checks the model's best candidates first and the whole vocabulary
only when none of them fits.

A grammar whose first line is `# lazy: <marker>` is lazy: the model writes free text, and
only once `<marker>` appears in the output does the grammar (whose root starts with the
marker) constrain the rest. That is how tool_choice "auto" works: free text, but a call,
once begun with `<tool_call>`, is well-formed.

The caller feeds every sampled token back with `accept(token, text)`.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

import numpy as np

LAZY_PREFIX = "# lazy: "
TOP_CANDIDATES = 64
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def lazy_marker(grammar: str) -> str | None:
    first = grammar.split("\n", 1)[0]
    if not first.startswith(LAZY_PREFIX):
        return None
    return first[len(LAZY_PREFIX) :].encode().decode("unicode_escape")


def lazy(grammar: str, marker: str) -> str:
    """`grammar` (whose root starts with `marker`) made lazy."""
    return f"{LAZY_PREFIX}{marker.encode('unicode_escape').decode()}\n{grammar}"


class GrammarError(RuntimeError):
    pass


def check_grammar(vocab: Any, grammar: str) -> None:
    """Raises GrammarError if llama.cpp cannot compile `grammar` (a converter escaping it
    cannot express, say), so a request learns it before generation, not mid-stream."""
    import llama_cpp

    body = grammar.split("\n", 1)[1] if lazy_marker(grammar) is not None else grammar
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, body.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError("llama.cpp could not compile the grammar built from this schema")
    llama_cpp.llama_sampler_free(sampler)


class GrammarConstraint:
    def __init__(self, vocab: Any, grammar: str, after: str | None = None):
        """`after`: the grammar (lazy or not) only starts once this text has been written;
        the engine passes "</think>" when the prompt leaves the model inside reasoning."""
        import llama_cpp

        self.ll = llama_cpp
        self.vocab = vocab
        self.marker = lazy_marker(grammar)
        self.body = grammar.split("\n", 1)[1] if self.marker is not None else grammar
        self.after = after
        self.sampler = None
        self.disabled = False
        self.text = ""  # output so far, while the grammar waits
        self.tokens: list[tuple[int, int]] = []  # (token, where its text starts), while waiting
        self.searched = 0  # where to look for the next marker
        if self.marker is None and after is None:
            self.sampler = self._new_sampler(grammar)

    def _new_sampler(self, grammar: str):
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise GrammarError("llama.cpp could not parse the grammar (see the log above)")
        return sampler

    def close(self) -> None:
        if self.sampler is not None:
            self.ll.llama_sampler_free(self.sampler)
            self.sampler = None

    def __del__(self) -> None:
        self.close()

    # -- the logits processor --------------------------------------------------------------
    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        if self.sampler is None:
            return scores
        count = min(TOP_CANDIDATES, scores.shape[0])
        best = np.argpartition(scores, -count)[-count:]
        allowed = self._allowed(best, scores[best])
        if allowed.size == 0:
            allowed = self._allowed(np.arange(scores.shape[0], dtype=np.int32), scores)
        out = np.full_like(scores, -np.inf)
        out[allowed] = scores[allowed]
        return out

    def _allowed(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        data = np.zeros(ids.shape[0], dtype=_TOKEN_DATA)
        data["id"] = ids
        data["logit"] = logits
        candidates = self.ll.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(self.ll.llama_token_data)),
            size=ids.shape[0],
            selected=-1,
            sorted=False,
        )
        self.ll.llama_sampler_apply(self.sampler, ctypes.byref(candidates))
        return ids[np.isfinite(data["logit"])]

    def allows(self, token: int) -> bool:
        if self.sampler is None:
            return True
        return self._allowed(np.array([token], dtype=np.int32), np.zeros(1, dtype=np.float32)).size == 1

    def allowed_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, fed in order from here, the grammar allows (all of them while
        it does not constrain yet); walked on a copy, so this grammar does not advance."""
        if self.sampler is None:
            return len(tokens)
        ll = self.ll
        probe = ll.llama_sampler_clone(self.sampler)
        try:
            for count, token in enumerate(tokens):
                data = np.zeros(1, dtype=_TOKEN_DATA)
                data["id"] = token
                candidates = ll.llama_token_data_array(
                    data=data.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)), size=1, selected=-1, sorted=False
                )
                ll.llama_sampler_apply(probe, ctypes.byref(candidates))
                if not np.isfinite(data["logit"][0]):
                    return count
                ll.llama_sampler_accept(probe, token)
            return len(tokens)
        finally:
            ll.llama_sampler_free(probe)

    # -- feeding back what was sampled -------------------------------------------------------
    def accept(self, token: int, text: str) -> None:
        """Advances the grammar by a sampled token (`text`: what it decoded to)."""
        if self.sampler is not None:
            if not self.allows(token):  # never hand llama.cpp a token it would throw on
                raise GrammarError(f"token {token} ({text!r}) does not fit the grammar")
            self.ll.llama_sampler_accept(self.sampler, token)
            return
        if self.disabled:
            return
        self.tokens.append((token, len(self.text)))
        self.text += text
        if self.after is not None:
            end = self._find(self.after)
            if end < 0:
                return
            end += len(self.after)
            self.after = None
            self.searched = end
            if self.marker is None:
                if not self._activate(end, leading_space=True):
                    self.disabled = True  # cannot line the grammar up with the tokens: stay free
                return
        start = self._find(self.marker)
        if start >= 0 and not self._activate(start, leading_space=False):
            self.searched = start + 1  # what follows the marker cannot match: look for the next one

    def _find(self, marker: str) -> int:
        start = self.text.find(marker, self.searched)
        if start < 0:
            self.searched = max(self.searched, len(self.text) - len(marker) + 1)
        return start

    def _activate(self, start: int, leading_space: bool) -> bool:
        """Constrains from text[start] on: the grammar is re-rooted to first match the text
        of the token that holds text[start] up to it, and the tokens since are replayed."""
        first = max(i for i, (_, at) in enumerate(self.tokens) if at <= start)
        before = self.text[self.tokens[first][1] : start]
        escaped = before.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        space = " [ \\t\\r\\n]*" if leading_space else ""
        grammar = re.sub(r"(?m)^root ::= ", "lazy-root ::= ", self.body, count=1)
        sampler = self._new_sampler(f'{grammar}\nroot ::= "{escaped}"{space} lazy-root\n')
        self.sampler = sampler
        for token, _ in self.tokens[first:]:
            if not self.allows(token):
                self.ll.llama_sampler_free(sampler)
                self.sampler = None
                return False
            self.ll.llama_sampler_accept(sampler, token)
        self.tokens = []
        return True
