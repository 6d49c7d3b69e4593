"""The llama.cpp side of the step loop: one context with N sequences (N = server.parallel,
1 included), its batch, and a C sampler chain per sequence (see llamad.engine.slots for the
loop, llamad.engine.llama for the engine that builds both).

llama-cpp-python's `Llama` gives its context one sequence; the engine keeps the `Llama` for
the vocabulary, tokenizer and chat template (with a small context of its own) and creates
the shared context from the same model through the low-level API.

KV memory: the shared context holds `parallel x model.n_ctx` tokens in one unified
buffer, so every slot can hold a full `model.n_ctx`-token conversation. Gemma 3's
sliding-window layers keep the full window (`swa_full`): a smaller window cache cannot
keep a cached prefix reusable.
"""

from __future__ import annotations

import codecs
import ctypes
import random
from typing import Any

import numpy as np

from llamad.engine import Generation, TokenLogprob
from llamad.engine.logprobs import score
from llamad.engine.prompt_cache import reusable_prefix
from llamad.grammar.constraint import GrammarConstraint

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class SequenceSampler:
    """One sequence's sampling state: its C chain (own seed), grammar and UTF-8 decoder."""

    def __init__(self, ll: Any, vocab: Any, generation: Generation):
        self.ll = ll
        s = generation.sampling
        params = ll.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = ll.llama_sampler_chain_init(params)
        penalised = s.repeat_penalty != 1.0 or bool(s.frequency_penalty) or bool(s.presence_penalty)
        if penalised:
            n_vocab = ll.llama_vocab_n_tokens(vocab)
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_penalties(n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
            )
        # Greedy without penalties is the logits' argmax: the backend takes it straight from
        # the row (the C chain first copies all 262k Gemma logits into candidates, ~0.3 ms a
        # token, ~2% of a one-stream step here). The chain stays for a grammar's resample.
        self.argmax = s.temperature <= 0 and not penalised
        if s.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            seed = s.seed if s.seed is not None else random.randrange(2**31)
            if s.top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(s.top_k))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(s.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(s.min_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(s.temperature))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        self.chain = chain
        self.constraint: GrammarConstraint | None = None
        if generation.grammar:
            after = "</think>" if generation.prompt.opens_reasoning else None
            self.constraint = GrammarConstraint(vocab, generation.grammar, after=after)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def close(self) -> None:
        if self.chain is not None:
            self.ll.llama_sampler_free(self.chain)
            self.chain = None
        if self.constraint is not None:
            self.constraint.close()
            self.constraint = None


class LlamaSlotsBackend:
    """The `llamad.engine.slots.Backend` over one llama.cpp context with `n_slots` sequences."""

    def __init__(
        self, llm: Any, n_slots: int, n_ctx: int, n_batch: int, prompt_step: int, threads: int,
        flash_attn: str = "auto", batch_rows: int = 1,
    ):
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        self.ll = llama_cpp
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.prompt_step = prompt_step
        self.batch_rows = batch_rows
        self.grammar_fallbacks = 0
        self.vocab = llm._model.vocab  # noqa: SLF001
        self.n_swa = int(llama_cpp.llama_model_n_swa(llm._model.model))  # noqa: SLF001
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        # The `Llama`'s own settings (KV types, offload) carry over.
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = n_slots * n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        params.swa_full = True
        params.no_perf = True
        # "on" / "off" as the engine chose (llamad.engine.flash_attn); "auto" leaves it to
        # llama.cpp, as llama-server does: on where the backend has it.
        params.flash_attn_type = {
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }.get(flash_attn, llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
        # Freed before the model (LlamaContext registers itself with the model's exit stack).
        self.context = LlamaContext(model=llm._model, params=params, verbose=False)  # noqa: SLF001
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._outputs: set[int] = set()  # batch entries of the last decode that have logits
        self._piece = ctypes.create_string_buffer(256)

    def close(self) -> None:
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        self.context.close()

    # -- sequences ---------------------------------------------------------------------------
    def new_sampler(self, generation: Generation) -> SequenceSampler:
        return SequenceSampler(self.ll, self.vocab, generation)

    def free_sampler(self, sampler: SequenceSampler) -> None:
        sampler.close()

    def reusable(self, slot: int, keep: int) -> int:
        return reusable_prefix(self.ctx, slot, keep, self.n_swa)

    def forget(self, slot: int, keep: int) -> bool:
        if keep <= 0:
            self.ll.llama_memory_seq_rm(self.memory, slot, -1, -1)  # a whole sequence always goes
            return True
        return bool(self.ll.llama_memory_seq_rm(self.memory, slot, keep, -1))

    def save_state(self, slot: int) -> bytes | None:
        size = self.ll.llama_state_seq_get_size(self.ctx, slot)
        if size <= 0:
            return None
        buffer = (ctypes.c_uint8 * size)()
        written = self.ll.llama_state_seq_get_data(self.ctx, buffer, size, slot)
        # string_at copies the bytes at C speed; bytes(buffer[:n]) would build a list of n
        # Python ints first (190 ms for 8 MiB, with the GIL held, every stream waiting).
        return ctypes.string_at(buffer, written) if written > 0 else None

    def load_state(self, slot: int, data: bytes) -> bool:
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return self.ll.llama_state_seq_set_data(self.ctx, buffer, len(data), slot) > 0

    # -- one step ----------------------------------------------------------------------------
    def decode(self, tokens: list[int], positions: list[int], slots: list[int], outputs: list[bool]) -> int:
        n = len(tokens)
        if n > self.n_batch:
            raise ValueError(f"a batch of {n} tokens exceeds n_batch {self.n_batch}")
        batch = self.batch
        token, pos, n_seq, seq, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        for i in range(n):
            token[i] = tokens[i]
            pos[i] = positions[i]
            n_seq[i] = 1
            seq[i][0] = slots[i]
            logits[i] = outputs[i]
        batch.n_tokens = n
        self._outputs = set()
        code = self.ll.llama_decode(self.ctx, batch)
        if code == 0:
            self._outputs = {i for i in range(n) if outputs[i]}
        return code

    def sample(self, sampler: SequenceSampler, index: int) -> int:
        # llama.cpp aborts the whole process on a logits index without logits.
        if index not in self._outputs:
            raise IndexError(f"batch entry {index} has no logits in the last decode")
        if sampler.argmax:
            # np.argmax, like llama.cpp's greedy sampler, takes the first of equal maxima.
            token = int(self._logits(index).argmax())
        else:
            token = self.ll.llama_sampler_sample(sampler.chain, self.ctx, index)
        constraint = sampler.constraint
        if constraint is not None and constraint.sampler is not None and not constraint.allows(token):
            token = self._resample(sampler, index)
        return token

    def _logits(self, index: int) -> np.ndarray:
        """Batch entry `index`'s logits row, in place (valid until the next decode)."""
        return np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))

    def _resample(self, sampler: SequenceSampler, index: int) -> int:
        """The chain's choice broke the grammar: sample again among the tokens it allows."""
        self.grammar_fallbacks += 1
        constraint = sampler.constraint
        assert constraint is not None
        logits = self._logits(index).copy()
        masked = constraint(None, logits)
        allowed = np.flatnonzero(np.isfinite(masked)).astype(np.int32)
        if allowed.size == 0:
            raise RuntimeError("the grammar allows no token here")
        data = np.zeros(allowed.size, dtype=_TOKEN_DATA)
        data["id"] = allowed
        data["logit"] = masked[allowed]
        candidates = self.ll.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(self.ll.llama_token_data)),
            size=allowed.size,
            selected=-1,
            sorted=False,
        )
        self.ll.llama_sampler_apply(sampler.chain, ctypes.byref(candidates))
        chosen = candidates.selected if 0 <= candidates.selected < allowed.size else int(np.argmax(data["logit"]))
        token = int(data["id"][chosen])
        self.ll.llama_sampler_accept(sampler.chain, token)
        return token

    def is_eog(self, token: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self.vocab, token))

    def draft_fits(self, sampler: SequenceSampler, draft: list[int]) -> int:
        # The sequence's own grammar advances only by the tokens the verification keeps.
        constraint = sampler.constraint
        return len(draft) if constraint is None else constraint.allowed_prefix(draft)

    # Control tokens decoded as their text: the model family's call and reasoning markers
    # (llamad.tools.formats.shown_markers), set by the engine at load.
    shown_tokens: frozenset[int] = frozenset()

    def accept(self, sampler: SequenceSampler, token: int) -> str:
        n = self.ll.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, token in self.shown_tokens)
        text = sampler.decoder.decode(self._piece.raw[: max(n, 0)])
        if sampler.constraint is not None:
            sampler.constraint.accept(token, text)
        return text

    def score(self, index: int, token: int, text: str, top_n: int) -> TokenLogprob:
        if index not in self._outputs:
            raise IndexError(f"batch entry {index} has no logits in the last decode")
        row = self._logits(index)
        vocab = self.vocab
        return score(row, token, text, token_bytes(vocab, token, special=False), top_n, lambda i: token_bytes(vocab, i, special=True))


def token_bytes(vocab, token: int, special: bool) -> bytes:
    """A token's bytes; `special` renders a control token as its text ("<end_of_turn>")."""
    import llama_cpp

    buffer = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 256, 0, special)
    return buffer.raw[: max(n, 0)]
