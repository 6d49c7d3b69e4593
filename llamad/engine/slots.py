"""Continuous batching: N sequences decode together, one `llama_decode` per step.

One thread (the step loop) owns the backend's context. Each step builds one batch: the
next token of every sequence that is generating, then chunks of the prompts still being
evaluated, within a token budget, so a long prompt arriving mid-stream only slows the
running streams instead of freezing them (chunked prefill). A sequence lives in a slot;
a slot keeps the KV of the tokens its last sequence fed, and a new request goes to the
idle slot whose tokens share the longest prefix with its prompt.

The loop serves every `server.parallel`, 1 included (as `llama-server -np 1` runs its one
slot through the same loop). It knows nothing about llama.cpp: it talks to a `Backend`
(llamad.engine.llama_slots for the real one, a scripted one in the fast tests). Its
`generate` turns a sequence's output queue back into the `_decode` iterator the Engine base
consumes, so stop strings, token limits, events and keep-alives are the Engine's own. Which
cached prefix a prompt reuses, and what is saved for later, is llamad.engine.prompt_cache's
policy.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import structlog

from llamad.engine import Generation, TokenLogprob
from llamad.engine.speculative import (
    DraftModel, DraftOdds, Drafter, ModelDrafter, NgramDrafter, Speculation, StepCosts, worthwhile_length,
)
from llamad.engine.prompt_cache import (
    PromptStateCache,
    common_prefix,
    usable_prefix,
    worth_its_slot,
    worth_restoring,
    worth_saving,
)

log = structlog.get_logger("llamad.slots")

# Prompt tokens per step for a prompt read alone while another request waits for a slot:
# a hang-up is noticed between steps, and 128-token steps read at the same rate as 512-token
# ones on a CPU (~470 tok/s on the demo model) while freeing the slot four times sooner.
WAITER_STEP = 128
# A prompt chunk evaluated beside running streams makes their step longer; the chunk is
# sized so that such a step costs at most this many plain decode steps.
GAP_FACTOR = 2.0
MIN_PREFILL_CHUNK = 8
# A prompt with at least this many tokens still to read moves the idle slots' cached tokens
# out of the KV (into the saved-state cache, restored when their conversation returns). In
# the one unified KV buffer, attention spans every cell up to the highest one in use, held
# or not: reading a 3,250-token prompt took 13% longer with one other slot holding as much,
# 20% with two (measured on the demo model, 2 threads); a split buffer costs batching more.
EVICT_FOR_PROMPT = 512


class Backend(Protocol):
    """What the step loop needs from a model. Slots are numbered 0..n_slots-1 and are the
    backend's sequence ids."""

    n_slots: int
    n_ctx: int  # tokens one sequence may hold
    n_batch: int  # tokens one decode may carry
    prompt_step: int  # prompt tokens per step when no stream is waiting on it
    # The batch width its matrix kernels take in whole groups: entries past the last whole
    # group cost more each (llamad.engine.speculative.worthwhile_length); drafts are cut
    # to end a step on a group's edge. 1: no such edge.
    batch_rows: int

    def new_sampler(self, generation: Generation) -> Any: ...

    def free_sampler(self, sampler: Any) -> None: ...

    def reusable(self, slot: int, keep: int) -> int:
        """How many of the `keep` tokens the slot's KV still holds for reuse (a sliding-window
        cache may have dropped the start of a long sequence): `keep`, or 0."""
        ...

    def forget(self, slot: int, keep: int) -> bool:
        """Drops the slot's tokens from position `keep` on; False if only all can go."""
        ...

    def decode(self, tokens: list[int], positions: list[int], slots: list[int], outputs: list[bool]) -> int:
        """0: done; 1: no KV room (nothing changed); anything else: failed."""
        ...

    def sample(self, sampler: Any, index: int) -> int:
        """A token from the logits of batch entry `index` (one marked as an output)."""
        ...

    def is_eog(self, token: int) -> bool: ...

    def draft_fits(self, sampler: Any, draft: list[int]) -> int:
        """How many of the draft's leading tokens the sequence's grammar allows after what
        it has accepted (len(draft) without a grammar); the grammar itself is not advanced."""
        ...

    def accept(self, sampler: Any, token: int) -> str:
        """Advances the sequence's grammar and UTF-8 decoder; the token's text."""
        ...

    def score(self, index: int, token: int, text: str, top_n: int) -> TokenLogprob:
        """`token`'s log probability and the `top_n` most likely tokens, from the logits of
        batch entry `index` of the last decode (llamad.engine.logprobs.score)."""
        ...

    def save_state(self, slot: int) -> bytes | None: ...

    def load_state(self, slot: int, data: bytes) -> bool: ...


class KvFull(RuntimeError):
    pass


@dataclass
class Sequence:
    """One request inside the step loop. `out` carries what `_decode` yields: the cached
    token count (an int) once the prompt is evaluated, text pieces, then None (or an
    exception)."""

    generation: Generation
    cancel: threading.Event = field(default_factory=threading.Event)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    stopped: threading.Event = field(default_factory=threading.Event)
    slot: "Slot | None" = None
    sampler: Any = None
    n_past: int = 0  # tokens of this sequence in the slot's KV
    cached: int = 0  # prompt tokens reused from the slot (or the state cache)
    generated: int = 0
    next_token: int | None = None  # sampled, not yet fed
    ended: bool = False
    order: int = 0  # admission order: prompts are evaluated first come, first served
    drafter: Drafter | None = None  # its drafts, while speculation is on for it
    odds: DraftOdds = field(default_factory=DraftOdds)  # that its next drafted token is kept
    draft: list[int] = field(default_factory=list)  # fed after next_token in the planned step

    @property
    def tokens(self) -> list[int]:
        return self.generation.prompt.tokens

    @property
    def prefilling(self) -> bool:
        return self.next_token is None

    @property
    def gone(self) -> bool:
        return self.stopped.is_set() or self.cancel.is_set()

    def end(self, item: Any = None) -> None:
        if not self.ended:
            self.ended = True
            self.out.put(item)


@dataclass
class Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this slot holds
    prompt_len: int = 0  # of these, the last request's prompt (the rest is its answer)
    sequence: Sequence | None = None
    last_used: float = float("-inf")


@dataclass
class Plan:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    outputs: list[bool] = field(default_factory=list)
    # (sequence, tokens fed, batch index of its output or -1)
    parts: list[tuple[Sequence, list[int], int]] = field(default_factory=list)
    generating: int = 0
    prefill: int = 0
    drafted: int = 0  # draft tokens in the batch

    def add(self, seq: Sequence, tokens: list[int], wants_output: bool, every_output: bool = False) -> None:
        """`every_output`: logits on every entry (a next token and its draft); the part's
        index is then its first entry's."""
        assert seq.slot is not None
        start = seq.n_past
        first = len(self.tokens)
        for offset, token in enumerate(tokens):
            self.tokens.append(token)
            self.positions.append(start + offset)
            self.slots.append(seq.slot.id)
            self.outputs.append(every_output)
        index = -1
        if every_output:
            index = first
        elif wants_output:
            index = len(self.tokens) - 1
            self.outputs[index] = True
        self.parts.append((seq, tokens, index))


@dataclass
class SlotStats:
    steps: int = 0
    kv_full: int = 0  # decodes llama.cpp refused for want of KV cells
    evictions: int = 0  # idle slots cleared for a long prompt (EVICT_FOR_PROMPT)
    drafted: int = 0  # draft tokens fed (speculation)
    accepted: int = 0  # of these, the ones the sequence's sampler confirmed
    rolled_back: int = 0  # KV cells of rejected drafts removed


class StepLoop:
    def __init__(
        self,
        backend: Backend,
        prompt_cache: PromptStateCache | None = None,
        engine_stats: Any = None,
        someone_waits: Callable[[], bool] = lambda: False,
        speculation: Speculation | None = None,
        draft_model: DraftModel | None = None,
    ):
        self.backend = backend
        # N-gram drafts (llamad.engine.speculative); None or disabled: none, unless a
        # generation asks for them (Generation.speculative).
        self.speculation = speculation
        # A second model's context that drafts where the lookup has nothing (one sequence
        # per slot); only this loop's thread touches it.
        self.draft_model = draft_model
        # True while a request waits for a slot: a prompt read alone then goes in short
        # steps, so a hang-up hands the slot on within one of them.
        self.someone_waits = someone_waits
        # The engine's counters (llamad.engine.EngineStats): prompt tokens evaluated are
        # counted here, per decoded chunk, so a prompt cut short counts what was evaluated.
        self.engine_stats = engine_stats
        self.slots = [Slot(i) for i in range(backend.n_slots)]
        self.prompt_cache = prompt_cache
        self.stats = SlotStats()
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: collections.deque[Sequence] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        # Learned costs (seconds): one decode-only step, and one prompt token.
        self._step_s: float | None = None
        self._token_s: float | None = None
        # What a decode-only step takes by its width: what a draft adds to a step.
        self.step_costs = StepCosts()
        # The odds that a drafted token is kept, over every sequence's recent drafts: where a
        # new sequence's own odds start (a deep log that drafts badly, request after request,
        # does not pay for the same optimism each time).
        self.odds = DraftOdds(keep=0.95)
        self.clock = time.perf_counter
        # After a KV-full decode, no new prompt starts until a sequence ends.
        self._hold_admission = False
        self._admissions = 0

    # -- from other threads -----------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            self._inbox.append(seq)
        self._wake.set()

    def stop(self, seq: Sequence) -> None:
        seq.stopped.set()
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llamad-steps", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all(RuntimeError("the engine was closed"))

    @property
    def busy(self) -> int:
        return sum(1 for slot in self.slots if slot.sequence is not None)

    def generate(self, generation: Generation, cancel: threading.Event) -> Iterator[Any]:
        """Runs one generation in the loop; yields what the Engine's `_decode` yields (the
        cached token count once the prompt is evaluated, then one text piece or
        TokenLogprob per token). Closing the iterator, or setting `cancel`, takes the
        sequence out of the loop at its next step."""
        seq = Sequence(generation=generation, cancel=cancel)
        self.submit(seq)
        try:
            while True:
                try:
                    item = seq.out.get(timeout=0.05)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop(seq)

    def forecast_reuse(self, tokens: list[int]) -> int:
        """How many of a prompt's tokens the slot the loop would choose now holds: a forecast
        for headers sent before the request is admitted (Anthropic's message_start). Only
        compares prefixes, from any thread, so it may race a step; the saved-state cache is
        not consulted (the loop owns it)."""
        if not tokens:
            return 0
        idle = [slot for slot in self.slots if slot.sequence is None] or self.slots
        slot = self._choose(idle, tokens)
        return usable_prefix(common_prefix(list(slot.cached), tokens), len(tokens))

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closing:
            self._wake.clear()  # before the step: a submit during it wakes the next wait
            try:
                worked = self.step()
            except Exception as exc:  # never let the thread die with sequences waiting on it
                log.exception("step_failed")
                for slot in self.slots:
                    self._clear(slot)  # what the KV holds is no longer known
                self._end_all(RuntimeError(f"decoding failed: {exc}"))
                worked = False
            if not worked:
                self._wake.wait(timeout=0.1)

    def step(self) -> bool:
        """One batch decoded; False when there was nothing to decode."""
        self._take_inbox()
        self._retire_gone()
        self._admit()
        plan = self._plan()
        if not plan.tokens:
            return False
        started = self.clock()
        code = self.backend.decode(plan.tokens, plan.positions, plan.slots, plan.outputs)
        elapsed = self.clock() - started
        if code == 1:
            self._no_room(plan)
            return True
        if code != 0:
            for seq, _, _ in plan.parts:
                self._clear(seq.slot)
                self._retire(seq, RuntimeError(f"llama_decode failed with code {code}"))
            return True
        self.stats.steps += 1
        if self.engine_stats is not None:
            self.engine_stats.prompt_tokens_evaluated += plan.prefill
        self._commit(plan)
        # What a width costs includes checking its entries: a sampled row runs the sampler
        # chain over the whole vocabulary (~1 ms for Gemma's 262k), in this thread.
        self._learn(plan, elapsed, self.clock() - started)
        return True

    def _take_inbox(self) -> None:
        with self._lock:
            while self._inbox:
                self._pending.append(self._inbox.popleft())

    def _retire_gone(self) -> None:
        for slot in self.slots:
            seq = slot.sequence
            if seq is not None and seq.gone:
                self._retire(seq)

    def _retire(self, seq: Sequence, item: Any = None) -> None:
        slot = seq.slot
        if slot is not None:
            slot.sequence = None
            slot.last_used = time.monotonic()
            seq.slot = None
            self._hold_admission = False
        if seq.sampler is not None:
            self.backend.free_sampler(seq.sampler)
            seq.sampler = None
        if seq.drafter is not None:
            seq.drafter.release()  # no unchecked draft stays in a draft model's context
        seq.end(item)

    def _end_all(self, error: BaseException) -> None:
        for slot in self.slots:
            if slot.sequence is not None:
                self._retire(slot.sequence, error)
        with self._lock:
            waiting = list(self._pending) + list(self._inbox)
            self._pending.clear()
            self._inbox.clear()
        for seq in waiting:
            seq.end(error)

    # -- admission ---------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._pending and not self._hold_admission:
            seq = self._pending[0]
            if seq.gone:
                self._pending.popleft()
                seq.end()
                continue
            idle = [slot for slot in self.slots if slot.sequence is None]
            if not idle:
                return
            self._pending.popleft()
            self._place(seq, self._choose(idle, seq.tokens))

    def _choose(self, idle: list[Slot], tokens: list[int]) -> Slot:
        best = max(idle, key=lambda slot: (common_prefix(slot.cached, tokens), -slot.id))
        if worth_its_slot(common_prefix(best.cached, tokens), len(tokens)):
            return best
        # Empty slots first (lowest id), then the least recently used.
        return min(idle, key=lambda slot: (slot.last_used, slot.id))

    def _place(self, seq: Sequence, slot: Slot) -> None:
        tokens = seq.tokens
        keep = usable_prefix(common_prefix(slot.cached, tokens), len(tokens))
        cache = self.prompt_cache
        if cache is not None:
            if worth_saving(len(slot.cached), keep):
                # Most of this slot is about to be overwritten: keep it for a later turn.
                self._save(slot, keep)
            saved, saved_prefix = cache.best(tokens)
            restorable = usable_prefix(saved_prefix, len(tokens))
            if saved is not None and worth_restoring(restorable, keep):
                self._clear(slot)
                if self.backend.load_state(slot.id, saved.data):
                    slot.cached = list(saved.tokens)
                    cache.restores += 1
                    keep = restorable
                else:  # the slot was cleared for the state: nothing of it is left to reuse
                    keep = 0
        keep = self.backend.reusable(slot.id, keep)
        if keep < len(slot.cached) and not self.backend.forget(slot.id, keep):
            self._clear(slot)
            keep = 0
        del slot.cached[keep:]
        if cache is not None and len(tokens) - keep >= EVICT_FOR_PROMPT:
            self._evict_idle(but=slot)
        slot.sequence = seq
        slot.prompt_len = len(tokens)
        seq.slot = slot
        self._admissions += 1
        seq.order = self._admissions
        seq.n_past = seq.cached = keep
        seq.sampler = self.backend.new_sampler(seq.generation)
        spec = self.speculation
        if spec is not None and (seq.generation.speculative if seq.generation.speculative is not None else spec.enabled):
            seq.odds = DraftOdds(self.odds.p)
            lookup = NgramDrafter(spec.ngram, seq.tokens, spec.draft_max, spec.draft_min)
            seq.drafter = lookup
            if self.draft_model is not None:
                seq.drafter = ModelDrafter(
                    lookup, self.draft_model, slot.id, spec.draft_max, spec.draft_min, spec.draft_p_min
                )

    def _evict_idle(self, but: Slot) -> None:
        """Idle slots (other than `but`) give up their KV cells; what they held that is worth
        keeping goes to the saved-state cache first."""
        for slot in self.slots:
            if slot is not but and slot.sequence is None and slot.cached:
                self._save(slot)
                self._clear(slot)
                self.stats.evictions += 1

    def _save(self, slot: Slot, keep: int = 0) -> None:
        """Saves the slot's state for a later turn; its tokens from `keep` on are about to go.

        The last answer is cut off first (unless `keep` still needs it): a next turn resends
        the prompt, but the answer as the client renders it, which may not match token for
        token. And llama.cpp saves no cell outside a sliding window's reach from the last
        position (Gemma 3), so a state saved with its answer lacks what a next turn that
        diverges inside the answer needs (llamad.engine.prompt_cache.reusable_prefix)."""
        cache = self.prompt_cache
        assert cache is not None
        end = max(slot.prompt_len, keep)
        if 0 < end < len(slot.cached) and self.backend.forget(slot.id, end):
            del slot.cached[end:]
        if not cache.wants(slot.cached):
            return
        data = self.backend.save_state(slot.id)
        if data:
            cache.put(slot.cached, data)

    def _clear(self, slot: Slot | None) -> None:
        if slot is not None:
            self.backend.forget(slot.id, 0)
            slot.cached.clear()

    # -- one batch ---------------------------------------------------------------------------
    def _plan(self) -> Plan:
        plan = Plan()
        active = [slot.sequence for slot in self.slots if slot.sequence is not None]
        # No drafts in a step that reads a prompt: its chunk is sized against a plain step
        # (GAP_FACTOR), and the prompt's reader waits for nothing else.
        drafting = self.speculation is not None and not any(s.prefilling for s in active)
        generating = sum(1 for s in active if not s.prefilling)
        room = self.backend.n_batch - generating
        for seq in active:
            if not seq.prefilling:
                draft = self._draft(seq, room, generating, generating + plan.drafted) if drafting and seq.drafter is not None else []
                seq.draft = draft
                room -= len(draft)
                plan.add(seq, [seq.next_token, *draft], wants_output=True, every_output=bool(draft))
                plan.generating += 1
                plan.drafted += len(draft)
        budget = self._prefill_budget(plan.generating)
        for seq in sorted((s for s in active if s.prefilling), key=lambda s: s.order):
            if budget <= 0:
                break
            rest = seq.tokens[seq.n_past :]
            chunk = rest[:budget]
            plan.add(seq, chunk, wants_output=len(chunk) == len(rest))
            plan.prefill += len(chunk)
            budget -= len(chunk)
        return plan

    def _draft(self, seq: Sequence, room: int, generating: int, width: int) -> list[int]:
        """The draft fed after the sequence's next token: no longer than the batch's room,
        the tokens max_tokens still allows after the next one, the context, the prefix of it
        the sequence's grammar allows, and what pays for itself in a step of `generating`
        streams that is `width` entries wide so far."""
        drafter = seq.drafter
        assert drafter is not None and seq.next_token is not None
        drafter_limit = min(
            room,
            seq.generation.max_tokens - seq.generated - 1,
            self.backend.n_ctx - 1 - seq.n_past - 1,  # positions n_past+1 .. n_past+k
        )
        proposed = draft = drafter.draft(drafter_limit)
        if draft:
            fits = self.backend.draft_fits(seq.sampler, draft)
            draft = draft[:fits] if fits >= drafter.draft_min else []
        if draft:
            worth = self._worthwhile(seq, generating, width, len(draft), drafter.draft_min)
            draft = draft[:worth] if worth >= drafter.draft_min else []
        if proposed and not draft:
            # Nothing is fed, so no verification will trim what the drafter holds of it (a
            # draft model's cells); a draft cut short is trimmed when it is verified.
            drafter.release()
        return draft

    def _prefill_budget(self, generating: int) -> int:
        b = self.backend
        room = b.n_batch - generating
        if generating == 0:
            # Alone, a prompt is read in the backend's full steps (the fastest cold read);
            # with a request waiting, in WAITER_STEP ones (~0.3 s here, not ~1 s).
            return min(room, b.prompt_step, WAITER_STEP if self.someone_waits() else b.prompt_step)
        if self._step_s is None or not self._token_s:
            chunk = MIN_PREFILL_CHUNK * 4
        else:
            chunk = int((GAP_FACTOR - 1) * self._step_s / self._token_s)
        return max(0, min(room, b.prompt_step, max(MIN_PREFILL_CHUNK, chunk)))

    def _worthwhile(self, seq: Sequence, generating: int, width: int, longest: int, shortest: int) -> int:
        """Of a draft of `longest` tokens, how many are worth feeding: a kept token saves
        its stream's share of a plain step, and the draft costs what the loop measured a
        step that much wider to take (llamad.engine.speculative.worthwhile_length).
        A sequence's first draft is fed at least `shortest` long, whatever the measure says:
        otherwise a cost measured where drafts were dear (deep in a long context) would stop
        every later request from drafting, and from measuring again."""
        plain = self.step_costs.at(generating)  # None until a step is measured: then the whole draft
        worth = worthwhile_length(
            seq.odds.p, (plain or 0.0) / generating, self.step_costs, width, longest, shortest,
            rows=self.backend.batch_rows,
        )
        if seq.odds.drafts == 0:
            worth = max(worth, shortest)
        return worth

    def _learn(self, plan: Plan, elapsed: float, with_sampling: float) -> None:
        """`elapsed`: the decode; `with_sampling`: the decode and the sampling after it."""
        if plan.prefill == 0 and plan.generating:
            self.step_costs.measured(len(plan.tokens), with_sampling)
        if plan.drafted:
            return  # a wider step than the plain one the prefill chunk is sized against
        if plan.prefill == 0:
            self._step_s = elapsed if self._step_s is None else 0.8 * self._step_s + 0.2 * elapsed
        elif plan.generating == 0 or self._step_s is not None:
            base = self._step_s if plan.generating and self._step_s else 0.0
            per_token = max(elapsed - base, 0.0) / plan.prefill
            if per_token > 0:
                self._token_s = per_token if self._token_s is None else 0.8 * self._token_s + 0.2 * per_token

    def _commit(self, plan: Plan) -> None:
        b = self.backend
        for seq, fed, index in plan.parts:
            slot = seq.slot
            assert slot is not None
            start = seq.n_past
            slot.cached.extend(fed)
            seq.n_past += len(fed)
            if index < 0:
                continue
            draft, seq.draft = seq.draft, []
            if seq.gone:
                self._retire(seq)
                if draft:
                    self._roll_back(slot, start + 1)  # the draft was not checked
                continue
            if seq.prefilling:
                seq.out.put(seq.cached)  # the prompt is evaluated
            # Entry i's logits give the token after it; draft token i is accepted while it is
            # what the sequence's own sampler draws there (llamad.engine.speculative).
            accepted = 0
            for i in range(len(draft) + 1):
                token = b.sample(seq.sampler, index + i)
                matched = i < len(draft) and token == draft[i]
                accepted += matched
                if not self._emit(seq, token, index + i) or not matched:
                    break
            if draft:
                self.stats.drafted += len(draft)
                self.stats.accepted += accepted
                if self.engine_stats is not None:
                    self.engine_stats.draft_tokens += len(draft)
                    self.engine_stats.draft_accepted += accepted
                seq.odds.verified(len(draft), accepted)
                self.odds.verified(len(draft), accepted)
                if seq.drafter is not None:
                    seq.drafter.verified(len(draft), accepted)
                # The next token and the accepted draft stay; a rejected tail leaves the KV.
                self._roll_back(slot, start + 1 + accepted)
                if seq.slot is slot:
                    seq.n_past = len(slot.cached)

    def _emit(self, seq: Sequence, token: int, index: int) -> bool:
        """A sampled token goes to the sequence's stream; False once the sequence is over."""
        b = self.backend
        seq.next_token = token
        if b.is_eog(token) and not seq.generation.ignore_eos:
            self._retire(seq)
            return False
        seq.generated += 1
        text = b.accept(seq.sampler, token)
        top_n = seq.generation.logprobs
        # Scored now, while the batch's logits are still the ones the token came from.
        seq.out.put(text if top_n is None else b.score(index, token, text, top_n))
        if seq.generated >= seq.generation.max_tokens or len(seq.tokens) + seq.generated >= b.n_ctx:
            self._retire(seq)
            return False
        if seq.drafter is not None:
            seq.drafter.append(token)
        return True

    def _roll_back(self, slot: Slot, keep: int) -> None:
        """Removes the slot's KV from position `keep` on (a rejected draft's cells)."""
        if keep >= len(slot.cached):
            return
        if not self.backend.forget(slot.id, keep):
            # Only a whole sequence can go (a recurrent model): speculation needs partial
            # removal; the engine does not turn it on for such a model.
            raise RuntimeError("the KV cache cannot remove a rejected draft")
        self.stats.rolled_back += len(slot.cached) - keep
        del slot.cached[keep:]

    def _no_room(self, plan: Plan) -> None:
        """llama_decode found no KV cells for the batch (nothing was written)."""
        self.stats.kv_full += 1
        if plan.drafted:
            # Drafts first: the next step goes without them, and holds what the streams need.
            for seq, _, _ in plan.parts:
                seq.draft = []
                if seq.drafter is not None:
                    seq.drafter.verified(1, 0)
            return
        idle = [slot for slot in self.slots if slot.sequence is None and slot.cached]
        if idle:
            for slot in idle:
                if self.prompt_cache is not None:
                    self._save(slot)
                self._clear(slot)
            log.info("kv_full_freed_idle_slots", slots=len(idle))
            return
        prefilling = [seq for seq, _, _ in plan.parts if seq.prefilling]
        if prefilling:
            # The running streams go first; these prompts wait until one of them ends.
            for seq in reversed(prefilling):
                slot = seq.slot
                self._clear(slot)
                if slot is not None:
                    slot.sequence = None
                seq.slot = None
                if seq.sampler is not None:
                    self.backend.free_sampler(seq.sampler)
                    seq.sampler = None
                seq.n_past = seq.cached = 0
                self._pending.appendleft(seq)
            self._hold_admission = True
            log.warning("kv_full_admission_waits", waiting=len(prefilling))
            return
        # Only running streams and still no room: end the newest so the others go on.
        newest = max((seq for seq, _, _ in plan.parts), key=lambda s: s.order)
        log.warning("kv_full_stream_ended", slot=newest.slot.id if newest.slot else None)
        self._clear(newest.slot)
        self._retire(newest, KvFull("the KV cache is full; retry the request, or lower server.parallel"))
