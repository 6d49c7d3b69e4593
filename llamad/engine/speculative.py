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
not free (every drafted entry is a row of logits, and at 8k tokens of context a row of
attention over all of them: 0.4 of a plain step each, measured), so drafts adapt per
sequence: a draft is as long as the last one accepted, doubled (up to `draft_max`), and a
sequence whose drafts keep failing drafts less and less often. And no longer than it pays
(worthwhile_length): the step loop measures what a step takes by its width (StepCosts:
on a CPU a wide batch is much cheaper per entry than a narrow one), and each sequence keeps
the odds that its next drafted token is kept (DraftOdds). The j-th token of a draft is
kept with probability odds**j and then saves a plain step's share of time; the draft fed
is the length whose expected saving beats what it adds to the step by the most.

With a draft model ([speculative] draft_model, llamad.engine.llama_draft), a sequence whose
lookup finds nothing asks the small model instead (ModelDrafter): it reads what the
sequence has accepted since it last drafted and continues it greedily, while its choice is
probable enough. The check is the same, so the answers still do not change.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from llamad.engine.prompt_cache import common_prefix


@dataclass(frozen=True)
class Speculation:
    """The [speculative] settings the step loop drafts with."""

    enabled: bool = True
    ngram: int = 12  # tokens looked up (the key)
    draft_max: int = 32  # tokens one draft may hold
    draft_min: int = 2  # a shorter draft is not fed (the tail of a copy, mostly)
    draft_model: str = ""  # the draft GGUF's file name, where one drafts too (for describe)
    draft_p_min: float = 0.75  # a model draft stops before a token less probable than this

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        model = f", draft model {self.draft_model} (p_min {self.draft_p_min})" if self.draft_model else ""
        return f"ngram {self.ngram}, draft {self.draft_min}..{self.draft_max} tokens{model}"


# After a draft of which nothing was accepted, the sequence drafts again only after
# 2**misses more tokens (misses: such drafts in a row), at most this many.
MAX_PAUSE = 64


class DraftOdds:
    """The odds that a drafted token is kept: drafted positions kept against positions where
    drafts broke off, recent drafts weighing most (`keep`: each draft's weight against the
    next one's). A sequence starts from the odds of the engine's recent drafts (the step
    loop keeps those too), as if from five positions; the engine's own start at 0.8, since a
    12-token match is good evidence and drafting is how the odds are learned."""

    def __init__(self, p: float = 0.8, keep: float = 0.8) -> None:
        self.kept, self.lost = 5 * p, 5 * (1 - p)
        self.keep = keep
        self.drafts = 0

    def verified(self, drafted: int, accepted: int) -> None:
        self.drafts += 1
        self.kept = self.keep * self.kept + accepted
        self.lost = self.keep * self.lost + (1 if accepted < drafted else 0)

    @property
    def p(self) -> float:
        return self.kept / (self.kept + self.lost)


class StepCosts:
    """What a decode-only step takes, by its width (entries in the batch), as the step loop
    measured it: a moving average per width, straight lines between the widths measured.
    Wider than any measured, a step is taken to cost what the widest did: so a wider draft
    is tried, and measured, before its cost can rule it out."""

    def __init__(self) -> None:
        self.widths: list[int] = []
        self.seconds: dict[int, float] = {}

    def measured(self, width: int, seconds: float) -> None:
        before = self.seconds.get(width)
        if before is None:
            bisect.insort(self.widths, width)
            self.seconds[width] = seconds
        else:
            self.seconds[width] = 0.8 * before + 0.2 * seconds

    def at(self, width: int) -> float | None:
        widths, seconds = self.widths, self.seconds
        if not widths:
            return None
        i = bisect.bisect_left(widths, width)
        if i < len(widths) and widths[i] == width:
            return seconds[width]
        if i == 0:
            return seconds[widths[0]]
        if i == len(widths):
            return seconds[widths[-1]]
        low, high = widths[i - 1], widths[i]
        return seconds[low] + (seconds[high] - seconds[low]) * (width - low) / (high - low)


# A draft must be expected to save this much of a stream's plain step, net of its cost: the
# odds and the measured costs are estimates, and where they barely favour a draft (deep in
# a long context, drafts that keep one token in two) the draft lost more than it saved.
MARGIN = 0.25


def worthwhile_length(
    p: float, share: float, costs: StepCosts, width: int, longest: int, shortest: int = 1, rows: int = 1
) -> int:
    """How many of a draft's first `longest` tokens to feed in a step `width` entries wide
    so far: the j-th is kept with probability p**j (every one before it kept) and then saves
    `share` seconds (a plain step's time per stream); the draft adds costs.at(width + k) -
    costs.at(width). The length with the largest expected gain; 0 when none gains more than
    MARGIN of a share, or the best is shorter than `shortest`.

    `rows`: the backend's matrix kernels take a batch in groups of that many entries, and
    each entry past the last whole group costs about a plain step of its own (llama.cpp's
    CPU kernels for repacked weights, rows = 4). Only the lengths that end the step on a
    group's edge are weighed then, where there is one from `shortest` to `longest`: the
    loop measures the widths it feeds, so an edge's cheap width never has to be guessed
    from a dear one beside it."""
    first_edge = shortest + (-(width + shortest)) % rows
    aligned = rows > 1 and first_edge <= longest
    base = costs.at(width)
    if base is None:
        return longest - (width + longest) % rows if aligned else longest
    best, best_gain = 0, MARGIN * share
    kept, reach = 0.0, 1.0
    for k in range(1, longest + 1):
        reach *= p
        kept += reach
        if k < shortest or (aligned and (width + k) % rows):
            continue
        gain = kept * share - (costs.at(width + k) or base) + base
        if gain > best_gain:
            best, best_gain = k, gain
    return best


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
        self.span = grown_span(self.span, drafted, accepted, self.draft_min, self.draft_max)

    def release(self) -> None:
        """The sequence is over (the lookup holds nothing outside itself)."""


def grown_span(span: int, drafted: int, accepted: int, lowest: int, highest: int) -> int:
    """The next draft's length at most: doubled after a wholly accepted draft, twice what was
    accepted after a partly accepted one, halved after a rejected one."""
    if accepted == 0:
        return max(lowest, span // 2)
    if accepted >= drafted:
        return min(highest, max(span, drafted) * 2)
    return max(lowest, min(highest, accepted * 2))


class Drafter(Protocol):
    """What the step loop asks of one sequence's drafts (NgramDrafter, ModelDrafter)."""

    draft_min: int

    def append(self, token: int) -> None:
        """A token the sequence kept (its next token, or an accepted draft token)."""
        ...

    def draft(self, limit: int) -> list[int]:
        """The tokens after the last one appended, at most `limit`; [] for none."""
        ...

    def verified(self, drafted: int, accepted: int) -> None:
        """How the last draft went (the tokens kept are appended first)."""
        ...

    def release(self) -> None:
        """The sequence is over: nothing it drafted and did not keep may stay anywhere."""
        ...


class DraftModel(Protocol):
    """A second model's context, one sequence per slot (llamad.engine.llama_draft)."""

    n_batch: int  # tokens one feed may carry
    held: list[list[int]]  # per slot: the tokens whose KV the draft context holds, in order

    def feed(self, slot: int, tokens: list[int], start: int) -> bool:
        """Decodes `tokens` at positions start.. of the slot's sequence, with logits for the
        last; False when it could not (no KV room): nothing was written."""
        ...

    def best(self) -> tuple[int, float]:
        """The most probable token after the last one fed, and its probability."""
        ...

    def forget(self, slot: int, keep: int) -> None:
        """Removes the slot's cells from position `keep` on."""
        ...


class ModelDrafter:
    """One sequence's drafts: the n-gram lookup's where it has one (free, and a copy is
    accepted for long stretches), otherwise the draft model's greedy continuation.

    The draft context's cells for the slot follow the sequence's accepted tokens: what is new
    is fed when a draft is asked for (one batch, so a run of accepted tokens costs one
    decode), and cells past where the two part (a rejected draft, drafted tokens the loop
    did not feed) are removed as soon as the verification says so. What the slot held for
    an earlier request stays while the new one's tokens share it: its prompt prefix is not
    read twice."""

    def __init__(
        self, lookup: NgramDrafter, model: DraftModel, slot: int, draft_max: int, draft_min: int, p_min: float
    ):
        self.lookup = lookup
        self.model = model
        self.slot = slot
        self.draft_max = draft_max
        self.draft_min = max(1, draft_min)
        self.p_min = p_min
        self.span = draft_max
        self.source = ""  # which drafted last: "ngram" or "model"

    @property
    def history(self) -> list[int]:
        return self.lookup.history

    def append(self, token: int) -> None:
        self.lookup.append(token)

    def draft(self, limit: int) -> list[int]:
        copied = self.lookup.draft(limit)
        if copied:
            self.source = "ngram"
            return copied
        self.source = "model"
        limit = min(limit, self.span)
        if limit < self.draft_min:
            return []
        return self._continue(limit)

    def _continue(self, limit: int) -> list[int]:
        model, slot, history = self.model, self.slot, self.history
        held = model.held[slot]
        # The last accepted token is fed again if the context holds it already: its logits
        # are what the draft starts from.
        self._trim(min(common_prefix(held, history), len(history) - 1))
        new = history[len(held) :]
        for at in range(0, len(new), model.n_batch):
            chunk = new[at : at + model.n_batch]
            if not model.feed(slot, chunk, len(held)):
                self._trim(0)  # no room: the slot starts over on its next draft
                return []
            held.extend(chunk)
        draft: list[int] = []
        while True:
            token, p = model.best()
            if p < self.p_min:
                break
            draft.append(token)
            if len(draft) >= limit or not model.feed(slot, [token], len(held)):
                break
            held.append(token)
        return draft if len(draft) >= self.draft_min else []

    def verified(self, drafted: int, accepted: int) -> None:
        if self.source == "ngram":
            self.lookup.verified(drafted, accepted)
        else:
            self.span = grown_span(self.span, drafted, accepted, self.draft_min, self.draft_max)
        self.release()

    def release(self) -> None:
        """Drops the slot's draft cells past what the sequence has accepted."""
        self._trim(common_prefix(self.model.held[self.slot], self.history))

    def _trim(self, keep: int) -> None:
        held = self.model.held[self.slot]
        if keep < len(held):
            self.model.forget(self.slot, keep)
            del held[keep:]
