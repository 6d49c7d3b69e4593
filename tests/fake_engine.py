"""A fake engine for the fast tier: the real Engine base class (scheduler, worker thread,
cancellation, stop sequences, token limits) with scripted model output instead of llama.cpp."""

from __future__ import annotations

import threading
import time
import zlib
from typing import Callable, Iterator

import numpy as np

from llamad.engine.chat import Chat, messages_as_text
from llamad.engine import Engine, FimTokens, Generation, Prompt, TokenLogprob
from llamad.engine.logprobs import score
from llamad.engine.prompt_cache import common_prefix

Script = Callable[[Generation], list[str]]

# The fake model's distribution at every step: the scripted piece is token 0, the most
# likely; tokens 1.. are alternatives " alt1", " alt2", ... in falling order.
FAKE_LOGITS = np.array([4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.0, -1.0] + [-6.0] * 24, dtype=np.float32)


def fake_scored(text: str, top_n: int, logits: np.ndarray = FAKE_LOGITS) -> TokenLogprob:
    return score(logits, 0, text, text.encode(), top_n, lambda i: f" alt{i}".encode())


class FakeEngine(Engine):
    """`script(generation)` returns the token pieces the "model" emits for a request.

    By default it echoes "Hello from the fake model." one word per token. Tokens are words
    of the rendered prompt, so prompt token counts are real counts of something visible.
    """

    def __init__(
        self,
        script: Script | None = None,
        model_id: str = "llama-local",
        n_ctx: int = 4096,
        token_delay: float = 0.0,
        prompt_delay: float = 0.0,
        max_queue: int = 16,
        queue_timeout: float = 60.0,
        prefix_reuse: bool = False,
        fim: bool = False,
        template_supports_tools: bool = False,
        tool_format: str | None = None,
    ):
        super().__init__(model_id=model_id, n_ctx=n_ctx, max_queue=max_queue, queue_timeout=queue_timeout)
        self.native_tools = template_supports_tools
        if tool_format is not None:  # a family's format (llamad.tools.formats), as a real engine detects it
            from llamad.tools.formats import FORMATS

            self._tool_format = FORMATS[tool_format]
        self.script = script or (lambda g: ["Hello", " from", " the", " fake", " model."])
        self.token_delay = token_delay
        self.prompt_delay = prompt_delay  # seconds of "prompt evaluation" before the first token
        self.generations: list[Generation] = []
        self.decoded_tokens = 0
        self.info = {"path": "/fake/model.gguf", "architecture": "fake", "chat_template": "fake"}
        # With prefix_reuse, tokens stand for the prompt's words and the "KV cache" reuses the
        # prefix shared with the last prompt, as the real engine's live context does.
        self.prefix_reuse = prefix_reuse
        self.live_tokens: list[int] = []
        self.fim = fim
        self.embedded: list[list[list[int]]] = []  # each _embed call's batch

    # Raw text: one token per character (id = code point), BOS = 1; ids 1..5 are specials.
    SPECIALS = {1: b"<s>", 3: b"<PRE>", 4: b"<SUF>", 5: b"<MID>"}
    EMBED_WIDTH = 8

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return ([1] if add_special else []) + [ord(c) for c in text if ord(c) < self.n_vocab]

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        return [self.SPECIALS.get(t) or chr(t).encode() for t in tokens]

    @property
    def n_vocab(self) -> int:
        return 65536

    def fim_tokens(self) -> FimTokens | None:
        return FimTokens(3, 4, 5) if self.fim else None

    def _embed(self, batch: list[list[int]]) -> list[list[float]]:
        self.embedded.append(batch)
        vectors = []
        for tokens in batch:
            vector = [0.0] * self.EMBED_WIDTH
            for t in tokens:
                vector[t % self.EMBED_WIDTH] += 1.0
            norm = sum(v * v for v in vector) ** 0.5 or 1.0
            vectors.append([v / norm for v in vector])
        return vectors

    def _load(self) -> None:
        pass

    @property
    def template_supports_tools(self) -> bool:
        return self.native_tools

    def render(self, chat: Chat) -> str:
        lines = [f"<{m['role']}>{m['content']}" for m in messages_as_text(chat, template_has_tools=False)]
        return "\n".join(lines) + "\n<assistant>"

    def _prepare(self, chat: Chat) -> Prompt:
        text = self.render(chat)
        if self.prefix_reuse:
            tokens = [zlib.crc32(word.encode()) for word in text.split()]
        else:
            tokens = list(range(self.count_tokens(text)))
        return Prompt(text=text, tokens=tokens, template_stops=["<end>"])

    def expected_reuse(self, prompt: Prompt) -> int:
        if not self.prefix_reuse:
            return 0
        return max(0, min(common_prefix(self.live_tokens, prompt.tokens), len(prompt.tokens) - 1))

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def _decode(self, generation: Generation, cancel: threading.Event) -> Iterator[str | int | TokenLogprob]:
        self.generations.append(generation)
        if self.prompt_delay:
            time.sleep(self.prompt_delay)
        yield self.expected_reuse(generation.prompt)
        self.live_tokens = list(generation.prompt.tokens)
        for piece in self.script(generation):
            if cancel.is_set():
                return
            if self.token_delay:
                time.sleep(self.token_delay)
            self.decoded_tokens += 1
            yield piece if generation.logprobs is None else fake_scored(piece, generation.logprobs)


def pieces(text: str, size: int = 3) -> list[str]:
    """Splits text into fixed-size pieces, the way tokens split tags and words anywhere."""
    return [text[i : i + size] for i in range(0, len(text), size)]
