"""Saved KV states of earlier prompts, for reuse when a later prompt shares their prefix.

The live context already serves the common case (the next turn of the chat that just ran).
This cache covers interleaved clients: before a request overwrites most of the live
context, that context's KV state is saved here, and a later prompt that shares a longer
prefix with a saved state than with the live context restores it instead of re-evaluating.

Only the sequence's KV data and its tokens are kept (llama-cpp-python's save_state also
copies a logits buffer that is n_batch x n_vocab floats, half a gigabyte for Gemma 3).
Memory is bounded by `model.prompt_cache_bytes`; the least recently used state goes first.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from llamad.engine.chat import Chat, ChatMessage


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

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._states: OrderedDict[tuple[int, ...], SavedState] = OrderedDict()
        self.size_bytes = 0
        self.saves = 0
        self.restores = 0

    def __len__(self) -> int:
        return len(self._states)

    def best(self, tokens: list[int]) -> tuple[SavedState | None, int]:
        """The saved state sharing the longest prefix with `tokens`, and that length."""
        best_state, best_len = None, 0
        for state in self._states.values():
            length = common_prefix(state.tokens, tokens)
            if length > best_len:
                best_state, best_len = state, length
        if best_state is not None:
            self._states.move_to_end(best_state.tokens)
        return best_state, best_len

    def covers(self, tokens: list[int]) -> bool:
        """True when a saved state already holds all of `tokens` as its prefix."""
        return any(common_prefix(state.tokens, tokens) >= len(tokens) for state in self._states.values())

    def save(self, llm, tokens: list[int]) -> None:
        import llama_cpp

        if self.capacity_bytes <= 0 or len(tokens) < self.MIN_TOKENS or self.covers(tokens):
            return
        ctx = llm._ctx.ctx  # noqa: SLF001
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if size <= 0 or size > self.capacity_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if written <= 0:
            return
        self.put(tokens, ctypes.string_at(buffer, written))  # at C speed (see slots_llama.save_state)

    def put(self, tokens: list[int], data: bytes) -> None:
        """Keeps `data`, the saved KV state of one sequence holding `tokens`."""
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

    def restore(self, llm, state: SavedState) -> bool:
        import llama_cpp

        ctx = llm._ctx.ctx  # noqa: SLF001
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # noqa: SLF001
        buffer = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if llama_cpp.llama_state_seq_set_data(ctx, buffer, len(state.data), 0) == 0:
            llm.n_tokens = 0
            return False
        n = len(state.tokens)
        llm.input_ids[:n] = state.tokens
        llm.n_tokens = n
        self.restores += 1
        return True


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
