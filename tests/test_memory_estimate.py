"""A model's memory before it loads (llamad.models.memory): its draft model counts too."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from llamad.config import load_config
from llamad.models.memory import OVERHEAD_BYTES, estimate_bytes, measured_bytes
from test_gguf_header import write_header

pytest.importorskip("gguf")


def config_for(tmp_path: Path, target: Path, toml: str = ""):
    (tmp_path / "c.toml").write_text(toml)
    env = {"MODEL_PATH": str(target), "N_CTX": "1024", "PARALLEL": "2"}
    return load_config(tmp_path / "c.toml", env=env).config


def test_a_draft_model_adds_its_weights_and_kv_cache(tmp_path: Path) -> None:
    target = write_header(tmp_path / "target.gguf", key_length=True)
    draft = write_header(tmp_path / "draft.gguf", key_length=True)
    alone = estimate_bytes(target, config_for(tmp_path, target))
    # 2 layers x 2 KV heads x (16 + 16) f16 values x 2 bytes, for 2 slots of 1,024 cells
    draft_kv = 2 * 1024 * 2 * 2 * (16 + 16) * 2
    expected_draft = draft.stat().st_size + draft_kv + OVERHEAD_BYTES
    with_draft = config_for(tmp_path, target, f'[speculative]\ndraft_model = "{draft}"\n')
    assert estimate_bytes(target, with_draft) == alone + expected_draft
    # Once loaded, llama.cpp's figures are the target's: the draft's estimate is added.
    engine = SimpleNamespace(info={"path": str(target), "kv_cache_mib": 1.0})
    assert measured_bytes(engine, 0, expected_draft) == target.stat().st_size + (1 << 20) + OVERHEAD_BYTES + expected_draft


async def test_the_pool_counts_a_loaded_models_draft(tmp_path: Path) -> None:
    """After the load, llama.cpp's KV figure is the target's alone: the pool adds the
    draft's estimate to what the loaded model takes under the budget."""
    from fake_engine import FakeEngine
    from llamad.models.catalog import build_catalog
    from llamad.models.memory import draft_bytes
    from llamad.models.pool import ModelPool

    target = write_header(tmp_path / "target.gguf", key_length=True)
    draft = write_header(tmp_path / "draft.gguf", key_length=True)
    toml = tmp_path / "c.toml"
    toml.write_text(f'[models.a]\npath = "{target}"\n[speculative]\ndraft_model = "{draft}"\n')
    catalog = build_catalog(load_config(toml, env={}))

    def factory(spec):
        engine = FakeEngine(model_id=spec.name)
        engine.info = {"path": str(target), "kv_cache_mib": 1.0}
        return engine

    pool = ModelPool(catalog, factory, budget=None)
    try:
        spec = catalog.models["a"]
        resident = await pool.acquire(spec)
        assert draft_bytes(spec.config) > 0
        assert resident.memory == target.stat().st_size + (1 << 20) + OVERHEAD_BYTES + draft_bytes(spec.config)
    finally:
        pool.close()
