"""What a GGUF file says about itself, read from its header only (no tensor data): for a
memory estimate before loading, and for listings of models that are not loaded."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

# GGUF value types (gguf.md): scalar sizes and struct formats.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Header keys the estimate needs ({arch} replaced); reading stops once all are found.
_WANTED = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
           "attention.key_length", "attention.value_length", "context_length")
_REQUIRED = _WANTED[:3]  # without these there is no estimate; the others have defaults


def gguf_header(path: Path, limit_keys: int = 4096, everything: bool = False) -> dict[str, Any]:
    """A GGUF header's strings and numbers (arrays skipped): by default only until the
    architecture keys a memory estimate needs are read; `everything`: every key."""
    found: dict[str, Any] = {}
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        _read(f, "<Q")  # tensor count
        count = _read(f, "<Q")
        arch = None
        for _ in range(min(count, limit_keys)):
            key = _string(f)
            # Past the architecture's block with what an estimate needs: stop. Writers group
            # a model's keys; the tokenizer's arrays (150k strings in some models) come next.
            if not everything and arch and not key.startswith(f"{arch}.") and all(f"{arch}.{k}" in found for k in _REQUIRED):
                break
            kind = _read(f, "<I")
            value = _value(f, kind)
            if key == "general.architecture":
                arch = value
            if value is not None:
                found[key] = value
            if not everything and arch and all(f"{arch}.{k}" in found for k in _WANTED):
                break
    return found


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    length = _read(f, "<Q")
    if length > 1 << 26:
        raise ValueError("implausible string in GGUF header")
    data = f.read(length)
    if len(data) != length:
        raise ValueError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item = _read(f, "<I")
        n = _read(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * n, os.SEEK_CUR)
        elif item == _STRING:
            for _ in range(n):
                f.seek(_read(f, "<Q"), os.SEEK_CUR)
        else:
            for _ in range(n):
                _value(f, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")




# general.file_type -> the quantization name Ollama's clients show.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
              12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def describe_file(path: Path) -> dict[str, Any]:
    """The keys of an engine's `describe()` a header holds (no parameter count: that needs
    the tensors); {} when the file cannot be read. Read once per version of the file."""
    try:
        stat = path.stat()
    except OSError:
        return {}
    return dict(_described(str(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _described(path_text: str, size: int, mtime_ns: int) -> dict[str, Any]:
    path = Path(path_text)
    try:
        header = gguf_header(path, everything=True)
    except (OSError, ValueError):
        return {}
    arch = str(header.get("general.architecture", "unknown"))
    return {
        "architecture": arch,
        "size_label": header.get("general.size_label", ""),
        "quantization": FILE_TYPES.get(header.get("general.file_type", -1), ""),
        "embedding_length": header.get(f"{arch}.embedding_length", 0),
        "context_length": header.get(f"{arch}.context_length", 0),
        "chat_template": header.get("tokenizer.chat_template", ""),
        "fim": "tokenizer.ggml.fim_pre_token_id" in header or "tokenizer.ggml.prefix_token_id" in header,
    }
