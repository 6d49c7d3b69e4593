"""The draft model ([speculative] draft_model): a second, smaller GGUF with the target's
vocabulary, in a llama.cpp context of its own with one sequence per slot. It implements
llamad.engine.speculative.DraftModel; the per-sequence bookkeeping (what is fed, what is
removed) is ModelDrafter's.

The draft's tokens are checked by the target as token ids, so the two vocabularies must give
every id the same text: `vocabulary_mismatch` compares them at load (the size, the kind of
tokenizer, the control tokens, and the text of every id for a small vocabulary or an even
sample of ids for a large one), as llama.cpp's own speculative decoding checks its pair.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

# Every id's text is compared up to this vocabulary size; past it, the first and last EDGE
# ids (where the control tokens are) and SAMPLED_IDS spread evenly over the vocabulary. A
# different tokenizer of the same size differs in most of any sample.
FULL_CHECK = 65536
SAMPLED_IDS = 8192
EDGE = 1024


class DraftVocabularyMismatch(RuntimeError):
    pass


class LlamaDraftModel:
    """The draft GGUF and its context: `n_slots` sequences of `n_ctx` tokens each."""

    def __init__(
        self, path: Path, n_slots: int, n_ctx: int, n_batch: int, threads: int, n_gpu_layers: int, flash_attn: bool
    ):
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel

        self.ll = llama_cpp
        self.path = path
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
        try:
            self.model = LlamaModel(path_model=str(path), params=model_params, verbose=False)
        except ValueError as exc:
            raise RuntimeError(f"llama.cpp could not load the draft model {path}: {exc}") from None
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_slots * n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.swa_full = True  # cells past a divergence are removed, so the window is kept whole
        params.no_perf = True
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        self.context = LlamaContext(model=self.model, params=params, verbose=False)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.held: list[list[int]] = [[] for _ in range(n_slots)]
        self._last = -1  # the batch entry of the last feed's logits

    def close(self) -> None:
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        self.context.close()
        self.model.close()

    def feed(self, slot: int, tokens: list[int], start: int) -> bool:
        batch = self.batch
        n = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = i == n - 1
        batch.n_tokens = n
        code = self.ll.llama_decode(self.ctx, batch)
        self._last = n - 1 if code == 0 else -1
        if code != 0 and code != 1:
            # Not only "no room": what the call wrote is unknown, so the slot starts over.
            self.forget(slot, 0)
        return code == 0

    def best(self) -> tuple[int, float]:
        if self._last < 0:
            raise IndexError("the draft context's last feed has no logits")
        row = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, self._last), shape=(self.n_vocab,))
        token = int(row.argmax())
        # Softmax probability of the argmax: 1 / sum(exp(logit - max)).
        p = 1.0 / float(np.exp(row - row[token]).sum())
        return token, p

    def forget(self, slot: int, keep: int) -> None:
        self.ll.llama_memory_seq_rm(self.memory, slot, keep if keep > 0 else -1, -1)

    def positions(self, slot: int) -> int:
        """The slot's highest position in the draft context's KV, -1 when empty (for tests
        and diagnostics: it must be len(held[slot]) - 1)."""
        return int(self.ll.llama_memory_seq_pos_max(self.memory, slot))


def vocabulary_mismatch(target: Any, draft: Any) -> str | None:
    """How the two llama.cpp vocabularies differ (the first difference found), or None."""
    import llama_cpp as ll

    n_target, n_draft = ll.llama_vocab_n_tokens(target), ll.llama_vocab_n_tokens(draft)
    if n_target != n_draft:
        return f"{n_target} tokens against {n_draft}"
    if ll.llama_vocab_type(target) != ll.llama_vocab_type(draft):
        return f"tokenizer type {ll.llama_vocab_type(target)} against {ll.llama_vocab_type(draft)}"
    for name in ("bos", "eos", "eot", "sep", "nl", "pad"):
        get = getattr(ll, f"llama_vocab_{name}")
        if get(target) != get(draft):
            return f"the {name} token is {get(target)} against {get(draft)}"
    if ll.llama_vocab_get_add_bos(target) != ll.llama_vocab_get_add_bos(draft):
        return "one adds a BOS token to a prompt and the other does not"
    if n_target <= FULL_CHECK:
        ids: Any = range(n_target)
    else:  # control tokens sit at either end of the vocabularies seen so far
        ends = [*range(EDGE), *range(n_target - EDGE, n_target)]
        ids = sorted({*ends, *np.linspace(0, n_target - 1, SAMPLED_IDS).astype(int).tolist()})
    for i in ids:
        a, b = _text(ll, target, i), _text(ll, draft, i)
        if a != b:
            return f"token {i} is {a!r} against {b!r}"
    return None


def _text(ll: Any, vocab: Any, token: int) -> bytes:
    text = ll.llama_vocab_get_text(vocab, token)
    return text if isinstance(text, bytes) else ctypes.string_at(text)
