"""A copy of the demo GGUF that carries a family's published chat template.

A template is model data: the real engine reads it from `tokenizer.chat_template`, so to run
a real template through LlamaEngine (template choice, rendering with the request's
switches, tokenizing) the template is put into a copy of the demo GGUF, with every other
key, the vocabulary and the weights unchanged (as tests/fim_gguf.py does for FIM tokens).
The model never learned that family's turn tokens: only the prompt is under test.

Copies are kept in ~/.cache/llamad/models under a name keyed by the source file and the
template's digest, written under a temporary name first.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fim_gguf import cache_dir

TEMPLATE_KEY = "tokenizer.chat_template"


def write_template_copy(source: Path, target: Path, template: str) -> None:
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        if field.name in ("general.architecture", TEMPLATE_KEY) or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_string(TEMPLATE_KEY, template)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    partial.replace(target)


def template_model(source: Path, template: str, directory: Path | None = None) -> Path:
    """The cached copy of `source` carrying `template`, written first when there is none."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stat = source.stat()
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    target = directory / f"{source.stem}.template-{digest}-{stat.st_size}-{stat.st_mtime_ns}.gguf"
    if not target.is_file():
        write_template_copy(source, target, template)
    return target
