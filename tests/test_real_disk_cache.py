"""Real tier: the prompt cache survives a restart (llamad.engine.disk_cache).

A server answers a long prompt and is stopped (SIGTERM, as systemctl stop); a new server on
the same cache directory answers the same prompt reusing its prefix from disk: its usage
says so, /metrics counts the disk hit, and its first token comes far sooner.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_server

pytestmark = [pytest.mark.real, pytest.mark.timeout(400)]

# ~3,000 tokens on the demo model: ~6 s of prompt on two cores, a few ms to restore.
MANUAL = " ".join(f"Rule {i}: section {i % 13} applies to every request of kind {i % 7}." for i in range(220))
MESSAGES = [
    {"role": "system", "content": f"You are an agent. Operating manual: {MANUAL}"},
    {"role": "user", "content": "What does rule 5 say?"},
]


def ask(url: str) -> dict:
    """Streams one answer; its time to first token and usage."""
    # ignore_eos: the answer has tokens to time, whatever the model would say.
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.monotonic()
    first, usage = None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            # The first chunk (the role, empty content) may come before the prompt is read.
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.monotonic()
    assert first is not None and usage is not None
    return {"ttft_s": first - started, "usage": usage}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_a_restart_reuses_the_prompt_from_the_disk_cache(tmp_path: Path):
    kv = tmp_path / "kv"
    toml = "[server]\nparallel = 1\n"
    with start_server(tmp_path, toml, LLAMAD_CACHE_DIR=str(kv)) as server:
        cold = ask(server.url)
    prompt_tokens = cold["usage"]["prompt_tokens"]
    assert prompt_tokens > 2000
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] < 16
    files = list(kv.glob("*.kv"))
    assert len(files) == 1, "the stop wrote the slot's state"

    with start_server(tmp_path, toml, LLAMAD_CACHE_DIR=str(kv)) as server:
        again = ask(server.url)
        hits = metric(server.url, "llamad_prompt_cache_disk_hits_total")
        reused = metric(server.url, "llamad_prompt_cache_tokens_total")
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert again["usage"]["prompt_tokens"] == prompt_tokens
    assert cached >= prompt_tokens - 1 and reused == cached and hits == 1
    # Far sooner: a few ms of restore and one token against ~3,000 tokens of prompt.
    assert again["ttft_s"] < 0.25 * cold["ttft_s"], (cold["ttft_s"], again["ttft_s"])


def test_bench_restart_reports_cold_restart_and_warm(tmp_path: Path):
    """`llamad bench --restart FILE` on a ~2,000-token request: the three times, the reuse
    after the restart, and the state file it left."""
    import os
    import subprocess
    import sys

    from conftest import TEST_MODEL

    request = tmp_path / "request.json"
    manual = " ".join(f"Rule {i} applies to section {i % 13}." for i in range(300))
    request.write_text(json.dumps({"body": {
        "model": "m", "max_tokens": 4, "system": f"You are an agent. Manual: {manual}",
        "messages": [{"role": "user", "content": "What does rule 5 say?"}],
    }}))  # fmt: skip
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAD_", "MODEL_", "N_", "PORT", "HOST"))}
    env.update(MODEL_PATH=TEST_MODEL, PARALLEL="1")
    config = tmp_path / "llamad.toml"
    config.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "llamad.cli", "--config", str(config), "bench", "--restart", str(request), "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "after a restart (the disk cache)" in result.stdout
    r = json.loads(out.read_text())["restart"]
    assert r["prompt_tokens"] > 1500
    assert r["after_restart_cached_tokens"] >= r["prompt_tokens"] - 1 and r["warm_cached_tokens"] >= r["prompt_tokens"] - 1
    assert r["disk_files"] == 1 and r["disk_bytes"] > 0
    assert 0 < r["after_restart_ttft_s"] < 0.5 * r["cold_ttft_s"], r
