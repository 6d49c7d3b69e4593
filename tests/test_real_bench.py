"""`llamad bench` end to end on the demo model: every phase runs and reports its figures.

Only the shape and sanity of the figures are checked (no speed thresholds: the machine is
shared); the README holds what a full run measured.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_MODEL

pytestmark = pytest.mark.real


def test_bench_runs_every_phase_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAD_", "MODEL_", "N_", "PORT", "HOST"))}
    env["MODEL_PATH"] = TEST_MODEL
    # The hang-up phase times a request queued behind the running one: one slot.
    env["PARALLEL"] = "1"
    config = tmp_path / "llamad.toml"
    config.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "llamad.cli", "--config", str(config), "bench",
         "--runs", "1", "--tokens", "24", "--concurrency", "2", "--streams", "1,2", "--prefix-tokens", "300",
         "--embed-inputs", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ratio streamed / engine decode" in result.stdout
    data = json.loads(out.read_text())
    positive = [
        data["engine"]["decode_tokens_per_s"],
        data["http"]["streamed_decode_tokens_per_s"],
        data["http"]["non_streamed_tokens_per_s_end_to_end"],
        data["http"]["streamed_ttft_s"],
        data["concurrency"]["aggregate_tokens_per_s"],
        data["prompt_cache"]["turn1_ttft_s"],
        data["prompt_cache"]["turn2_ttft_s"],
        data["hangup"]["decode_to_next_first_token_s"],
        data["hangup"]["prompt_to_next_first_token_s"],
        data["streamed_over_engine"],
        data["streamed_over_non_streamed_end_to_end"],
        data["streamed_read_late_over_non_streamed"],
        data["embeddings"]["inputs_per_s"],
    ]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in positive), positive
    assert data["http"]["completion_tokens"] == 24
    assert data["concurrency"]["ok"] == 2
    assert data["embeddings"]["width"] == 640 and data["embeddings"]["inputs"] == 8
    assert [(c["streams"], c["ok"]) for c in data["parallel"]] == [(1, 1), (2, 2)]
    # The second turn found the first turn's prefix in the cache.
    assert data["prompt_cache"]["turn2_cached_tokens"] > 200


def test_the_engine_alone_times_steps_that_check_a_draft_by_width(tmp_path: Path) -> None:
    from llamad.bench.ceiling import verify_rates
    from llamad.config import load_config

    config = tmp_path / "llamad.toml"
    config.write_text(f'[model]\npath = "{TEST_MODEL}"\nn_ctx = 1024\nflash_attn = "off"\n[server]\nparallel = 1\n')
    text = "def add(a, b):\n    return a + b\n" * 20
    figures = verify_rates(load_config(config, env={}), Path(TEST_MODEL), text, (1, 4, 5), steps=2)
    assert figures["context_tokens"] > 100
    assert set(figures["tokens_per_s"]) == set(figures["step_ms"]) == {"1", "4", "5"}
    for width, rate in figures["tokens_per_s"].items():
        # A rate is the width over the step's time: both come from the same measurement.
        assert rate > 0 and math.isclose(rate * figures["step_ms"][width] / 1000, int(width))
