"""Embeddings from the chat model's own hidden states: a second llama.cpp context on the
same loaded weights (no second copy of the model), in embedding mode with mean pooling.

Many inputs go through one `llama_decode` per batch, each input its own sequence; the
pooled vector of each sequence is read back and L2-normalised. Used from the engine's
worker thread only, like the generation context.
"""

from __future__ import annotations

import math

import structlog

log = structlog.get_logger("llamad.engine")

MAX_SEQUENCES = 64  # inputs per llama_decode
# Tokens per llama_decode, and so the longest input (see Embedder.__init__).
BATCH_TOKENS = 512


class Embedder:
    def __init__(self, model, n_ctx: int, n_threads: int):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext

        params = llama_cpp.llama_context_default_params()
        # Pooling needs every token of a sequence in one micro-batch, so an input may be at
        # most `n_ctx` long. The micro-batch sets the compute buffer, which holds every
        # token's logits (Gemma 3: 262144 x 4 bytes a token, 512 MiB at 512 tokens).
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = MAX_SEQUENCES
        # One cache shared by the batch's sequences: each may be as long as the context
        # (split per sequence, 64 inputs would get n_ctx/64 tokens each).
        params.kv_unified = True
        params.swa_full = False
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = True
        # A chat model's GGUF declares no pooling; mean over the tokens is the usual choice
        # (an embedding GGUF's own declared pooling would win if one were configured).
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self.context = LlamaContext(model=model, params=params, verbose=False)
        self.batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=MAX_SEQUENCES, verbose=False)
        self.n_ctx = n_ctx
        self.width = model.n_embd()
        log.info("embedding_context_created", n_ctx=n_ctx, width=self.width, pooling="mean")

    def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        for index, tokens in enumerate(sequences):
            if len(tokens) > self.n_ctx:
                raise ValueError(f"input {index} is {len(tokens)} tokens; the embedding context holds {self.n_ctx}")
        vectors: list[list[float]] = []
        pending: list[list[int]] = []
        used = 0
        for tokens in sequences:
            if pending and (used + len(tokens) > self.n_ctx or len(pending) == MAX_SEQUENCES):
                vectors.extend(self._decode(pending))
                pending, used = [], 0
            pending.append(tokens)
            used += len(tokens)
        if pending:
            vectors.extend(self._decode(pending))
        return vectors

    def _decode(self, sequences: list[list[int]]) -> list[list[float]]:
        import llama_cpp

        self.batch.reset()
        for seq_id, tokens in enumerate(sequences):
            self.batch.add_sequence(tokens, seq_id, True)
        self.context.kv_cache_clear()
        self.context.decode(self.batch)
        out = []
        for seq_id in range(len(sequences)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.context.ctx, seq_id)
            vector = pointer[: self.width]
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            out.append([v / norm for v in vector])
        self.context.kv_cache_clear()
        return out
