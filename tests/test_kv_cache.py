"""The KV cache: its element types and flash attention in the config, and the memory the
configured context takes, as `llamad check` prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamad.config import ConfigError, load_config
from llamad.engine.llama import context_flash_attn, kv_cache_mib

from conftest import TEST_MODEL


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llamad.toml"
    path.write_text(text)
    return path


def test_cache_types_and_flash_attention_come_from_the_file_and_the_environment(tmp_path):
    path = write(tmp_path, '[model]\ntype_k = "q8_0"\ntype_v = "q8_0"\nflash_attn = true\n')
    model = load_config(path, env={}).config.model
    assert (model.type_k, model.type_v, model.flash_attn) == ("q8_0", "q8_0", "on")
    model = load_config(path, env={"LLAMAD_MODEL_TYPE_K": "q4_0"}).config.model
    assert model.type_k == "q4_0"
    defaults = load_config(write(tmp_path, ""), env={}).config.model
    assert (defaults.type_k, defaults.type_v, defaults.flash_attn) == ("f16", "f16", "auto")


def test_an_unknown_cache_type_names_the_key_and_the_choices(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[model]\ntype_k = "q8"\n'), env={})
    assert "'model.type_k' = 'q8'" in str(info.value) and "q8_0" in str(info.value)


def test_a_quantized_v_cache_without_flash_attention_is_refused_before_loading(tmp_path):
    # llama.cpp would refuse it at load time ("quantized V cache was requested, but this
    # requires Flash Attention"); the config says so first, and how to fix it.
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[model]\ntype_v = "q8_0"\nflash_attn = false\n'), env={})
    assert "model.type_v" in str(info.value) and "model.flash_attn" in str(info.value)
    # A quantized K cache alone needs no flash attention.
    load_config(write(tmp_path, '[model]\ntype_k = "q8_0"\n'), env={})


def test_flash_attention_in_effect_is_read_from_llama_cpps_load_log():
    assert context_flash_attn(["llama_context: flash_attn            = enabled"]) == "on"
    assert context_flash_attn(["llama_context: flash_attn            = disabled"]) == "off"
    # llama.cpp's own "auto" is resolved on a later line.
    assert context_flash_attn(["llama_context: flash_attn            = auto", "resolve_fused_ops: Flash Attention disabled"]) == "off"
    assert context_flash_attn(["print_info: n_layer = 18"]) is None


def test_kv_cache_size_is_read_from_llama_cpps_load_log():
    lines = [
        "llama_kv_cache:        CPU KV buffer size =    96.00 MiB",
        "llama_kv_cache: size =   96.00 MiB ( 32768 cells,   3 layers,  1/1 seqs), K (f16):   48.00 MiB, V (f16):   48.00 MiB",
        "llama_kv_cache_iswa: creating     SWA KV cache, size = 32768 cells",
        "llama_kv_cache: size =  480.00 MiB ( 32768 cells,  15 layers,  1/1 seqs), K (f16):  240.00 MiB, V (f16):  240.00 MiB",
    ]
    assert kv_cache_mib(lines) == 576.0
    assert kv_cache_mib(["print_info: n_layer = 18"]) is None


def check(tmp_path: Path, toml: str) -> dict:
    """`llamad check` on the demo model with `toml`; its check_ok line as a dict."""
    config = write(tmp_path, toml)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAD_", "MODEL_", "N_"))}
    result = subprocess.run(
        [sys.executable, "-m", "llamad.cli", "--config", str(config), "check"],
        env={**environment, "MODEL_PATH": TEST_MODEL, "LLAMAD_LOGGING_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line.startswith("{")]
    return next(line for line in lines if line.get("event") == "check_ok")


@pytest.mark.real
def test_check_prints_the_kv_cache_memory_of_the_configured_context(tmp_path):
    f16 = check(tmp_path, '[server]\nparallel = 1\n[model]\nn_ctx = 8192\nflash_attn = "on"\n')
    q8 = check(tmp_path, '[server]\nparallel = 1\n[model]\nn_ctx = 8192\ntype_k = "q8_0"\ntype_v = "q8_0"\nflash_attn = true\n')
    # The cache is the slots' context: n_ctx per slot, for every slot.
    slots = check(tmp_path, '[server]\nparallel = 4\n[model]\nn_ctx = 8192\nflash_attn = "off"\n')
    assert slots["kv_cache_mib"] == 4 * 144 and slots["flash_attn"] == slots["flash_attn_context"] == "off"
    # Gemma 3 270M: 18 layers, one KV head of 256 dims for K and for V, every layer full size
    # (the slots' full-size sliding-window cache): 8192 x 18 x 2 x 256 x 2 bytes.
    assert f16["kv_cache_mib"] == 8192 * 18 * 2 * 256 * 2 / 2**20 == 144
    assert (f16["kv_cache_type"], f16["flash_attn"], f16["flash_attn_context"], f16["n_ctx"]) == ("f16/f16", "on", "on", 8192)
    # q8_0 stores 32 values in 34 bytes.
    assert q8["kv_cache_mib"] == pytest.approx(144 * 34 / 64, abs=0.01)
    assert (q8["kv_cache_type"], q8["flash_attn"]) == ("q8_0/q8_0", "on")
