"""Real tier: the tool schemas real agents send are served, not refused, and the demo
model's constrained calls validate against them.

Claude Code 2.1.328 failed at its first request with `400 tool 'Workflow' parameters:
cannot be turned into a grammar`: its `args` property has only a description (any value).
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

pytestmark = pytest.mark.real

CAPTURE = Path(__file__).parent / "data" / "captures" / "claude_code" / "01_post_v1_messages.json"
ASK = [{"role": "user", "content": "Run the research workflow about llamas."}]
WORKFLOW_LIKE = {
    "name": "Workflow",
    "description": "Run a workflow script.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "name": {"description": "Name of a predefined workflow.", "type": "string", "maxLength": 24},
            "args": {"description": "Optional input value exposed to the script as the global `args`, verbatim."},
        },
        "required": ["args"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def anthropic_client(real_server):
    from anthropic import Anthropic

    return Anthropic(base_url=real_server, api_key="unused", max_retries=0, timeout=300)


def assert_valid_input(schema: dict, value: dict, cut_off: bool) -> None:
    """A complete call validates; one cut off by max_tokens holds only valid members."""
    if cut_off:
        schema = {k: v for k, v in schema.items() if k != "required"}
    jsonschema.validate(value, schema)


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "Workflow"}])
def test_a_property_with_only_a_description_is_served(anthropic_client, tool_choice):
    message = anthropic_client.messages.create(
        model="claude-local", max_tokens=64, messages=ASK, tools=[WORKFLOW_LIKE],
        tool_choice={**tool_choice, "disable_parallel_tool_use": True}, extra_body={"temperature": 0},
    )
    assert message.stop_reason in ("tool_use", "max_tokens")
    [block] = [b for b in message.content if b.type == "tool_use"]
    assert block.name == "Workflow"
    assert_valid_input(WORKFLOW_LIKE["input_schema"], block.input, cut_off=message.stop_reason == "max_tokens")


def test_claude_codes_own_tool_list_is_served_streamed(anthropic_client):
    """All twelve captured Claude Code tools, streamed, a call forced. The schemas are as
    sent except that every description is cut short, to keep the prompt (and the test) small."""
    captured = json.loads(CAPTURE.read_text())["body"]["tools"]
    tools = [_short_descriptions(t) for t in captured]
    schemas = {t["name"]: t["input_schema"] for t in tools}
    with anthropic_client.messages.stream(
        model="claude-local", max_tokens=64, messages=ASK, tools=tools,
        tool_choice={"type": "tool", "name": "Workflow", "disable_parallel_tool_use": True}, extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("tool_use", "max_tokens")
    [block] = [b for b in final.content if b.type == "tool_use"]
    assert block.name == "Workflow"
    assert_valid_input(schemas["Workflow"], block.input, cut_off=final.stop_reason == "max_tokens")


def _short_descriptions(value):
    if isinstance(value, dict):
        return {k: (v[:24] if k == "description" and isinstance(v, str) else _short_descriptions(v))
                for k, v in value.items()}
    return [_short_descriptions(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("stream", [False, True])
def test_a_const_with_a_form_feed_is_written_exactly(real_server, stream):
    """The stock converter wrote `\\f` raw into the grammar and llama.cpp refused it (a 400
    for a valid schema); now the JSON escape is in the grammar and the answer is exact."""
    from openai import OpenAI

    schema = {"type": "object", "properties": {"a": {"const": "x\fy"}}, "required": ["a"]}
    client = OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=300)
    request = dict(
        model="m", max_tokens=32, temperature=0, messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**request, stream=True)
                       if c.choices)
    else:
        text = client.chat.completions.create(**request).choices[0].message.content
    assert json.loads(text) == {"a": "x\fy"}
