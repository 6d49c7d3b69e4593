"""Embeddings: OpenAI's POST /v1/embeddings and Ollama's POST /api/embed (and its older
/api/embeddings). The vectors are the chat model's own hidden states, mean-pooled and
L2-normalised (llamad.engine.llama_embed), computed behind the same queue as generation; all the
inputs of a request go through the engine as one batch."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any, Union

import msgspec
from litestar import Request, Response, Router, post

from llamad.engine import Engine, check_token_ids
from llamad.serve.request import InvalidRequest
from llamad.serve.models import engine_for, keep_alive_of, pool_of
from llamad.serve.observe import record_of
from llamad.serve.body import decode_body, read_body

MAX_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of such lists (checked below).
    input: Any = None
    model: str = ""
    encoding_format: str = "float"
    dimensions: Union[int, None] = None
    user: Union[str, None] = None


class OllamaEmbedRequest(msgspec.Struct, kw_only=True):
    input: Union[str, list[str], None] = None
    model: str = ""
    truncate: bool = True
    dimensions: Union[int, None] = None
    options: Union[dict[str, Any], None] = None
    keep_alive: Union[float, str, None] = None


class OllamaEmbeddingsRequest(msgspec.Struct, kw_only=True):
    prompt: str = ""
    model: str = ""
    options: Union[dict[str, Any], None] = None
    keep_alive: Union[float, str, None] = None


async def embedding_engine_for(request: Request, name: str, keep_alive: Any = None) -> Engine:
    """The model that embeds for a request naming `name`: an embedding model of the set
    ([models.<name>] role = "embeddings") it names; else the dedicated [embeddings] model
    when one is configured; else the chat model the name routes to."""
    spec = pool_of(request).catalog.match(name) if name else None
    embedder = request.app.state.embedder
    if embedder is not None and (spec is None or spec.role != "embeddings"):
        return embedder
    return await engine_for(request, name or None, role="embeddings", keep_alive=keep_alive_of(keep_alive))


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def inputs_of(value: Any, param: str = "input") -> list[str | list[int]]:
    """A string, strings, token ids, or lists of token ids -> one item per vector."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif _is_tokens(value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise InvalidRequest(
            f"'{param}' must be a non-empty string, a list of strings, a list of token ids or a list of such lists",
            param=param,
        )
    if len(items) > MAX_INPUTS:
        raise InvalidRequest(f"'{param}' holds {len(items)} items; at most {MAX_INPUTS} per request", param=param)
    for index, item in enumerate(items):
        where = f"{param}[{index}]" if len(items) > 1 or not isinstance(value, str) else param
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"'{where}' is an empty string; there is nothing to embed", param=where)
        elif not _is_tokens(item):
            raise InvalidRequest(f"'{where}' must be a non-empty string or a non-empty list of token ids", param=where)
    return items


async def token_lists(engine: Engine, items: list[str | list[int]], truncate: bool, param: str = "input") -> list[list[int]]:
    engine.require_ready()

    def work() -> list[list[int]]:
        return [engine.tokenize(i, add_special=True, parse_special=False) if isinstance(i, str) else i for i in items]

    sequences = await asyncio.to_thread(work)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            try:
                check_token_ids(item, engine.n_vocab)
            except ValueError as exc:
                raise InvalidRequest(f"'{param}[{index}]': {exc}", param=f"{param}[{index}]") from None
    limit = engine.embed_max_tokens
    for index, tokens in enumerate(sequences):
        if len(tokens) > limit:
            if not truncate:
                raise InvalidRequest(
                    f"'{param}[{index}]' is {len(tokens)} tokens; this model embeds at most {limit} "
                    "(shorten it, or send truncate: true)",
                    param=param,
                    code="context_length_exceeded",
                )
            sequences[index] = tokens[:limit]
    return sequences


def check_dimensions(dimensions: int | None, width: int | None) -> None:
    if dimensions is not None and dimensions != width:
        raise InvalidRequest(
            f"'dimensions' cannot be changed: this model's vectors have {width} dimensions "
            "(it was not trained to be shortened); send the request without 'dimensions'",
            param="dimensions",
        )


def as_base64(vector: list[float]) -> str:
    """The little-endian float32 bytes, base64-encoded (what the openai SDK decodes)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@post("/v1/embeddings", status_code=200)
async def openai_embeddings(request: Request) -> dict[str, Any]:
    req = decode_body(await read_body(request), EmbeddingRequest)
    engine: Engine = await embedding_engine_for(request, req.model)
    if req.encoding_format not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    items = inputs_of(req.input)
    sequences = await token_lists(engine, items, truncate=False)
    vectors = await engine.embed(sequences)
    check_dimensions(req.dimensions, len(vectors[0]))
    prompt_tokens = sum(len(s) for s in sequences)
    record_of(request).prompt_tokens = prompt_tokens
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": as_base64(vector) if req.encoding_format == "base64" else vector,
            }
            for index, vector in enumerate(vectors)
        ],
        "model": engine.model_id,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


@post("/api/embed", status_code=200)
async def ollama_embed(request: Request) -> Response:
    started = record_of(request).started
    req = decode_body(await read_body(request), OllamaEmbedRequest)
    engine: Engine = await embedding_engine_for(request, req.model, req.keep_alive)
    model = req.model or engine.model_id
    if req.input is None or req.input == []:  # Ollama's way to load a model: nothing to embed
        engine.require_ready()
        return Response({"model": model, "embeddings": []})
    sequences = await token_lists(engine, inputs_of(req.input), truncate=req.truncate)
    vectors = await engine.embed(sequences)
    check_dimensions(req.dimensions, len(vectors[0]))
    prompt_tokens = sum(len(s) for s in sequences)
    record_of(request).prompt_tokens = prompt_tokens
    return Response(
        {
            "model": model,
            "embeddings": vectors,
            "total_duration": int((time.monotonic() - started) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
        }
    )


@post("/api/embeddings", status_code=200)
async def ollama_embeddings(request: Request) -> dict[str, Any]:
    """Ollama's older route: one prompt, one vector."""
    req = decode_body(await read_body(request), OllamaEmbeddingsRequest)
    engine: Engine = await embedding_engine_for(request, req.model, req.keep_alive)
    if not req.prompt:
        engine.require_ready()
        return {"embedding": []}
    sequences = await token_lists(engine, [req.prompt], truncate=True, param="prompt")
    [vector] = await engine.embed(sequences)
    record_of(request).prompt_tokens = len(sequences[0])
    return {"embedding": vector}


router = Router(path="/", route_handlers=[openai_embeddings, ollama_embed, ollama_embeddings])
