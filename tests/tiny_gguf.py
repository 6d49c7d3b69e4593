"""Writes a tiny random-weight Llama GGUF that carries its own chat template.

The demo model has no chat template, so this is how the tests reach the other branch of
template selection (the GGUF's own Jinja template) with the real llama.cpp engine. Its
output is noise; only the machinery around it is under test. Run as a script to write one:
`python tests/tiny_gguf.py out.gguf`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|end|>{% endif %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)


def write_tiny_llama(
    path: Path,
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 512,
    template: str | None = TEMPLATE,
    finetune: str | None = None,
) -> Path:
    # head size 64: GPU attention kernels do not all support smaller heads.
    import gguf

    rng = np.random.default_rng(0)
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    words = ["▁", "▁the", "▁a", "e", "t", "a", "o", "n", "s", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<think>", "</think>"]
    tokens += words
    types += [gguf.TokenType.NORMAL] * (len(words) - 6) + [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * 2
    n_vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(words))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    if template is not None:
        writer.add_chat_template(template)
    if finetune is not None:
        writer.add_finetune(finetune)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    print(write_tiny_llama(Path(sys.argv[1])))
