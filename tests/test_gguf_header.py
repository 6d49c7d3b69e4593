"""The GGUF header reader behind memory estimates stops after the model's own keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.models.gguf import gguf_header

gguf = pytest.importorskip("gguf")


def write_header(path: Path, key_length: bool) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    if key_length:
        writer.add_key_length(16)
        writer.add_value_length(16)
        writer.add_head_count_kv(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(20000)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("key_length", [True, False])
def test_the_reader_stops_at_the_end_of_the_architecture_keys(tmp_path: Path, key_length: bool) -> None:
    header = gguf_header(write_header(tmp_path / "m.gguf", key_length))
    assert header["llama.block_count"] == 2 and header["llama.embedding_length"] == 64
    assert ("llama.attention.key_length" in header) is key_length
    # The tokenizer (its vocabulary: 150k strings in some models) is never read.
    assert "tokenizer.ggml.model" not in header
    assert gguf_header(tmp_path / "m.gguf", everything=True)["tokenizer.ggml.model"] == "llama"
