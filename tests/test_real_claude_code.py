"""Claude Code against a real `llamad serve` on the demo model.

- the pinned `claude -p` (installed with npm by tests/agents.py) exits 0 with an answer;
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
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from agents import Agents, AgentsUnavailable, claude_command, install_agents
from conftest import RunningServer, start_server
from test_anthropic import assert_valid_stream
from test_claude_code import NEEDS_ALL_SCHEMAS, captured
from test_real_load import metric

pytestmark = pytest.mark.real

# The demo's context (etc/llamad.toml) holds Claude Code's ~12,500-token first request; short
# answers keep the test quick (the demo model seldom stops by itself).
AGENT_TOML = "[model]\nn_ctx = 32768\n[limits]\nmax_tokens_hard_cap = 24\n"


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
def test_claude_code_answers_through_llamad(agents: Agents, agent_server: RunningServer, tmp_path: Path):
    argv, environment = claude_command(
        agents, agent_server.url, tmp_path / "home", extra={"CLAUDE_CODE_MAX_CONTEXT_TOKENS": "32768"}
    )
    workdir = tmp_path / "project"
    workdir.mkdir()
    result = subprocess.run(
        argv + ["--max-turns", "2"],
        env=environment,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=500,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}\nllamad: {agent_server.log()[-3000:]}"
    assert result.stdout.strip()


@NEEDS_ALL_SCHEMAS
def test_captured_requests_stream_in_the_order_claude_codes_sdk_checks(agent_server: RunningServer):
    for turn in (1, 2):
        events = stream(agent_server.url, captured(turn, tools=True))
        assert_valid_stream(events)
        start, final = events[0][1]["message"], events[-2][1]
        assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] > 10_000
        assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")


@NEEDS_ALL_SCHEMAS
def test_the_second_request_reuses_the_first_ones_prompt(agent_server: RunningServer):
    stream(agent_server.url, captured(1, tools=True))
    reused_before = metric(agent_server.url, "llamad_prompt_cache_tokens_total")
    events = stream(agent_server.url, captured(2, tools=True))
    final = events[-2][1]["usage"]
    prompt_tokens = final["input_tokens"] + final["cache_read_input_tokens"]
    assert final["cache_read_input_tokens"] >= 0.9 * prompt_tokens
    # The forecast in message_start matches, with nothing else running in between.
    assert events[0][1]["message"]["usage"]["cache_read_input_tokens"] == final["cache_read_input_tokens"]
    assert metric(agent_server.url, "llamad_prompt_cache_tokens_total") - reused_before == final["cache_read_input_tokens"]
