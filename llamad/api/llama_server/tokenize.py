"""llama-server's POST /tokenize and POST /detokenize: the model's own tokenizer, no chat
template. They read only the vocabulary, so they do not wait for the engine's queue."""

from __future__ import annotations

import asyncio
from typing import Any, Union

import msgspec
from litestar import Request, Router, post

from llamad.engine import Engine, check_token_ids
from llamad.serve.request import InvalidRequest
from llamad.serve.models import engine_for
from llamad.serve.body import decode_body, read_body


class TokenizeRequest(msgspec.Struct, kw_only=True):
    content: str
    add_special: bool = False  # llama-server's defaults: no BOS, "<start_of_turn>" is one token
    parse_special: bool = True
    with_pieces: bool = False
    model: str = ""


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str = ""


def piece_of(raw: bytes) -> Union[str, list[int]]:
    """A piece as text, or as its bytes when it is part of a multi-byte character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@post("/tokenize", status_code=200)
async def tokenize(request: Request) -> dict[str, Any]:
    req = decode_body(await read_body(request), TokenizeRequest)
    engine: Engine = await engine_for(request, req.model or None)
    engine.require_ready()
    ids = await asyncio.to_thread(engine.tokenize, req.content, req.add_special, req.parse_special)
    if not req.with_pieces:
        return {"tokens": ids}
    pieces = await asyncio.to_thread(engine.token_pieces, ids)
    return {"tokens": [{"id": i, "piece": piece_of(p)} for i, p in zip(ids, pieces)]}


@post("/detokenize", status_code=200)
async def detokenize(request: Request) -> dict[str, str]:
    req = decode_body(await read_body(request), DetokenizeRequest)
    engine: Engine = await engine_for(request, req.model or None)
    engine.require_ready()
    try:
        check_token_ids(req.tokens, engine.n_vocab)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="tokens") from None
    return {"content": await asyncio.to_thread(engine.detokenize, req.tokens)}


router = Router(path="/", route_handlers=[tokenize, detokenize])
