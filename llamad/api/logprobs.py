"""Token log probabilities as the wire carries them in OpenAI's chat shape, which Ollama's
`logprobs` list copies: shared by those faces, owned by neither."""

from __future__ import annotations

from typing import Any, Sequence

from llamad.engine import TokenLogprob


def token_objects(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """One object per token: text, logprob, bytes and the most likely alternatives."""
    return [
        {
            "token": entry.text,
            "logprob": entry.logprob,
            "bytes": list(entry.bytes),
            "top_logprobs": [{"token": alt.text, "logprob": alt.logprob, "bytes": list(alt.bytes)} for alt in entry.top],
        }
        for entry in entries
    ]
