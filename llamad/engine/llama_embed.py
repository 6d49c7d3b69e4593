"""Embeddings with llama.cpp: a context in embedding mode on a loaded model, and the engine
for a dedicated embedding GGUF.

Without `[embeddings] path`, the chat engine makes an `Embedder` on its own loaded weights
(a second context, no second copy of the model) on the first embedding request, and runs it
behind its queue. With a path, an `EmbeddingEngine` loads that GGUF beside the chat model:
its own worker thread and its own queue, so embeddings do not wait for chat answers.

Many inputs go through one `llama_decode` per batch, each input its own sequence; the
pooled vector of each sequence is read back (and L2-normalised unless configured off).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Iterator

import structlog

from llamad.engine.chat import Chat
from llamad.config import Config, EmbeddingsConfig
from llamad.engine import Engine, Generation, Prompt

log = structlog.get_logger("llamad.engine")

MAX_SEQUENCES = 64  # inputs per llama_decode


def pooling_type(name: str, model) -> tuple[int, str]:
    """The llama.cpp pooling for a configured name; "model": what the GGUF declares, mean
    when it declares none (a chat model's GGUF never does)."""
    import llama_cpp

    types = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
             "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}
    if name != "model":
        return types[name], name
    metadata = model.metadata()
    declared = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
    by_number = {str(v): k for k, v in types.items()}
    if declared in by_number:
        return types[by_number[declared]], by_number[declared]
    return types["mean"], "mean"


class Embedder:
    def __init__(self, model, settings: EmbeddingsConfig, n_threads: int):
        import llama_cpp
        from llama_cpp._internals import LlamaBatch, LlamaContext

        n_ctx = settings.batch_tokens
        params = llama_cpp.llama_context_default_params()
        # Pooling needs every token of a sequence in one micro-batch, so an input may be at
        # most `n_ctx` long. The micro-batch sets the compute buffer, which for a model with
        # an output layer holds every token's logits (Gemma 3: 262144 x 4 bytes a token).
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = MAX_SEQUENCES
        # One cache shared by the batch's sequences: each may be as long as the context
        # (split per sequence, 64 inputs would get n_ctx/64 tokens each).
        params.kv_unified = True
        params.swa_full = False
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type, self.pooling = pooling_type(settings.pooling, model)
        self.context = LlamaContext(model=model, params=params, verbose=False)
        self.batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=MAX_SEQUENCES, verbose=False)
        self.n_ctx = n_ctx
        self.normalize = settings.normalize
        self.width = model.n_embd()
        log.info("embedding_context_created", n_ctx=n_ctx, width=self.width, pooling=self.pooling)

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
        # An encoder-only model (BERT-like) has no decoder: llama_encode runs it.
        if llama_cpp.llama_model_has_encoder(self.context.model.model) and not llama_cpp.llama_model_has_decoder(
            self.context.model.model
        ):
            self.context.encode(self.batch)
        else:
            self.context.decode(self.batch)
        out = []
        for seq_id in range(len(sequences)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.context.ctx, seq_id)
            vector = pointer[: self.width]
            if self.normalize:
                norm = math.sqrt(sum(v * v for v in vector)) or 1.0
                vector = [v / norm for v in vector]
            out.append(vector)
        self.context.kv_cache_clear()
        return out


class EmbeddingEngine(Engine):
    """A dedicated embedding GGUF ([embeddings] path): only `embed` and the tokenizer."""

    def __init__(self, config: Config):
        settings = config.embeddings
        self.settings = settings
        self.model_path = Path(settings.path).expanduser()
        super().__init__(
            model_id=self.model_path.stem,
            n_ctx=settings.batch_tokens,
            max_queue=config.server.max_queue,
            queue_timeout=config.server.queue_timeout,
        )
        self.model = None
        self.embedder: Embedder | None = None
        self.info = {"path": str(self.model_path)}

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        from llamad.engine.stdio import keep_stdio

        keep_stdio()  # other threads keep their log lines while this one loads
        llama_cpp.llama_backend_init()
        try:
            self.model = LlamaModel(path_model=str(self.model_path), params=llama_cpp.llama_model_default_params(), verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeError(f"llama.cpp could not load the embedding model {self.model_path}: {exc}") from None
        threads = self.settings.n_threads or os.cpu_count() or 1
        self.embedder = Embedder(self.model, self.settings, n_threads=threads)
        self.info.update(width=self.embedder.width, pooling=self.embedder.pooling, batch_tokens=self.n_ctx)
        log.info("embedding_model_loaded", path=str(self.model_path), width=self.embedder.width, pooling=self.embedder.pooling)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        assert self.model is not None
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    @property
    def n_vocab(self) -> int:
        assert self.model is not None
        return self.model.n_vocab()

    def _embed(self, batch: list[list[int]]) -> list[list[float]]:
        assert self.embedder is not None
        return self.embedder.embed(batch)

    def _prepare(self, chat: Chat) -> Prompt:
        raise NotImplementedError("the embedding model does not generate")

    def _decode(self, generation: Generation, cancel: threading.Event) -> Iterator[str | int]:
        raise NotImplementedError("the embedding model does not generate")
