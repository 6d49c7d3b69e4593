"""Real tier: Codex CLI (pinned, installed from npm by tests/agents.py) runs `codex exec`
against a real llamad on the demo model, over the Responses API, and exits 0 with an
answer.

Codex treats `response.incomplete` as a failed turn. With its full instructions, environment
preamble and shell tool (~6,300 tokens), the demo model (a 270M base model) writes one call or
echoed preamble line after another until the token limit (tried: `Incomplete response
returned, reason: max_output_tokens`, exit 1). So these runs use the README's small-model
profile (tests/agents.py `CODEX_SMALL_MODEL_FLAGS`: Codex's tools off, its instructions
replaced by one line, no environment or permissions preamble; the multi-agent namespace and
web_search stay in the request and llamad leaves them out of the prompt). Codex's full first
and second requests, with every tool, are replayed through the same route in the fast tier
(tests/test_responses_codex.py). Its later requests after tool calls (tests/data/captures/
codex/goal/: a goal output without a call_id, an image from view_image) are sent to a real
server here as Codex sent them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from agents import codex_small_model_command, install_agents
from conftest import start_server

pytestmark = pytest.mark.real

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["OK"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
# Codex sends no temperature, so the server's [sampling] default decides: greedy here, so
# that the run is the same every time (sampled, the demo model ends this turn in some tries,
# not all).
SERVER_TOML = """
[model]
n_ctx = 4096
[limits]
max_tokens_hard_cap = 256
default_max_tokens = 256
[sampling]
temperature = 0.0
"""


@pytest.fixture(scope="module")
def codex_agents():
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (make test-deps installs it)")
    return install_agents()


def run_codex(agents, tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    with start_server(tmp_path, toml=SERVER_TOML) as server:
        argv, environment = codex_small_model_command(agents, server.url, tmp_path / "home")
        config = Path(environment["CODEX_HOME"]) / "config.toml"
        # Fail fast: a test wants the first error, not five retries of it.
        config.write_text(config.read_text() + "request_max_retries = 0\nstream_max_retries = 0\n")
        argv = argv[:-1] + [*flags, argv[-1]]
        result = subprocess.run(
            argv, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=550, stdin=subprocess.DEVNULL
        )
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    served = [r for r in lines if r.get("event") == "request" and r.get("route") == "/v1/responses"]
    assert served and all(r["status"] == 200 for r in served), served
    assert result.returncode == 0, f"codex exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result, served


@pytest.mark.timeout(600)
def test_codex_exec_exits_0_with_the_models_own_answer(codex_agents, tmp_path: Path):
    result, served = run_codex(codex_agents, tmp_path)
    assert result.stdout.strip(), result.stderr[-4000:]
    # The model ended its turn itself (a `response.completed`, not `incomplete`).
    assert served[-1]["finish_reason"] == "stop", served


@pytest.mark.timeout(600)
def test_codex_exec_with_an_output_schema_gets_the_grammar_constrained_answer(codex_agents, tmp_path: Path):
    schema = tmp_path / "answer.schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA))
    result, _ = run_codex(codex_agents, tmp_path, "--output-schema", str(schema))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"answer": "OK"}


CAPTURES = Path(__file__).parent / "data" / "captures" / "codex"
# Codex's full prompt is some 6,500 of the demo model's tokens; a few answer tokens are
# enough to show the follow-up is served.
FOLLOW_UP_TOML = """
[model]
n_ctx = 16384
[server]
parallel = 1
[limits]
default_max_tokens = 16
"""


@pytest.mark.timeout(600)
@pytest.mark.parametrize("capture", ["goal/03_post_v1_responses.json", "goal/04_post_v1_responses.json"])
def test_a_real_server_serves_codex_follow_ups_after_tool_calls(tmp_path: Path, capture: str):
    body = json.loads((CAPTURES / capture).read_text())["body"]
    with start_server(tmp_path, toml=FOLLOW_UP_TOML) as server:
        response = httpx.post(server.url + "/v1/responses", json=body, timeout=280)
    assert response.status_code == 200, response.text
    events = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete"), events
