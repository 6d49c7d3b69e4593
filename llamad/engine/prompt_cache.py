"""The prompt-reuse policy, in one place: which cached prefix a new prompt builds on, and
the saved KV states of earlier prompts, for reuse when a later prompt shares their prefix.

A slot of the step loop (llamad.engine.slots) already serves the common case: the next turn
of the chat that just ran there. The saved-state cache covers interleaved clients: before a
new prompt overwrites most of a slot, the slot's KV state is saved here, and a later prompt
that shares a longer prefix with a saved state than with its slot restores it instead of
evaluating it again.

Only the sequence's KV data and its tokens are kept (llama-cpp-python's save_state also
copies a logits buffer that is n_batch x n_vocab floats, half a gigabyte for Gemma 3).
Memory is bounded by `model.prompt_cache_bytes`; the least recently used state goes first.

Every state saved here also goes to disk (llamad.engine.disk_cache, `[cache]`), written by a
background thread, so a restart, a reload or an eviction from memory does not cost a cold
prompt: a prompt that finds a longer prefix on disk than in memory reuses the disk's. The
engine announces each prompt first (`prefetch`, from the request's worker thread), which
reads such a state there; the step loop then only takes it (`best`), never waiting on disk.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from llamad.engine.chat import Chat, ChatMessage

if TYPE_CHECKING:
    from llamad.engine.disk_cache import DiskStateCache


@dataclass
class SavedState:
    tokens: tuple[int, ...]
    data: bytes


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def usable_prefix(shared: int, prompt_len: int) -> int:
    """Of `shared` cached tokens, how many a prompt of `prompt_len` tokens builds on: at least
    its last token is evaluated again, since sampling needs that token's logits."""
    return max(0, min(shared, prompt_len - 1))


# A new prompt goes to the slot with the longest shared prefix only when that prefix is at
# least this share of the prompt; otherwise to the least recently used slot, so a shared
# chat-template header does not evict another conversation's cache.
SLOT_SIMILARITY = 0.1


def worth_its_slot(shared: int, prompt_len: int) -> bool:
    """Whether a slot holding `shared` tokens of the prompt should take it (rather than the
    least recently used one)."""
    return shared > 0 and shared >= SLOT_SIMILARITY * prompt_len


# Before a new prompt overwrites a slot, what the slot holds is saved for a later turn when
# more than this many of its tokens (and more than the prompt keeps) are about to go.
SAVE_WHEN_LOSING = 32
# A saved state replaces what the slot keeps only when it reuses more than this many tokens
# more: restoring copies the whole state in.
RESTORE_GAIN = 16


def worth_saving(cached: int, keep: int) -> bool:
    """Whether a slot holding `cached` tokens, of which a new prompt keeps `keep`, is saved first."""
    return cached - keep > max(keep, SAVE_WHEN_LOSING)


def worth_restoring(saved_prefix: int, keep: int) -> bool:
    """Whether a saved state sharing `saved_prefix` usable tokens beats a slot keeping `keep`."""
    return saved_prefix > keep + RESTORE_GAIN


# How many of the oldest positions of its window the first tokens after a reused prefix may
# go without. A saved state leaves out the cells outside its sequence's window (llama.cpp's
# state_write), so a conversation restored for its next turn lacks the few positions between
# where the reuse ends and where the saved sequence ended (its last answer, usually <= 16
# tokens); only the first new tokens miss them, at the far end of a 512-token window.
# Reading such a turn again would cost seconds on a CPU and minutes on a board.
WINDOW_SLACK = 32


def reusable_prefix(ctx, seq: int, keep: int, n_swa: int) -> int:
    """How many of `keep` cached tokens of sequence `seq` a new prompt can build on.

    A sliding-window layer (Gemma 3's, window n_swa) keeps a sequence's cells only while
    they are inside the window: llama.cpp writes new tokens over cells that fell out of it,
    so a long sequence can lose its start there while the full-attention layers still hold
    it. The first new token, at `keep`, looks back n_swa positions. A prefix shorter than
    the window needs all of it; a longer one may lack WINDOW_SLACK of the oldest; otherwise
    nothing is reused (seen: a 6-token prompt reusing only the BOS of a 1,200-token sequence
    answered " the state" where the model's answer is " the capital")."""
    if keep <= 0 or n_swa <= 0:
        return keep
    import llama_cpp

    first_held = llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(ctx), seq)
    if first_held == 0:
        return keep
    window_start = keep - n_swa + 1
    return keep if 0 < first_held <= window_start + WINDOW_SLACK and window_start > 0 else 0


class PromptStateCache:
    # States shorter than this are cheaper to recompute than to keep.
    MIN_TOKENS = 64
    # Prompts announced by `prefetch` and not yet placed by the step loop (a request that
    # ends before it is placed leaves its entry here until it ages out).
    MAX_PLANNED = 16
    PLANNED_TTL_S = 300.0

    def __init__(self, capacity_bytes: int, disk: "DiskStateCache | None" = None):
        self.capacity_bytes = capacity_bytes
        self.disk = disk
        self._states: OrderedDict[tuple[int, ...], SavedState] = OrderedDict()
        self.size_bytes = 0
        self.saves = 0
        self.restores = 0
        # prompt tokens -> (when, the disk state read for it, or None: the disk has nothing
        # better than memory or the slot holds)
        self._planned: OrderedDict[tuple[int, ...], tuple[float, SavedState | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def _best_in_memory(self, tokens: list[int]) -> tuple[SavedState | None, int]:
        best_state, best_len = None, 0
        for state in list(self._states.values()):
            length = common_prefix(state.tokens, tokens)
            if length > best_len:
                best_state, best_len = state, length
        return best_state, best_len

    def best(self, tokens: list[int]) -> tuple[SavedState | None, int]:
        """The saved state sharing the longest prefix with `tokens`, and that length: in
        memory, or on disk when the disk holds a longer one (read by `prefetch` beforehand
        for a prompt the engine announced; read here, on the caller's thread, otherwise)."""
        best_state, best_len = self._best_in_memory(tokens)
        from_disk: SavedState | None = None
        if self.disk is not None:
            key = tuple(tokens)
            with self._lock:
                planned = self._planned.pop(key, None)
            if planned is not None:
                from_disk = planned[1]
            else:  # not announced: look on disk now
                from_disk = self._read_disk(key, best_len)
            if from_disk is not None:
                length = common_prefix(from_disk.tokens, tokens)
                if length > best_len:
                    return from_disk, length
        if best_state is not None:
            self._states.move_to_end(best_state.tokens)
        return best_state, best_len

    def prefetch(self, tokens: list[int], held: int = 0) -> None:
        """Called for a prompt before it goes to the step loop, from another thread: when the
        disk holds a longer prefix of it than memory does and than the slot it will go to
        holds (`held` tokens), the state is read and verified now, so that `best` finds it
        without the step loop waiting on disk."""
        if self.disk is None or not tokens:
            return
        key = tuple(tokens)
        self.disk.refresh()
        _, in_memory = self._best_in_memory(tokens)
        state = self._read_disk(key, max(in_memory, held + RESTORE_GAIN))
        now = time.monotonic()
        with self._lock:
            self._planned[key] = (now, state)
            self._planned.move_to_end(key)
            while self._planned and (
                len(self._planned) > self.MAX_PLANNED or now - next(iter(self._planned.values()))[0] > self.PLANNED_TTL_S
            ):
                self._planned.popitem(last=False)

    def _read_disk(self, key: tuple[int, ...], beat: int) -> SavedState | None:
        """The disk's state for the longest prefix of `key`, if it is longer than `beat`."""
        assert self.disk is not None
        while True:
            entry, length = self.disk.best(key)
            if entry is None or length <= beat:
                return None
            data = self.disk.load(entry)
            if data is not None:
                return SavedState(tokens=entry.tokens, data=data)
            # That file failed its checks and is gone from the index: try the next best.

    def covers(self, tokens: list[int]) -> bool:
        """True when a saved state already holds all of `tokens` as its prefix."""
        return any(common_prefix(state.tokens, tokens) >= len(tokens) for state in list(self._states.values()))

    def wants(self, tokens: list[int]) -> bool:
        """Whether a state holding `tokens` is worth saving: long enough, and not already here."""
        return len(tokens) >= self.MIN_TOKENS and not self.covers(tokens)

    def put(self, tokens: list[int], data: bytes) -> None:
        """Keeps `data`, the saved KV state of one sequence holding `tokens`, in memory and
        (written in the background) on disk."""
        if self.disk is not None:
            self.disk.write(tokens, data)
        if len(data) > self.capacity_bytes:
            return
        key = tuple(tokens)
        # A saved state that is a prefix of this one is superseded by it.
        for old in [k for k in self._states if common_prefix(k, key) == len(k)]:
            self.size_bytes -= len(self._states.pop(old).data)
        state = SavedState(tokens=key, data=data)
        self._states[key] = state
        self.size_bytes += len(state.data)
        self.saves += 1
        while self.size_bytes > self.capacity_bytes and self._states:
            _, evicted = self._states.popitem(last=False)
            self.size_bytes -= len(evicted.data)

    def close(self, timeout: float = 30.0) -> None:
        """Writes what is still queued for the disk (for at most `timeout` seconds)."""
        if self.disk is not None:
            self.disk.close(timeout)


def shared_head(prepare: Callable[[Chat], Any]) -> int:
    """What a prompt finds in the cache even when nothing of its conversation is reused:
    the template's opening (BOS, the first role's header, a default system prompt), for a
    `prepare` that renders a Chat into a Prompt. Two unlike chats of each shape (user
    first, system first) are rendered; the longer of the two shared prefixes counts, since
    a transcript's "User:" and "System:" openings differ and each is only an opening."""
    pairs = [
        (Chat(messages=[ChatMessage(role="user", content="Hello.")]),
         Chat(messages=[ChatMessage(role="user", content="What is 2 + 2?")])),
        (Chat(messages=[ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]),
         Chat(messages=[ChatMessage(role="system", content="You write poems."), ChatMessage(role="user", content="Go")])),
    ]  # fmt: skip
    try:
        heads = [common_prefix(prepare(a).tokens, prepare(b).tokens) for a, b in pairs]
    except Exception:  # a template that refuses a probe: count every reuse as a hit
        return 0
    return max(heads)
