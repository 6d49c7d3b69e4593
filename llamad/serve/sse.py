"""The only place that turns events into Server-Sent Events frames."""

from __future__ import annotations

from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()

# Every streamed answer (SSE, and Ollama's NDJSON too): no caching, no proxy buffering.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def data_frame(payload: Any) -> bytes:
    """`data: <json>` and a blank line (OpenAI framing: no `event:` line)."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def event_frame(event: str, payload: Any) -> bytes:
    """`event: <type>` then `data: <json>` (Anthropic framing)."""
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"


def done_frame() -> bytes:
    return b"data: [DONE]\n\n"


def comment_frame(text: str = "keep-alive") -> bytes:
    """An SSE comment: clients ignore it, proxies see traffic."""
    return b": " + text.encode() + b"\n\n"
