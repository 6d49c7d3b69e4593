"""Fields and settings that must do what they say, and input that must be refused, through
the real ASGI stack with a fake engine: message content, `json_schema.strict`,
`logging.log_content`, and the Anthropic routes being part of every app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


@pytest.mark.parametrize("role", ["user", "system", "developer", "tool"])
async def test_openai_message_without_content_is_a_400_naming_it(make_client, role):
    messages = [{"role": "user", "content": "Hi"}, {"role": role}]
    if role == "tool":
        messages = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1"},
        ]
    async with make_client() as client:
        response = await client.post(CHAT, json={"messages": messages})
        explicit_null = await client.post(CHAT, json={"messages": [{"role": role, "content": None}]})
    index = len(messages) - 1
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == f"messages[{index}].content"
    assert f"messages[{index}] has no 'content'" in error["message"] and role in error["message"]
    assert explicit_null.status_code == 400


async def test_openai_assistant_may_leave_out_content_only_with_tool_calls(make_client):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_calls = [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    without = [{"role": "user", "content": "Hi"}, {"role": "assistant"}, {"role": "user", "content": "Well?"}]
    async with make_client() as client:
        served = await client.post(CHAT, json={"messages": with_calls})
        refused = await client.post(CHAT, json={"messages": without})
    assert served.status_code == 200, served.text
    assert refused.status_code == 400
    assert "only when it carries tool_calls" in refused.json()["error"]["message"]


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None}])
async def test_anthropic_message_without_content_is_a_400_naming_it(make_client, message):
    async with make_client() as client:
        response = await client.post(MESSAGES, json={"model": "m", "max_tokens": 8, "messages": [message]})
        counted = await client.post(MESSAGES + "/count_tokens", json={"model": "m", "messages": [message]})
    for answer in (response, counted):
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "messages[0] has no 'content'" in body["error"]["message"]


def schema_format(strict: bool | None) -> dict:
    # uniqueItems: no grammar can enforce it (the items seen so far would have to be remembered).
    tags = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    spec = {"name": "tags", "schema": {"type": "object", "properties": {"tags": tags}, "required": ["tags"]}}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


async def test_strict_json_schema_refuses_a_keyword_the_grammar_cannot_enforce(make_client):
    engine = FakeEngine(script=lambda g: ['{"tags": ["a", "b"]}'])
    async with make_client(engine) as client:
        strict = await client.post(CHAT, json={"messages": [{"role": "user", "content": "Tags?"}],
                                               "response_format": schema_format(True)})
        loose = [
            await client.post(CHAT, json={"messages": [{"role": "user", "content": "Tags?"}],
                                          "response_format": schema_format(flag)})
            for flag in (False, None)
        ]
    assert strict.status_code == 400, strict.text
    error = strict.json()["error"]
    assert "uniqueItems" in error["message"] and error["param"] == "response_format"
    for response in loose:  # not strict: served, the keyword is advice to the model
        assert response.status_code == 200, response.text
        assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"tags": ["a", "b"]}
    assert len(engine.generations) == 2 and all(g.grammar for g in engine.generations)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_log_content_puts_prompt_and_completion_in_the_request_line(make_client, path, stream):
    body = {"model": "m", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "A secret question about llamas"}]}
    for setting in ("true", "false"):
        async with make_client(LLAMAD_LOGGING_LOG_CONTENT=setting) as client:
            with capture_logs() as logs:
                response = await client.post(path, json=body)
        assert response.status_code == 200
        [line] = [e for e in logs if e["event"] == "request"]
        if setting == "true":
            assert "A secret question about llamas" in line["prompt"]
            assert line["completion"] == "Hello from the fake model."
        else:
            assert "prompt" not in line and "completion" not in line
            assert "secret question" not in repr(logs)


def test_an_app_without_the_anthropic_routes_does_not_start():
    """If llamad.api.anthropic.messages cannot be imported, building the app fails loudly instead of
    serving without the Anthropic routes."""
    code = (
        "import sys; sys.modules['llamad.api.anthropic.messages'] = None\n"
        "from llamad.app import create_app\n"
        "from llamad.config import Config\n"
        "create_app(Config(), None)\n"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode != 0
    assert "llamad.api.anthropic.messages" in result.stderr
