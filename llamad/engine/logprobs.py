"""Log probabilities of generated tokens: the arithmetic on one row of logits, and keeping
each token's entry with the text the client receives.

Which distribution: the model's own, the log-softmax of the raw logits at that step,
before repetition penalties, top-k/top-p/min-p, temperature and any grammar. So the numbers
describe what the model thought, not what the sampler did with it: at temperature 0 without
a grammar the sampled token is the most likely one; with sampling or a grammar the sampled
token may sit lower (its own log probability is always reported). llama-server reports this
distribution too unless asked for the post-sampling one (`post_sampling_probs`).

The engines call `score` only when a generation asks for logprobs, so the normal step
never touches the 262k-wide row.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from llamad.engine.types import Alternative, TokenLogprob

# OpenAI's value for "very unlikely" where a log probability would be -inf (JSON has no inf).
FLOOR = -9999.0


def score(
    logits: np.ndarray, token: int, text: str, token_bytes: bytes, top_n: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """The entry for `token`, sampled from `logits` (one raw row, n_vocab wide): its log
    probability and the `top_n` most likely tokens. `text`/`token_bytes` are the sampled
    token's text as the answer got it; `piece(id)` gives an alternative's bytes."""
    shifted = logits - logits.max()
    # The max term is exp(0) = 1, so the sum is >= 1 and every log probability <= 0.
    log_total = float(np.log(np.exp(shifted).sum(dtype=np.float64)))

    def logprob(i: int) -> float:
        return max(float(shifted[i]) - log_total, FLOOR)

    top: list[Alternative] = []
    if top_n > 0:
        n = min(top_n, logits.shape[0])
        best = most_likely(shifted, n)
        # Most likely first; equal logits in id order, as a greedy sampler picks them.
        for i in sorted(best.tolist(), key=lambda i: (-shifted[i], i)):
            if i == token:
                top.append(Alternative(i, text, token_bytes, logprob(i)))
            else:
                raw = piece(i)
                top.append(Alternative(i, raw.decode("utf-8", errors="replace"), raw, logprob(i)))
    return TokenLogprob(id=token, text=text, bytes=token_bytes, logprob=logprob(token), top=top)


# Partitioning the whole row costs ~2 ms at 262k entries; the few tokens within a few nats
# of the best are found ten times faster, and hold the top N but on the flattest rows.
NEAR = (-6.0, -24.0)


def most_likely(shifted: np.ndarray, n: int) -> np.ndarray:
    """The ids of the `n` largest entries of `shifted` (whose maximum is 0), in any order."""
    for cutoff in NEAR:
        near = np.flatnonzero(shifted >= cutoff)
        if near.size >= n:
            return near[np.argpartition(shifted[near], -n)[-n:]]
    return np.argpartition(shifted, -n)[-n:]


class Aligner:
    """Keeps token entries with the text the client receives.

    The engine holds text back while it could still become a stop sequence. With
    logprobs asked for, it releases text only up to the end of a whole token (`whole`),
    so each released piece carries exactly the entries of its tokens and a streamed chunk's
    tokens spell its text. When a stop sequence ends the answer, a token whose text runs
    into it is cut to the part before the stop, and tokens wholly inside it are dropped:
    the entries' texts joined are always exactly the text sent.
    """

    def __init__(self) -> None:
        self.decoded = 0  # characters of text the tokens produced so far
        self.released = 0  # characters sent on
        self.waiting: deque[tuple[int, TokenLogprob]] = deque()  # (end offset, entry)

    def add(self, entry: TokenLogprob) -> None:
        self.decoded += len(entry.text)
        self.waiting.append((self.decoded, entry))

    def whole(self, chars: int) -> int:
        """How many of the next `chars` characters end on a token boundary."""
        target = self.released + chars
        boundary = self.released
        for end, _ in self.waiting:
            if end > target:
                break
            boundary = end
        return boundary - self.released

    def release(self, chars: int) -> list[TokenLogprob]:
        """`chars` more characters go to the client: the entries they complete."""
        self.released += chars
        out = []
        while self.waiting and self.waiting[0][0] <= self.released:
            out.append(self.waiting.popleft()[1])
        return out

    def end(self, chars: int) -> list[TokenLogprob]:
        """The last `chars` characters go out and the rest of the text is cut (a stop)."""
        out = self.release(chars)
        if self.waiting:
            end, entry = self.waiting[0]
            start = end - len(entry.text)
            if start < self.released:
                kept = entry.text[: self.released - start]
                out.append(TokenLogprob(entry.id, kept, kept.encode("utf-8"), entry.logprob, entry.top))
        self.waiting.clear()
        return out
