"""A scripted backend for the step loop (llamad.engine.slots): the same interface as the llama.cpp
one, with KV bookkeeping that checks what the loop feeds it (positions in order, logits
read only where the batch asked for them) and an optional limit on KV cells."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from llamad.engine import Generation, TokenLogprob
from fake_engine import fake_scored

EOG = 0


@dataclass
class FakeSampler:
    script: list[int]
    emitted: int = 0


@dataclass
class FakeBackend:
    n_slots: int = 2
    n_ctx: int = 256
    n_batch: int = 64
    prompt_step: int = 16
    batch_rows: int = 1
    kv_cells: int | None = None  # total KV cells; None: unlimited
    decode_delay: float = 0.0
    # The tokens a generation produces (EOG appended); default: five tokens.
    script: Callable[[Generation], list[int]] = lambda g: [101, 102, 103, 104, 105]
    window: int = 0  # a sliding window's size, for `window_dropped`
    window_dropped: dict[int, int] = field(default_factory=dict)
    kv: dict[int, list[int]] = field(default_factory=dict)  # slot -> positions held
    batches: list[dict] = field(default_factory=list)
    grammar_fallbacks: int = 0
    scored: int = 0  # tokens whose logprobs were computed
    lock: threading.Lock = field(default_factory=threading.Lock)
    forbidden: set[int] = field(default_factory=set)  # tokens draft_fits says a grammar refuses

    def __post_init__(self) -> None:
        self.kv = {slot: [] for slot in range(self.n_slots)}
        self._outputs: set[int] = set()

    def new_sampler(self, generation: Generation) -> FakeSampler:
        return FakeSampler(script=list(self.script(generation)) + [EOG])

    def free_sampler(self, sampler: FakeSampler) -> None:
        pass

    def reusable(self, slot: int, keep: int) -> int:
        # As llama.cpp's sliding-window cache: once a slot's first positions are gone there
        # (`window_dropped`: slot -> first position still held), a prefix whose last
        # `window` positions are not all held is not reusable.
        first_held = self.window_dropped.get(slot, 0)
        return keep if first_held == 0 or first_held <= keep - self.window else 0

    def forget(self, slot: int, keep: int) -> bool:
        if keep <= 0:
            self.window_dropped.pop(slot, None)
        self.kv[slot] = [p for p in self.kv[slot] if p < max(keep, 0)]
        return True

    def used(self) -> int:
        return sum(len(held) for held in self.kv.values())

    def decode(self, tokens: list[int], positions: list[int], slots: list[int], outputs: list[bool]) -> int:
        assert len(tokens) <= self.n_batch, f"batch of {len(tokens)} > n_batch {self.n_batch}"
        if self.kv_cells is not None and self.used() + len(tokens) > self.kv_cells:
            return 1
        for position, slot in zip(positions, slots):
            assert position == len(self.kv[slot]), f"slot {slot}: position {position} after {len(self.kv[slot])} cells"
            self.kv[slot].append(position)
        self.batches.append({"tokens": list(tokens), "slots": list(slots), "outputs": list(outputs)})
        self._outputs = {i for i, wanted in enumerate(outputs) if wanted}
        if self.decode_delay:
            time.sleep(self.decode_delay)
        return 0

    def sample(self, sampler: FakeSampler, index: int) -> int:
        assert index in self._outputs, f"logits read at {index}, which asked for none"
        token = sampler.script[min(sampler.emitted, len(sampler.script) - 1)]
        sampler.emitted += 1
        return token

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def draft_fits(self, sampler: FakeSampler, draft: list[int]) -> int:
        # A "grammar" that forbids the tokens in `forbidden`.
        for fits, token in enumerate(draft):
            if token in self.forbidden:
                return fits
        return len(draft)

    def accept(self, sampler: FakeSampler, token: int) -> str:
        return f"t{token} "

    def score(self, index: int, token: int, text: str, top_n: int) -> TokenLogprob:
        assert index in self._outputs, f"logits scored at {index}, which asked for none"
        self.scored += 1
        return fake_scored(text, top_n)

    def save_state(self, slot: int) -> bytes | None:
        return bytes(len(self.kv[slot]))

    def load_state(self, slot: int, data: bytes) -> bool:
        self.kv[slot] = list(range(len(data)))
        return True


@dataclass
class FakeDraftModel:
    """A scripted draft model (llamad.engine.speculative.DraftModel): `guess` maps the tokens
    its context holds for a slot to its next token and that token's probability. Its KV
    bookkeeping checks what the drafter feeds (positions in order) and records every feed."""

    n_slots: int = 2
    n_batch: int = 16
    guess: Callable[[list[int]], tuple[int, float]] = lambda held: (held[-1] + 1, 0.9)
    context: dict[int, list[int]] = field(default_factory=dict)  # slot -> tokens in its cells
    feeds: list[tuple[int, list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.held = [[] for _ in range(self.n_slots)]
        self.context = {slot: [] for slot in range(self.n_slots)}
        self._last: int | None = None

    def feed(self, slot: int, tokens: list[int], start: int) -> bool:
        assert len(tokens) <= self.n_batch, f"a feed of {len(tokens)} > n_batch {self.n_batch}"
        assert start == len(self.context[slot]), f"slot {slot}: fed at {start} after {len(self.context[slot])} cells"
        self.context[slot].extend(tokens)
        self.feeds.append((slot, list(tokens)))
        self._last = slot
        return True

    def best(self) -> tuple[int, float]:
        assert self._last is not None, "logits read before any feed"
        return self.guess(self.context[self._last])

    def forget(self, slot: int, keep: int) -> None:
        del self.context[slot][max(keep, 0) :]
        self._last = None  # the last feed's logits may be of a removed cell
