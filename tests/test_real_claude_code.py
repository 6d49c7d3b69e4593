"""Claude Code against a real `llamad serve` on the demo model.

- the pinned `claude -p` (installed with npm by tests/agents.py), with the README's small-model
  profile, exits 0 with the demo model's answer; with its full default prompt (~12,000 tokens,
  every tool) each of its requests is served;
- Claude Code's captured requests, replayed streamed, come back in the event order its SDK
  checks;
- its second request, after the same prefix, reuses at least 90% of the prompt from the KV
  cache, in usage and in /metrics.

The demo model is a 270M base model: the answer's words are poor; the protocol is checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from agents import Agents, AgentsUnavailable, claude_command, claude_small_model_command, install_agents
from conftest import RunningServer, start_server
from test_anthropic import assert_valid_stream
from test_claude_code import CAPTURES, NEEDS_ALL_SCHEMAS, captured
from test_real_load import metric

pytestmark = pytest.mark.real

# The demo's context (etc/llamad.toml) holds Claude Code's ~12,000-token first request; short
# answers keep the test quick (the demo model seldom stops by itself).
HARD_CAP = 32
AGENT_TOML = f"[model]\nn_ctx = 32768\n[limits]\nmax_tokens_hard_cap = {HARD_CAP}\n"


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("agent"), AGENT_TOML) as server:
        yield server


@pytest.fixture(scope="module")
def agents() -> Agents:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (make test-deps installs nodejs and npm)")
    try:
        return install_agents()
    except AgentsUnavailable as exc:
        pytest.fail(str(exc))


def stream(base: str, body: dict[str, Any]) -> list[tuple[str, dict]]:
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219", "x-app": "cli"}
    with httpx.Client(timeout=600) as client:
        with connect_sse(client, "POST", base + "/v1/messages?beta=true", json=body, headers=headers) as source:
            assert source.response.status_code == 200, source.response.read()
            return [(event.event, json.loads(event.data)) for event in source.iter_sse()]


@NEEDS_ALL_SCHEMAS
@pytest.mark.timeout(900)  # a ~12,000-token prompt on two CPU cores
def test_claude_code_answers_through_llamad(agents: Agents, agent_server: RunningServer, tmp_path: Path):
    # The settings the README gives: without them Claude Code assumes a 1M window, reserves
    # 32000 tokens for the answer, and compacts a 12k prompt "too long" for 32768 - 32000.
    settings = {
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "32768",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(HARD_CAP),
        "API_TIMEOUT_MS": "900000",  # its default, 600 s, is short for a cold 12k prompt on a busy CPU
    }
    argv, environment = claude_command(agents, agent_server.url, tmp_path / "home", extra=settings)
    workdir = tmp_path / "project"
    workdir.mkdir()
    log_start = len(agent_server.log())
    result = subprocess.run(
        argv, env=environment, cwd=workdir, capture_output=True, text=True, timeout=850, stdin=subprocess.DEVNULL
    )
    served = [json.loads(line) for line in agent_server.log()[log_start:].splitlines() if line.startswith("{")]
    statuses = [r["status"] for r in served if r.get("event") == "request" and r.get("route") == "/v1/messages"]
    report = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}\nstatuses: {statuses}"
    # Every request Claude Code made was served.
    assert statuses and set(statuses) == {200}, report
    if result.returncode != 0:
        # The demo model (a base model) seldom ends its turn: each answer stops at the cap,
        # and after its continuation attempts Claude Code reports its own output limit.
        assert f"exceeded the {HARD_CAP} output token maximum" in result.stdout, report
        assert len(statuses) > 1, report  # it did try to continue
    else:
        assert result.stdout.strip(), report


def served_requests(log: str, route: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [r for r in lines if r.get("event") == "request" and r.get("route") == route]


@pytest.mark.timeout(600)
def test_claude_code_with_the_small_model_profile_exits_0_with_the_models_answer(agents: Agents, tmp_path: Path):
    (tmp_path / "server").mkdir()
    # Claude Code sends no temperature: the server's greedy default makes the run repeatable.
    toml = "[model]\nn_ctx = 4096\n[limits]\nmax_tokens_hard_cap = 256\n[sampling]\ntemperature = 0.0\n"
    with start_server(tmp_path / "server", toml) as server:
        argv, environment = claude_small_model_command(agents, server.url, tmp_path / "home")
        (tmp_path / "project").mkdir()
        result = subprocess.run(
            argv, env=environment, cwd=tmp_path / "project", capture_output=True, text=True, timeout=500,
            stdin=subprocess.DEVNULL,
        )
        served = served_requests(server.log(), "/v1/messages")
    report = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}\nserved: {served}"
    assert result.returncode == 0, report
    assert result.stdout.strip(), report
    # The model ended its own turn (the transcript's next-speaker stop), within the cap.
    assert served and all(r["status"] == 200 for r in served), report
    assert served[-1]["finish_reason"] == "stop" and served[-1]["completion_tokens"] < 256, report


@NEEDS_ALL_SCHEMAS
@pytest.mark.timeout(900)
def test_captured_turns_stream_in_order_and_the_second_reuses_the_first_ones_prompt(agent_server: RunningServer):
    first = stream(agent_server.url, captured(1, tools=True))
    reused_before = metric(agent_server.url, "llamad_prompt_cache_tokens_total")
    second = stream(agent_server.url, captured(2, tools=True))
    for events in (first, second):
        assert_valid_stream(events)
        assert events[-2][1]["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    start, final = second[0][1]["message"]["usage"], second[-2][1]["usage"]
    prompt_tokens = final["input_tokens"] + final["cache_read_input_tokens"]
    assert prompt_tokens > 10_000
    assert final["cache_read_input_tokens"] >= 0.9 * prompt_tokens
    # The forecast in message_start matches, with nothing else running in between.
    assert start["cache_read_input_tokens"] == final["cache_read_input_tokens"]
    assert metric(agent_server.url, "llamad_prompt_cache_tokens_total") - reused_before == final["cache_read_input_tokens"]


@NEEDS_ALL_SCHEMAS
@pytest.mark.timeout(900)
def test_bench_times_claude_codes_request_cold_and_on_its_next_turn(agent_server: RunningServer, tmp_path: Path):
    out, config = tmp_path / "bench.json", tmp_path / "llamad.toml"
    config.write_text("")
    capture = sorted(CAPTURES.glob("*_post_v1_messages.json"))[0]
    result = subprocess.run(
        [sys.executable, "-m", "llamad.cli", "--config", str(config), "bench", "--url", agent_server.url,
         "--runs", "1", "--tokens", "8", "--concurrency", "0", "--prefix-tokens", "0", "--embed-inputs", "0",
         "--agent", str(capture), "--json", str(out)],
        capture_output=True, text=True, timeout=850,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "agent request" in result.stdout
    agent = json.loads(out.read_text())["agent"]
    assert agent["turn1_prompt_tokens"] > 10_000
    assert agent["turn2_cache_read_tokens"] >= 0.9 * agent["turn2_prompt_tokens"]
    assert 0 < agent["turn2_ttft_s"] < agent["turn1_ttft_s"]
