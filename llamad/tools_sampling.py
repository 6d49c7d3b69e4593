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


class GrammarConstraint:
    def __init__(self, vocab: Any, grammar: str):
        import llama_cpp

        self.ll = llama_cpp
        self.vocab = vocab
        self.grammar = grammar
        self.marker = lazy_marker(grammar)
        self.sampler = None
        self.text = ""  # output so far (lazy grammars look for the marker in it)
        self.tokens: list[tuple[int, int]] = []  # (token, where its text starts), while waiting
        self.searched = 0
        if self.marker is None:
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

    # -- feeding back what was sampled -------------------------------------------------------
    def accept(self, token: int, text: str) -> None:
        """Advances the grammar by a sampled token (`text`: what it decoded to)."""
        if self.sampler is not None:
            if not self.allows(token):  # never hand llama.cpp a token it would throw on
                raise GrammarError(f"token {token} ({text!r}) does not fit the grammar")
            self.ll.llama_sampler_accept(self.sampler, token)
            return
        assert self.marker is not None
        self.tokens.append((token, len(self.text)))
        self.text += text
        start = self.text.find(self.marker, self.searched)
        if start < 0:
            self.searched = max(self.searched, len(self.text) - len(self.marker) + 1)
            return
        self._trigger(start)

    def _trigger(self, start: int) -> None:
        """The marker begins at text[start]: constrain from the token that holds it."""
        first = max(i for i, (_, at) in enumerate(self.tokens) if at <= start)
        before = self.text[self.tokens[first][1] : start]
        body = self.grammar.split("\n", 1)[1]
        escaped = before.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        grammar = re.sub(r"(?m)^root ::= ", "lazy-root ::= ", body, count=1) + f'\nroot ::= "{escaped}" lazy-root\n'
        sampler = self._new_sampler(grammar)
        self.sampler = sampler
        for token, _ in self.tokens[first:]:
            if not self.allows(token):
                # what follows the marker cannot be a call: stay free, look for the next one
                self.ll.llama_sampler_free(sampler)
                self.sampler = None
                self.searched = start + 1
                return
            self.ll.llama_sampler_accept(sampler, token)
        self.tokens = []
