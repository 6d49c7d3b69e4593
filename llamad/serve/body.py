"""Request bodies in, with errors a client can act on; and noticing a client that hangs up."""

from __future__ import annotations

import asyncio
import re
from typing import Awaitable, TypeVar

import msgspec
from litestar import Request
from litestar.exceptions import InternalServerException

from llamad.serve.errors import ApiError
from llamad.serve.request import InvalidRequest

T = TypeVar("T")

_decoders: dict[type, msgspec.json.Decoder] = {}
_PATH = re.compile(r" - at `\$\.?(.*)`$")


async def read_body(request: Request) -> bytes:
    """The request body. A client that stops sending it for `server.write_timeout` seconds
    gets a 408 (a stalled upload must not hold a connection forever); one that hangs up
    mid-body is a 499, not a server error."""
    stall_s = request.app.state.config.server.write_timeout
    chunks: list[bytes] = []
    stream = request.stream()
    try:
        while True:
            try:
                chunks.append(await asyncio.wait_for(stream.__anext__(), stall_s))
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body stopped arriving for {stall_s:.0f} s", "invalid_request") from None
            except InternalServerException:  # Litestar's "client disconnected prematurely"
                raise client_closed() from None
    finally:
        await stream.aclose()


def decode_body(body: bytes, schema: type[T]) -> T:
    """Decodes and validates a JSON body; a failure is a 400 that names the field."""
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    decoder = _decoders.get(schema)
    if decoder is None:
        decoder = _decoders[schema] = msgspec.json.Decoder(schema)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group(1) if match else None
        message = _PATH.sub("", text)
        if param:
            message = f"{message} at '{param}'"
        raise InvalidRequest(f"invalid request: {message}", param=param or None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8 JSON") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work` (a non-streamed answer being folded); if the client hangs up first,
    `work` is cancelled, which cancels its generation, and the request ends as a 499."""
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
        if working in done:
            return working.result()
        working.cancel()
        try:
            await working
        except asyncio.CancelledError:
            pass
        raise client_closed()
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def client_closed() -> ApiError:
    return ApiError(499, "client closed the request", "invalid_request")
