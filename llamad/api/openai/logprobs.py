"""Token log probabilities in OpenAI's two wire shapes: the legacy completions' parallel
lists, and chat's list of token objects (which Ollama's API reuses). Also what each
request may ask for."""

from __future__ import annotations

from typing import Any, Sequence

from llamad.api.logprobs import token_objects
from llamad.engine import TokenLogprob
from llamad.serve.request import InvalidRequest

LEGACY_MAX = 5  # the legacy API's own limit
CHAT_MAX = 20


def legacy_top_n(logprobs: int | None, echo: bool) -> int | None:
    """`logprobs` of a /v1/completions request -> how many alternatives per token."""
    if logprobs is None:
        return None
    if not 0 <= logprobs <= LEGACY_MAX:
        raise InvalidRequest(f"'logprobs' must be between 0 and {LEGACY_MAX}, got {logprobs}", param="logprobs")
    if echo:
        # OpenAI then scores the echoed prompt too; this server scores only what it
        # generates, and half an answer would read as a wrong one.
        raise InvalidRequest(
            "'echo' with 'logprobs' asks for the prompt's log probabilities, which this server does not "
            "compute; send one or the other",
            param="echo",
        )
    return logprobs


def chat_top_n(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """`logprobs` / `top_logprobs` of a chat request -> how many alternatives per token."""
    if top_logprobs is not None:
        if not logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
        if not 0 <= top_logprobs <= CHAT_MAX:
            raise InvalidRequest(f"'top_logprobs' must be between 0 and {CHAT_MAX}, got {top_logprobs}", param="top_logprobs")
    if not logprobs:
        return None
    return top_logprobs or 0


def legacy(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """`choices[i].logprobs` of a text completion; `offset` is where the first entry's text
    starts in the choice's text."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for entry in entries:
        tokens.append(entry.text)
        token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for alternative in entry.top:
            top.setdefault(alternative.text, alternative.logprob)
        # As OpenAI: the sampled token is always listed, so up to logprobs + 1 entries.
        top.setdefault(entry.text, entry.logprob)
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(entry.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def chat(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`choices[0].logprobs` of a chat completion (or of one chunk)."""
    return {"content": token_objects(entries), "refusal": None}
