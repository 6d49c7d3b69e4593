"""Real tier: Codex CLI (pinned, installed from npm by tests/agents.py) runs `codex exec`
against a real llamad on the demo model, over the Responses API, and exits 0 with an
answer.

Codex treats `response.incomplete` as a failed turn, and the demo model (a tiny base model)
rarely stops by itself: given Codex's shell tool it writes one call after another until the
token limit (tried: six `exec_command` calls, then `Incomplete response returned, reason:
max_output_tokens`, exit 1; with only `request_user_input` left, the same with that tool).
So this run turns off the Codex tools (shell, unified exec, view_image, goals,
request_user_input; the multi-agent namespace and web_search stay in the request and
llamad leaves them out of the prompt) and asks for a structured answer (`--output-schema`,
sent as `text.format` json_schema), which the grammar ends. Codex's full first and second
requests, with every tool, are replayed through the same route in the fast tier
(tests/test_responses_codex.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agents import codex_command, install_agents
from conftest import start_server

pytestmark = pytest.mark.real

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["OK"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
TOOLS_OFF = [
    "-c", "features.shell_tool=false",
    "-c", "features.unified_exec=false",
    "-c", "features.view_image=false",
    "-c", "features.goals=false",
    "-c", "tools.experimental_request_user_input={enabled=false}",
]  # fmt: skip
# Codex's first request is some 6,300 tokens (instructions and tools) on the demo model.
SERVER_TOML = """
[model]
n_ctx = 16384
[limits]
max_tokens_hard_cap = 256
default_max_tokens = 256
"""


@pytest.fixture(scope="module")
def codex_agents():
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (make test-deps installs it)")
    return install_agents()


# Codex's first prompt is ~6,300 tokens on the demo model: seconds on an idle CPU, but
# more than ten minutes on a 2-core machine shared with other work.
@pytest.mark.timeout(1800)
def test_codex_exec_answers_through_the_responses_api(codex_agents, tmp_path: Path):
    schema = tmp_path / "answer.schema.json"
    schema.write_text(json.dumps(ANSWER_SCHEMA))
    with start_server(tmp_path, toml=SERVER_TOML) as server:
        argv, environment = codex_command(codex_agents, server.url, tmp_path / "home")
        config = Path(environment["CODEX_HOME"]) / "config.toml"
        # Fail fast: a test wants the first error, not five retries of it.
        config.write_text(config.read_text() + "request_max_retries = 0\nstream_max_retries = 0\n")
        argv = argv[:-1] + [*TOOLS_OFF, "--output-schema", str(schema), argv[-1]]
        result = subprocess.run(argv, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=1700)
        log = server.log()
    assert result.returncode == 0, f"codex exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"answer": "OK"}
    requests = [json.loads(line) for line in log.splitlines() if '"route": "/v1/responses"' in line or '"route":"/v1/responses"' in line]
    assert requests and all(r["status"] == 200 for r in requests), log[-4000:]
