"""Several models on one board, real tier: two different GGUFs (the demo Gemma 3 270M base
model and SmolLM2-135M-Instruct) behind one real `llamad serve`, driven with the official
openai SDK and the ollama client; eviction under a budget that holds one of them; Ollama's
keep_alive idioms; a bad model file beside good ones; a reload that removes a busy model;
Claude Code sending its background calls to the small model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from conftest import TEST_MODEL, start_server

INSTRUCT_MODEL = os.environ.get("LLAMAD_TEST_INSTRUCT_MODEL", "")
pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]
if not (INSTRUCT_MODEL and Path(INSTRUCT_MODEL).is_file()):
    pytestmark.append(pytest.mark.skip(reason="LLAMAD_TEST_INSTRUCT_MODEL is not set (make test sets it)"))

GREEDY = {"temperature": 0.0}


def two_model_toml(extra: str = "", router: str = "", small: str = "") -> str:
    return f"""
[model]
n_ctx = 1024
[server]
parallel = 1
[router]
keep_alive = "10m"
{router}
[models.gemma]
path = "{TEST_MODEL}"
default = true
aliases = ["claude-*", "gpt-*"]
[models.smol]
path = "{INSTRUCT_MODEL}"
aliases = ["claude-*haiku*"]
{small}
{extra}"""


def events(log: str, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def test_two_models_answer_concurrently_each_under_its_own_name(tmp_path):
    with start_server(tmp_path, two_model_toml()) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
        answers: dict[str, Any] = {}

        def ask(model: str) -> None:
            answers[model] = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, **GREEDY
            )

        threads = [threading.Thread(target=ask, args=(m,)) for m in ("gemma", "smol", "gpt-4o")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=200)
        listed = [m.id for m in client.models.list().data]
        running = {m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]}
        log = server.log()
    assert answers["smol"].model == "smol" and answers["gemma"].model == answers["gpt-4o"].model == "gemma"
    assert all(a.choices[0].message.content is not None for a in answers.values())
    assert listed == ["gemma", "smol"] and running == {"gemma:latest", "smol:latest"}
    served = {r["model"] for r in events(log, "request") if r.get("route") == "/v1/chat/completions"}
    assert served == {"gemma", "smol"}
    [loaded] = [e for e in events(log, "model_loaded") if e.get("model") == "smol"]
    assert loaded["reason"] == "request" and loaded["memory_bytes"] > 98_000_000


def test_a_budget_for_one_model_switches_them_and_the_journal_says_why(tmp_path):
    # gemma (~330 MB with its KV) and smol (~175 MB) each fit in 400 MB; both do not.
    with start_server(tmp_path, two_model_toml(router='memory_budget = "400M"')) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
        for model in ("smol", "gemma", "smol"):
            answer = client.completions.create(model=model, prompt="Once upon a time", max_tokens=4, **GREEDY)
            assert answer.model == model
            running = [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]
            assert running == [f"{model}:latest"]
        metrics = httpx.get(server.url + "/metrics").text
        log = server.log()
    unloads = [(e["model"], e["reason"], e.get("for_model")) for e in events(log, "model_unloaded")]
    assert unloads == [("gemma", "room", "smol"), ("smol", "room", "gemma"), ("gemma", "room", "smol")]
    assert 'llamad_model_unloads_total{model="gemma",reason="room"} 2' in metrics
    assert 'llamad_model_loads_total{model="smol"} 2' in metrics


def test_the_ollama_client_lists_shows_loads_and_unloads(tmp_path):
    with start_server(tmp_path, two_model_toml()) as server:
        client = ollama.Client(host=server.url, timeout=120)
        listed = {m.model: m for m in client.list().models}
        before = [m.model for m in client.ps().models]
        shown = client.show("smol")  # not loaded: read from the file
        loaded = client.generate(model="smol", keep_alive="2s")  # Ollama's load idiom
        after = {m.model: m for m in client.ps().models}
        answer = client.chat(model="smol", messages=[{"role": "user", "content": "Hi"}], options={**GREEDY, "num_predict": 8},
                             keep_alive=0)
        time.sleep(1.0)
        unloaded_after_answer = [m.model for m in client.ps().models]
        client.generate(model="smol", keep_alive="1s")
        time.sleep(2.0)
        expired = [m.model for m in client.ps().models]
        log = server.log()
    assert set(listed) == {"gemma:latest", "smol:latest"} and listed["smol:latest"].details.family == "llama"
    assert before == ["gemma:latest"]
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 8192
    assert loaded.done_reason == "load" and set(after) == {"gemma:latest", "smol:latest"}
    assert after["smol:latest"].expires_at is not None and after["smol:latest"].expires_at.year < 9999
    assert answer.message.content is not None
    assert unloaded_after_answer == ["gemma:latest"] and expired == ["gemma:latest"]
    reasons = [e["reason"] for e in events(log, "model_unloaded") if e.get("model") == "smol"]
    assert reasons == ["request", "keep_alive"]


def test_a_bad_model_file_is_named_and_the_others_serve(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))
    with start_server(tmp_path, two_model_toml(f'[models.broken]\npath = "{broken}"\n')) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        fine = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        health = httpx.get(server.url + "/health")
    assert failed.value.status_code == 503 and "model 'broken' could not be loaded" in str(failed.value)
    assert fine.model == "smol"
    assert health.status_code == 200
    assert {m["model"]: m["state"] for m in health.json()["models"]}["broken"] == "failed"


def test_a_reload_that_removes_a_busy_model_lets_its_stream_finish(tmp_path):
    toml = two_model_toml(small="temperature = 0.8")
    with start_server(tmp_path, toml) as server:
        config = next(tmp_path.glob("llamad-*.toml"))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=200, max_retries=0)
        pieces: list[str] = []
        finished: list[str | None] = []

        def stream() -> None:
            chunks = client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Tell a long story about a lighthouse."}],
                max_tokens=160, stream=True, extra_body={"ignore_eos": True},
            )
            for chunk in chunks:
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                    if chunk.choices[0].finish_reason:
                        finished.append(chunk.choices[0].finish_reason)

        thread = threading.Thread(target=stream)
        thread.start()
        deadline = time.monotonic() + 60
        while len(pieces) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        config.write_text(toml.split("[models.smol]")[0])  # smol taken out of the set
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not events(server.log(), "reload_applied") and time.monotonic() < deadline:
            time.sleep(0.1)
        listed = [m.id for m in client.models.list().data]
        thread.join(timeout=200)
        time.sleep(0.5)
        log = server.log()
    assert listed == ["gemma"]
    assert finished == ["length"] and len(pieces) > 100  # the whole answer, after the reload
    [applied] = events(log, "reload_applied")
    assert applied["removed"] == ["smol"]
    [unloaded] = [e for e in events(log, "model_unloaded") if e.get("model") == "smol"]
    assert unloaded["reason"] == "reload"
    request = [r for r in events(log, "request") if r.get("model") == "smol"][-1]
    assert request["status"] == 200 and request["completion_tokens"] == 160


@pytest.mark.timeout(300)
def test_claude_codes_background_calls_reach_the_small_model(tmp_path):
    """Claude Code sends its background work (here: the session title it asks for after the
    first answer) to ANTHROPIC_SMALL_FAST_MODEL. `claude -p` makes no such call, so Claude
    Code runs interactively, on a pseudo-terminal, and is stopped once the title came."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (make test-deps installs nodejs and npm)")
    import pty
    import select

    from agents import claude_command, install_agents

    agents = install_agents()
    toml = two_model_toml() + "[limits]\nmax_tokens_hard_cap = 64\n[sampling]\ntemperature = 0.0\n"
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    (tmp_path / "server").mkdir()
    with start_server(tmp_path / "server", toml.replace("n_ctx = 1024", "n_ctx = 8192")) as server:
        argv, environment = claude_command(
            agents, server.url, home, "",
            extra={"ANTHROPIC_API_KEY": "dummy", "ANTHROPIC_SMALL_FAST_MODEL": "smol", "ANTHROPIC_DEFAULT_HAIKU_MODEL": "smol"},
        )
        environment.pop("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")  # the title is "nonessential"
        # First-run dialogs answered in advance: onboarding done, this folder trusted, the key approved.
        (home / ".claude.json").write_text(json.dumps({
            "hasCompletedOnboarding": True,
            "projects": {str(project): {"hasTrustDialogAccepted": True}},
            "customApiKeyResponses": {"approved": ["dummy"], "rejected": []},
        }))
        interactive = [argv[0], "--tools", "", "--system-prompt", "Answer in one short sentence."]
        pid, terminal = pty.fork()
        if pid == 0:  # the child: Claude Code on the pseudo-terminal
            os.chdir(project)
            os.execve(interactive[0], interactive, environment)
        screen = b""

        def read_for(seconds: float, until=lambda: False) -> None:
            nonlocal screen
            end = time.monotonic() + seconds
            while time.monotonic() < end and not until():
                ready, _, _ = select.select([terminal], [], [], 0.2)
                if ready:
                    try:
                        screen += os.read(terminal, 65536)
                    except OSError:
                        return

        def served() -> list[tuple[str | None, int]]:
            return [(r.get("model"), r["status"]) for r in events(server.log(), "request") if r.get("route") == "/v1/messages"]

        try:
            read_for(8)  # Claude Code draws its prompt
            os.write(terminal, b"Say OK please\r")
            read_for(150, until=lambda: ("smol", 200) in served())
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(terminal)
        requests = served()
    report = f"served: {requests}\nscreen: {screen[-1500:].decode(errors='replace')}"
    assert ("gemma", 200) in requests, report  # the turn itself, on the main model
    assert ("smol", 200) in requests, report  # the background call, routed by its model name


def test_a_hang_up_while_a_model_loads_frees_the_request_and_the_load_goes_on(tmp_path):
    # "big" is the demo model again under another name: not loaded, and its load (~0.6 s
    # here) outlasts the client's patience (0.25 s), which outlasts sending the request.
    toml = two_model_toml(f'[models.big]\npath = "{TEST_MODEL}"\n')
    with start_server(tmp_path, toml) as server:
        with pytest.raises(httpx.TimeoutException):  # the client gives up while big loads
            httpx.post(server.url + "/v1/chat/completions", timeout=0.25,
                       json={"model": "big", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        deadline = time.monotonic() + 30
        running: list[str] = []
        while time.monotonic() < deadline and "big:latest" not in running:
            running = [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]
            time.sleep(0.1)
        time.sleep(0.5)
        metrics = httpx.get(server.url + "/metrics").text
        after = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"model": "big", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        log = server.log()
    assert "big:latest" in running  # loaded although its requester left
    assert 'route="/v1/chat/completions",status="499"' in metrics
    assert after.status_code == 200 and after.json()["model"] == "big"
    [loaded] = [e for e in events(log, "model_loaded") if e.get("model") == "big"]  # once: the next request found it loaded
    # The request ended at the hang-up, before its prompt reached the model.
    gone = [r for r in events(log, "request") if r.get("status") == 499]
    assert len(gone) == 1 and gone[0]["model"] == "big" and "prompt_tokens" not in gone[0], log[-6000:]
