"""Speculative decoding by n-gram lookup: drafts from the sequence's own tokens.

A sequence that repeats what it has already seen (a file rewritten with one change, a
quoted passage, a loop) can be decoded several tokens per step with no second model: the
last `ngram` tokens are looked up in the sequence's prompt and answer, and the tokens that
followed their latest earlier occurrence are the draft. The step loop
(llamad.engine.slots) feeds the draft beside the sequence's next token, with logits on
every entry, and checks it with the sequence's own sampler: entry i's token is sampled as
if there had been no draft; draft token i+1 is accepted while it equals that sample. The
first mismatch keeps the sampled token and drops the rest of the draft from the KV cache.

For a deterministic draft this "sample, then compare" is the standard acceptance rule
(accept with probability min(1, p/q), where q is one-hot at the drafted token: accepted
with probability p(d), and at a rejection the residual distribution is p without d, which
is what a sample that differed from d was drawn from), so the answers come from the same
distribution as without speculation: greedy answers are the same tokens, and a sampler
with penalties or a grammar advances only by the tokens it keeps.

What a draft costs where none of it is accepted is one wider decode step; on a CPU that is
not free (every drafted entry is a row of logits), so drafts adapt per sequence: a draft
is as long as the last one accepted, doubled (up to `draft_max`), and a sequence whose
drafts keep failing drafts less and less often.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Speculation:
    """The [speculative] settings the step loop drafts with."""

    enabled: bool = True
    ngram: int = 12  # tokens looked up (the key)
    draft_max: int = 32  # tokens one draft may hold
    draft_min: int = 2  # a shorter draft is not fed (the tail of a copy, mostly)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return f"ngram {self.ngram}, draft {self.draft_min}..{self.draft_max} tokens"


# After a draft of which nothing was accepted, the sequence drafts again only after
# 2**misses more tokens (misses: such drafts in a row), at most this many.
MAX_PAUSE = 64


class NgramDrafter:
    """One sequence's tokens (prompt, then each token it generates) and the lookup from each
    `n`-gram to the position that followed its latest occurrence."""

    def __init__(self, n: int, tokens: list[int], draft_max: int, draft_min: int = 1):
        self.n = n
        self.draft_max = draft_max
        self.draft_min = max(1, draft_min)
        self.history = list(tokens)
        self.follows: dict[tuple[int, ...], int] = {}
        self.indexed = n  # n-grams ending before this position are in `follows`
        self.span = draft_max  # the next draft's length at most
        self.misses = 0  # drafts in a row of which nothing was accepted
        self.pause = 0  # tokens still to generate before the next draft

    def append(self, token: int) -> None:
        self.history.append(token)
        if self.pause:
            self.pause -= 1

    def _index(self) -> None:
        # Indexed lazily, when a draft is asked for: a sequence that never drafts pays nothing,
        # and a long prompt is indexed once, on its first draft.
        history, n, follows = self.history, self.n, self.follows
        end = len(history)
        for i in range(self.indexed, end):  # the n-gram history[i-n:i] is followed by history[i]
            follows[tuple(history[i - n : i])] = i
        self.indexed = max(self.indexed, end)

    def draft(self, limit: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the last `n` tokens, at
        most `limit` (and the adaptive span) of them; [] when there is none or it is too short.
        Where that occurrence is recent (a loop), the draft repeats what it has copied: the
        tokens it runs out of are the ones it predicts after the end."""
        limit = min(limit, self.span)
        if self.pause or limit < self.draft_min or len(self.history) <= self.n:
            return []
        self._index()
        history = self.history
        start = self.follows.get(tuple(history[-self.n :]))
        if start is None:
            return []
        draft = history[start : start + limit]
        period = len(history) - start
        while len(draft) < limit:
            draft.append(draft[len(draft) - period])
        return draft

    def verified(self, drafted: int, accepted: int) -> None:
        """How the last draft went: the next one adapts its length, or waits after failures."""
        if accepted == 0:
            self.misses += 1
            self.pause = min(MAX_PAUSE, 2**self.misses)
            self.span = max(self.draft_min, self.span // 2)
            return
        self.misses = 0
        if accepted >= drafted:
            self.span = min(self.draft_max, max(self.span, drafted) * 2)
        else:
            self.span = max(self.draft_min, min(self.draft_max, accepted * 2))
