"""A copy of the demo GGUF that names fill-in-the-middle tokens, so FIM runs on the real
engine.

Gemma 3 270M has no FIM tokens, so on the demo model `suffix` is a 400. Its vocabulary
does have reserved control tokens it never uses (`<unused0>`, `<unused1>`, …). The copy
is the same file (weights, vocabulary, every other key) plus the three keys llama.cpp's
vocabulary loader reads for FIM: `tokenizer.ggml.fim_pre_token_id`, `fim_suf_token_id`
and `fim_mid_token_id`, pointing at three of those tokens. `llama_vocab_fim_pre` etc. then
return them, so llamad builds real FIM prompts with them. The model was never trained on
them: what it writes in the middle is noise, and only the prompt and the wire shapes are
under test.

The copy takes tens of seconds (the reader parses 262,144 token strings), so it is kept
in ~/.cache/llamad/models (or $XDG_CACHE_HOME/llamad/models) under a name keyed by the
source file's size and mtime, and written under a temporary name first, so a killed run
leaves no half file behind. Run as a script to write one: `python tests/fim_gguf.py`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FIM_TOKENS = {
    "tokenizer.ggml.fim_pre_token_id": "<unused0>",
    "tokenizer.ggml.fim_suf_token_id": "<unused1>",
    "tokenizer.ggml.fim_mid_token_id": "<unused2>",
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamad" / "models"


def fim_copy_path(source: Path, directory: Path) -> Path:
    stat = source.stat()
    return directory / f"{source.stem}.fim-{stat.st_size}-{stat.st_mtime_ns}.gguf"


def write_fim_copy(source: Path, target: Path) -> dict[str, int]:
    """Writes the copy to `target`; returns the FIM token ids it names, by key."""
    import gguf

    reader = gguf.GGUFReader(source)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = {}
    for key, text in FIM_TOKENS.items():
        if text not in tokens:
            raise ValueError(f"{source} has no token {text!r} to use as a FIM token")
        ids[key] = tokens.index(text)
    architecture = reader.fields["general.architecture"].contents()
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        # The writer adds these itself (GGUF.* are the reader's view of the header).
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for key, token_id in ids.items():
        writer.add_uint32(key, token_id)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    partial.replace(target)
    return ids


def fim_model(source: Path, directory: Path | None = None) -> Path:
    """The cached FIM copy of `source`, written first when there is none for this file."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = fim_copy_path(source, directory)
    if not target.is_file():
        write_fim_copy(source, target)
    return target


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["LLAMAD_TEST_MODEL"])
    started = time.monotonic()
    path = fim_model(source)
    print(f"{path} ({time.monotonic() - started:.1f} s)")
