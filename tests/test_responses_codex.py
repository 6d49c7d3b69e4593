"""Codex CLI 0.171's real requests (captured by tests/agents.py, kept in
tests/data/captures/codex/) replayed through /v1/responses with the fake engine: both turns
are served as a stream in the order Codex reads, its function tools reach the prompt, and
the tool types it sends that llamad cannot run (namespace, web_search) are left out.

tests/data/captures/codex/goal/ holds later requests of one longer `codex exec` session
(full prompt and tools), recorded with a scripted fake engine behind llamad's own app: the
model read notes.txt with exec_command, then called create_goal, then view_image on a PNG.
Codex answers create_goal with its output and then an output of its own that answers no
call (`name: "goal_objective"`, `namespace: "agent"`, no `call_id`): issue 19's 400."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_engine import FakeEngine, pieces
from test_responses import assert_well_formed, sse

pytestmark = pytest.mark.asyncio

CAPTURES = Path(__file__).parent / "data" / "captures" / "codex"
CALL = '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "cat notes.txt"}}\n</tool_call>'


def captured(name: str) -> dict:
    return json.loads((CAPTURES / name).read_text())["body"]


def engine_for_codex() -> FakeEngine:
    """A call to Codex's shell tool on the first turn, then the answer "OK"."""

    def script(generation):
        if "<tool_response" in generation.prompt.text:
            return ["O", "K"]
        return pieces(CALL, 7)

    # The fake counts words as tokens; Codex's first request is some 7,000 of them.
    return FakeEngine(script=script, n_ctx=65536)


async def test_codex_first_turn_streams_a_function_call_in_order(make_client):
    body = captured("01_post_v1_responses.json")
    assert body["stream"] is True and body["store"] is False
    engine = engine_for_codex()
    async with make_client(engine) as client:
        response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    events = sse(response.text)
    assert_well_formed(events)
    kinds = [k for k, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * kinds.count("response.function_call_arguments.delta"),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    call = events[-2][1]["item"]
    assert call["type"] == "function_call" and call["name"] == "exec_command"
    assert json.loads(call["arguments"]) == {"cmd": "cat notes.txt"}
    usage = events[-1][1]["response"]["usage"]
    assert usage["input_tokens"] > 1000 and usage["output_tokens"] == len(pieces(CALL, 7))

    prompt = engine.generations[0].prompt.text
    assert "You are a coding agent running in the Codex CLI" in prompt  # developer message
    assert "Reply with the word OK." in prompt
    for name in ("exec_command", "write_stdin", "view_image", "update_goal"):
        assert f'"name": "{name}"' in prompt  # function tools are offered
    assert "close_agent" not in prompt  # inside the namespace tool: left out
    assert '"web_search"' not in prompt


async def test_codex_second_turn_with_the_tool_output_answers_in_text(make_client):
    body = captured("02_post_v1_responses.json")
    engine = engine_for_codex()
    async with make_client(engine) as client:
        response = await client.post("/v1/responses", json=body)
        stored = await client.get(f"/v1/responses/{sse(response.text)[0][1]['response']['id']}")
    events = sse(response.text)
    assert_well_formed(events)
    assert [k for k, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-2][1]["item"]["content"][0]["text"] == "OK"
    prompt = engine.generations[0].prompt.text
    assert '"cmd": "cat notes.txt"' in prompt and '<tool_response name="exec_command">' in prompt
    assert stored.status_code == 404  # Codex sends store: false


async def test_codex_goal_objective_output_without_a_call_id_reaches_the_prompt(make_client):
    body = captured("goal/03_post_v1_responses.json")
    goal = body["input"][-1]
    assert goal["type"] == "function_call_output" and "call_id" not in goal  # as Codex sent it
    engine = engine_for_codex()
    async with make_client(engine) as client:
        response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    events = sse(response.text)
    assert_well_formed(events)
    assert events[-2][1]["item"]["content"][0]["text"] == "OK"
    prompt = engine.generations[0].prompt.text
    # Each call is followed by its own output, paired by call_id; the goal comes after them.
    read = prompt.index('"cmd": "cat notes.txt"')
    notes = prompt.index('<tool_response name="exec_command">', read)
    assert "The answer is OK." in prompt[notes : prompt.index("</tool_response>", notes)]
    created = prompt.index('<tool_response name="create_goal">', prompt.index('"name": "create_goal"', notes))
    objective = prompt.index('<tool_response name="goal_objective">\nReply with the word OK.\n</tool_response>')
    assert created < objective


async def test_codex_view_image_output_is_named_in_the_prompt_not_refused(make_client):
    body = captured("goal/04_post_v1_responses.json")
    assert body["input"][-1]["output"][0]["type"] == "input_image"  # view_image's answer
    engine = engine_for_codex()
    async with make_client(engine) as client:
        response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    prompt = engine.generations[0].prompt.text
    viewed = prompt.index('<tool_response name="view_image">', prompt.index('"name": "view_image", "arguments": {"path"'))
    assert prompt[viewed:].startswith('<tool_response name="view_image">\n[input_image left out: this model reads text only]\n')
    assert "base64" not in prompt

