"""Ollama's model listings: /api/version, /api/tags, /api/show, /api/ps. The one served
model appears as `<model.name>:latest` (Ollama's way of writing a name without a tag), and
every name a client asks about resolves to it."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from typing import Any

import msgspec
from litestar import Request, Router, get, post

from llamad.engine import Engine
from llamad.serve.observe import engine_of
from llamad.serve.body import decode_body, read_body

# The Ollama API version whose shapes these routes follow (clients gate features on it).
OLLAMA_API_VERSION = "0.13.0"


def iso(timestamp: float | None = None) -> str:
    """Ollama's timestamps: UTC, microseconds, 'Z'; None: now."""
    moment = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def listed_name(model_id: str) -> str:
    return model_id if ":" in model_id else model_id + ":latest"


def _file(engine: Engine) -> tuple[int, float]:
    try:
        stat = os.stat(str(engine.info.get("path", "")))
        return stat.st_size, stat.st_mtime
    except OSError:
        return 0, 0.0


def digest_of(engine: Engine) -> str:
    """Stands in for Ollama's blob digest: a hash of the file's path, size and mtime (hashing
    gigabytes of weights for a listing would take minutes); it changes when the file does."""
    size, mtime = _file(engine)
    return hashlib.sha256(f"{engine.info.get('path', '')}|{size}|{mtime}".encode()).hexdigest()


def details_of(engine: Engine) -> dict[str, Any]:
    described = engine.describe()
    family = str(described.get("architecture") or engine.info.get("architecture", "unknown"))
    count = described.get("parameter_count")
    size = described.get("size_label") or (f"{count / 1e6:.0f}M" if isinstance(count, int) and count else "")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": size,
        "quantization_level": described.get("quantization", ""),
    }


def model_entry(engine: Engine) -> dict[str, Any]:
    size, mtime = _file(engine)
    name = listed_name(engine.model_id)
    return {
        "name": name,
        "model": name,
        "modified_at": iso(mtime),
        "size": size,
        "digest": digest_of(engine),
        "details": details_of(engine),
    }


def capabilities_of(engine: Engine) -> list[str]:
    # Tools work with any model: a prompt plus a grammar when its template has none.
    found = ["completion", "tools", "embedding"]
    if engine.fim_tokens() is not None:
        found.append("insert")
    template = str(engine.describe().get("chat_template") or "")
    if "<think>" in template or "enable_thinking" in template:
        found.append("thinking")
    return found


class ShowRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    name: str = ""  # older clients
    verbose: bool = False


@get("/api/version", sync_to_thread=False)
def api_version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


@get("/api/tags", sync_to_thread=False)
def api_tags(request: Request) -> dict[str, Any]:
    return {"models": [model_entry(request.app.state.engine)]}


@get("/api/ps", sync_to_thread=False)
def api_ps(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    if engine.state != "ready":
        return {"models": []}
    entry = model_entry(engine)
    on_gpu = not str(engine.info.get("gpu_layers_offloaded", "0")).startswith("0")
    return {
        "models": [
            {
                **{k: entry[k] for k in ("name", "model", "size", "digest", "details")},
                # Loaded for as long as the daemon runs: keep_alive does not unload it.
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": entry["size"] if on_gpu else 0,
                "context_length": engine.n_ctx,
            }
        ]
    }


@post("/api/show", status_code=200)
async def api_show(request: Request) -> dict[str, Any]:
    engine: Engine = engine_of(request)
    decode_body(await read_body(request), ShowRequest)
    engine.require_ready()
    described = engine.describe()
    family = details_of(engine)["family"]
    model_info: dict[str, Any] = {"general.architecture": family}
    if described.get("parameter_count"):
        model_info["general.parameter_count"] = described["parameter_count"]
    if described.get("context_length"):
        model_info[f"{family}.context_length"] = described["context_length"]
    if described.get("embedding_length"):
        model_info[f"{family}.embedding_length"] = described["embedding_length"]
    _, mtime = _file(engine)
    return {
        "license": "",
        "modelfile": f"# served by llamad\nFROM {engine.info.get('path', '')}\nPARAMETER num_ctx {engine.n_ctx}\n",
        "parameters": f"num_ctx {engine.n_ctx}",
        "template": described.get("chat_template", ""),
        "details": details_of(engine),
        "model_info": model_info,
        "capabilities": capabilities_of(engine),
        "modified_at": iso(mtime),
    }


router = Router(path="/", route_handlers=[api_version, api_tags, api_ps, api_show])
