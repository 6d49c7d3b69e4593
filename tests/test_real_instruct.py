"""Bring your own model: a real instruct GGUF with its own chat template (SmolLM2-135M-
Instruct, ChatML; `make test` fetches it and sets LLAMAD_TEST_INSTRUCT_MODEL), driven with
the official SDKs (openai, anthropic, ollama).

The server is configured with n_ctx 32768, past the 8,192 tokens SmolLM2 was trained on:
llamad caps it and /health says so; a prompt that does not fit is the documented 400.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import RunningServer, start_server

pytestmark = pytest.mark.real

INSTRUCT_MODEL = os.environ.get("LLAMAD_TEST_INSTRUCT_MODEL", "")
if not (INSTRUCT_MODEL and Path(INSTRUCT_MODEL).is_file()):
    pytestmark = [pytest.mark.real, pytest.mark.skip(reason="LLAMAD_TEST_INSTRUCT_MODEL is not set to SmolLM2-135M-Instruct (make test sets it)")]

SYSTEM = "You are a helpful assistant."
CAPITAL = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOML = "[model]\nn_ctx = 32768\n[server]\nparallel = 1\n"


@pytest.fixture(scope="module")
def instruct_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("instruct"), TOML, MODEL_PATH=INSTRUCT_MODEL) as server:
        yield server


def test_health_says_the_context_was_capped_and_the_template_is_the_gguf_s(instruct_server: RunningServer) -> None:
    info = httpx.get(instruct_server.url + "/health").json()["model_info"]
    assert info["chat_template"] == "gguf"
    assert info["n_ctx_train"] == 8192 and info["n_ctx"] == 8192
    assert "32768" in info["n_ctx_capped"]
    assert '"n_ctx_capped"' in instruct_server.log()  # and the log said it at load


def test_openai_sdk_answers_through_the_gguf_template(instruct_server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": CAPITAL}],
        max_tokens=40,
        temperature=0,
        # SmolLM2's template reads no switch: passing one changes nothing and breaks nothing.
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    choice = reply.choices[0]
    # The instruct model ends its turn with <|im_end|> from its own template.
    assert choice.finish_reason == "stop"
    assert "Paris" in (choice.message.content or "")


def test_openai_sdk_tool_call_and_result_round_trip(instruct_server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused")
    ask = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="smollm2", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    calls = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "get_weather"
    history = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C and sunny"},
    ]
    second = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens


def test_anthropic_sdk_answers(instruct_server: RunningServer) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=instruct_server.url, api_key="unused")
    message = client.messages.create(
        model="smollm2",
        max_tokens=40,
        system=SYSTEM,
        messages=[{"role": "user", "content": CAPITAL}],
        # Anthropic's own switch: SmolLM2's template has no reasoning, so it changes nothing.
        thinking={"type": "disabled"},
        extra_body={"temperature": 0},  # this SDK's create() takes no temperature argument
    )
    assert message.stop_reason == "end_turn"
    assert "Paris" in "".join(block.text for block in message.content if block.type == "text")


def test_anthropic_sdk_prompt_too_long(instruct_server: RunningServer) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=instruct_server.url, api_key="unused")
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="smollm2", max_tokens=10, messages=[{"role": "user", "content": "word " * 9000}])
    assert "prompt is too long" in str(caught.value)


def test_ollama_sdk_answers_with_think_off(instruct_server: RunningServer) -> None:
    import ollama

    client = ollama.Client(host=instruct_server.url)
    reply = client.chat(
        model="smollm2",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": CAPITAL}],
        think=False,
        options={"temperature": 0, "num_predict": 40},
    )
    assert reply.done_reason == "stop"
    assert "Paris" in reply.message.content


def test_openai_sdk_prompt_too_long(instruct_server: RunningServer) -> None:
    import openai

    client = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "word " * 9000}], max_tokens=5)
    assert caught.value.code == "context_length_exceeded" and "8192" in str(caught.value)


def test_llamad_check_prints_what_it_detected(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    config = tmp_path / "llamad.toml"
    config.write_text(TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMAD_", "MODEL_"))}
    env.update(MODEL_PATH=INSTRUCT_MODEL, LLAMAD_LOGGING_FORMAT="json", LLAMAD_CACHE_DIR=str(tmp_path / "kv"))
    done = subprocess.run(
        [sys.executable, "-m", "llamad.cli", "check", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(json.loads(x) for x in (done.stdout + done.stderr).splitlines() if '"check_ok"' in x)
    assert line["chat_template"] == "gguf" and line["gguf_template"].endswith("characters")
    assert line["tool_format"] == "hermes" and line["reasoning_markers"] is None
    assert line["n_ctx_train"] == 8192 and line["n_ctx"] == 8192 and "32768" in line["n_ctx_capped"]


@pytest.mark.timeout(300)
def test_claude_code_with_its_full_prompt_meets_the_documented_prompt_too_long(instruct_server: RunningServer, tmp_path: Path) -> None:
    """Claude Code's full first request (~12,400 tokens: its system prompt, every tool) does
    not fit SmolLM2's 8,192: llamad answers Anthropic's own `prompt is too long` wording, and
    Claude Code reacts as it does against Anthropic: it reports the sizes and exits 1."""
    import shutil
    import subprocess

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (make test-deps installs nodejs and npm)")
    from agents import claude_command, install_agents

    argv, environment = claude_command(install_agents(), instruct_server.url, tmp_path / "home", "Reply with the word OK.")
    (tmp_path / "project").mkdir()
    result = subprocess.run(argv, env=environment, cwd=tmp_path / "project", capture_output=True, text=True, timeout=240,
                            stdin=subprocess.DEVNULL)
    refused = [line for line in instruct_server.log().splitlines() if "prompt is too long" in line and '"status": 400' in line]
    report = f"exit {result.returncode}\nstdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-1500:]}"
    assert refused, report
    assert result.returncode == 1, report
    assert "Prompt is too long" in result.stdout and "limit 8191" in result.stdout, report


@pytest.mark.timeout(120)
def test_rope_scaling_lifts_the_trained_context_cap(tmp_path: Path) -> None:
    """model.rope_scaling = "linear" with rope_scale 2 lets SmolLM2 (trained on 8,192) have a
    16,384-token context, and llama.cpp's context runs with the positions scaled by 1/2;
    without it the same n_ctx is capped at 8,192."""
    import asyncio

    from llamad.config import load_config
    from llamad.engine.llama import LlamaEngine

    def loaded(**env: str) -> dict:
        environment = {"MODEL_PATH": INSTRUCT_MODEL, "LLAMAD_SERVER_PARALLEL": "1", "LLAMAD_MODEL_N_CTX": "16384", **env}
        config = load_config(tmp_path / "empty.toml", env=environment).config
        engine = LlamaEngine(config, Path(INSTRUCT_MODEL))
        try:
            asyncio.run(engine.load())
            return dict(engine.info)
        finally:
            engine.close()

    (tmp_path / "empty.toml").write_text("")
    plain = loaded()
    scaled = loaded(LLAMAD_MODEL_ROPE_SCALING="linear", LLAMAD_MODEL_ROPE_SCALE="2")
    assert plain["n_ctx"] == 8192 and "n_ctx_capped" in plain and plain["rope_freq_scale"] == 1.0
    assert scaled["n_ctx"] == 16384 and "n_ctx_capped" not in scaled and scaled["rope_freq_scale"] == 0.5
