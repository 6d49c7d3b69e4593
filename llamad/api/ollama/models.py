"""Ollama's model listings: /api/version, /api/tags, /api/show, /api/ps. Every model of the
server's set (llamad.models.catalog) is listed as `<name>:latest` (Ollama's way of writing
a name without a tag); /api/ps lists those loaded, with when each unloads."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timezone
from typing import Any

import msgspec
from litestar import Request, Router, get, post

from llamad.models.catalog import ModelNotFound, ModelSpec
from llamad.models.gguf import describe_file
from llamad.models.pool import Resident
from llamad.serve.body import decode_body, read_body
from llamad.serve.models import pool_of

# The Ollama API version whose shapes these routes follow (clients gate features on it).
OLLAMA_API_VERSION = "0.13.0"
# Ollama's expires_at for a model that stays loaded.
FOREVER = "9999-12-31T23:59:59Z"


def iso(timestamp: float | None = None) -> str:
    """Ollama's timestamps: UTC, microseconds, 'Z'; None: now."""
    moment = datetime.now(timezone.utc) if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def listed_name(model_id: str) -> str:
    return model_id if ":" in model_id else model_id + ":latest"


def _file(spec: ModelSpec) -> tuple[int, float]:
    try:
        stat = os.stat(spec.path)
        return stat.st_size, stat.st_mtime
    except OSError:
        return 0, 0.0


def digest_of(spec: ModelSpec) -> str:
    """Stands in for Ollama's blob digest: a hash of the file's path, size and mtime (hashing
    gigabytes of weights for a listing would take minutes); it changes when the file does."""
    size, mtime = _file(spec)
    return hashlib.sha256(f"{spec.path}|{size}|{mtime}".encode()).hexdigest()


def described(spec: ModelSpec, resident: Resident | None) -> dict[str, Any]:
    """What the GGUF says about itself: from the loaded engine, or from the file's header."""
    if resident is not None and resident.state == "ready" and resident.engine.state == "ready":
        about = dict(resident.engine.describe())
        about.setdefault("architecture", resident.engine.info.get("architecture"))
        return about
    return describe_file(spec.path)


def details_of(spec: ModelSpec, about: dict[str, Any]) -> dict[str, Any]:
    family = str(about.get("architecture") or "unknown")
    count = about.get("parameter_count")
    size = about.get("size_label") or (f"{count / 1e6:.0f}M" if isinstance(count, int) and count else "")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": size,
        "quantization_level": about.get("quantization", ""),
    }


def model_entry(spec: ModelSpec, about: dict[str, Any]) -> dict[str, Any]:
    size, mtime = _file(spec)
    name = listed_name(spec.name)
    return {
        "name": name,
        "model": name,
        "modified_at": iso(mtime),
        "size": size,
        "digest": digest_of(spec),
        "details": details_of(spec, about),
    }


def capabilities_of(spec: ModelSpec, resident: Resident | None, about: dict[str, Any]) -> list[str]:
    if spec.role == "embeddings":
        return ["embedding"]
    # Tools work with any model: a prompt plus a grammar when its template has none.
    found = ["completion", "tools", "embedding"]
    loaded = resident is not None and resident.state == "ready" and resident.engine.state == "ready"
    if (resident.engine.fim_tokens() is not None) if loaded else about.get("fim"):
        found.append("insert")
    template = str(about.get("chat_template") or "")
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


@get("/api/tags")
async def api_tags(request: Request) -> dict[str, Any]:
    pool = pool_of(request)
    return {"models": [model_entry(spec, described(spec, pool.residents.get(name))) for name, spec in pool.catalog.models.items()]}


@get("/api/ps", sync_to_thread=False)
def api_ps(request: Request) -> dict[str, Any]:
    pool = pool_of(request)
    now_monotonic, now_wall = pool.clock(), time.time()
    models = []
    for name, resident in pool.residents.items():
        if resident.state != "ready" or resident.engine.state != "ready":
            continue
        spec = resident.spec
        entry = model_entry(spec, described(spec, resident))
        expires = resident.expires_at(now_monotonic)
        on_gpu = not str(resident.engine.info.get("gpu_layers_offloaded", "0")).startswith("0")
        models.append(
            {
                **{k: entry[k] for k in ("name", "model", "size", "digest", "details")},
                "expires_at": FOREVER if expires is None else iso(now_wall + (expires - now_monotonic)),
                "size_vram": resident.memory if on_gpu else 0,
                "context_length": resident.engine.n_ctx,
            }
        )
    return {"models": models}


@post("/api/show", status_code=200)
async def api_show(request: Request) -> dict[str, Any]:
    req = decode_body(await read_body(request), ShowRequest)
    pool = pool_of(request)
    name = req.model or req.name or None
    spec = pool.catalog.route(name)
    if spec is None:  # router.strict
        raise ModelNotFound(name or "", list(pool.catalog.models))
    resident = pool.residents.get(spec.name)
    about = described(spec, resident)
    family = details_of(spec, about)["family"]
    model_info: dict[str, Any] = {"general.architecture": family}
    if about.get("parameter_count"):
        model_info["general.parameter_count"] = about["parameter_count"]
    if about.get("context_length"):
        model_info[f"{family}.context_length"] = about["context_length"]
    if about.get("embedding_length"):
        model_info[f"{family}.embedding_length"] = about["embedding_length"]
    n_ctx = resident.engine.n_ctx if resident is not None and resident.state == "ready" else spec.config.model.n_ctx
    _, mtime = _file(spec)
    return {
        "license": "",
        "modelfile": f"# served by llamad\nFROM {spec.path}\nPARAMETER num_ctx {n_ctx}\n",
        "parameters": f"num_ctx {n_ctx}",
        "template": about.get("chat_template", ""),
        "details": details_of(spec, about),
        "model_info": model_info,
        "capabilities": capabilities_of(spec, resident, about),
        "modified_at": iso(mtime),
    }


router = Router(path="/", route_handlers=[api_version, api_tags, api_ps, api_show])
