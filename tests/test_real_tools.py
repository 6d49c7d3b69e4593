"""Real tier: tool calls and structured output from the demo model through the official
SDKs. The demo model is a tiny base model; what is checked is what the grammar
guarantees: every call names an offered tool and its arguments validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.real

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}}, "required": ["zone"]}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a time zone", "parameters": TIME_SCHEMA}},
]
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in OPENAI_TOOLS]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
QUESTION = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def openai_client(real_server):
    from openai import OpenAI

    return OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def anthropic_client(real_server):
    from anthropic import Anthropic

    return Anthropic(base_url=real_server, api_key="unused", max_retries=0, timeout=300)


def assert_valid_call(name: str, arguments: dict, cut_off: bool = False) -> None:
    """A complete call validates against its tool's schema. A call cut off by max_tokens
    holds only members the model wrote, each valid, but may lack required ones."""
    assert name in SCHEMAS
    schema = SCHEMAS[name]
    if cut_off:
        schema = {k: v for k, v in schema.items() if k != "required"}
    jsonschema.validate(arguments, schema)


def test_openai_required_call_validates(openai_client):
    response = openai_client.chat.completions.create(
        model="llama-local", messages=QUESTION, tools=OPENAI_TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=64, temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert_valid_call(call.function.name, json.loads(call.function.arguments))


def test_openai_named_tool_streamed(openai_client):
    stream = openai_client.chat.completions.create(
        model="llama-local", messages=QUESTION, tools=OPENAI_TOOLS, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, max_tokens=64, temperature=0,
    )
    calls: dict[int, dict] = {}
    finish = None
    argument_chunks = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for part in choice.delta.tool_calls or []:
            if part.index not in calls:
                assert part.id.startswith("call_") and part.function.name == "get_time"
                assert part.function.arguments == ""
                calls[part.index] = {"name": part.function.name, "arguments": ""}
            else:
                assert part.id is None and part.function.name is None
                calls[part.index]["arguments"] += part.function.arguments
                argument_chunks += 1
    assert finish == "tool_calls" and list(calls) == [0]
    assert argument_chunks > 1, "arguments should arrive in pieces"
    assert_valid_call(calls[0]["name"], json.loads(calls[0]["arguments"]))


def test_openai_parallel_calls_all_parse_even_when_cut_off(openai_client):
    response = openai_client.chat.completions.create(
        model="llama-local", messages=QUESTION, tools=OPENAI_TOOLS, tool_choice="required", max_tokens=48,
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    calls = choice.message.tool_calls
    assert calls
    cut_off = choice.finish_reason == "length"
    for i, call in enumerate(calls):
        # Even a call cut off by max_tokens is closed: its arguments parse.
        arguments = json.loads(call.function.arguments)
        assert_valid_call(call.function.name, arguments, cut_off=cut_off and i == len(calls) - 1)


def test_openai_auto_answers_text_or_valid_calls(openai_client):
    response = openai_client.chat.completions.create(
        model="llama-local", messages=QUESTION, tools=OPENAI_TOOLS, max_tokens=32,
    )
    choice = response.choices[0]
    for call in choice.message.tool_calls or []:
        json.loads(call.function.arguments)
    assert choice.message.content or choice.message.tool_calls


def test_openai_response_format_json_schema_validates(openai_client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                       "role": {"type": "string", "enum": ["admin", "user"]}},
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    }
    response = openai_client.chat.completions.create(
        model="llama-local", max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Describe the user Ada, aged 36, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    answer = json.loads(response.choices[0].message.content)
    jsonschema.validate(answer, {**schema, "properties": {**schema["properties"], "age": {"type": "integer"}}})


def test_anthropic_any_tool_use_and_stream(anthropic_client):
    message = anthropic_client.messages.create(
        model="llama-local", max_tokens=64, messages=QUESTION, tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert message.stop_reason == "tool_use"
    [block] = [b for b in message.content if b.type == "tool_use"]
    assert block.id.startswith("toolu_")
    assert_valid_call(block.name, block.input)

    with anthropic_client.messages.stream(
        model="llama-local", max_tokens=64, messages=QUESTION, tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [block] = [b for b in final.content if b.type == "tool_use"]
    assert block.name == "get_weather" and block.id.startswith("toolu_")
    assert_valid_call(block.name, block.input)


def test_anthropic_tool_result_round_trip(anthropic_client):
    messages = QUESTION + [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 degrees, sunny"}]},
    ]
    message = anthropic_client.messages.create(
        model="llama-local", max_tokens=24, messages=messages, tools=ANTHROPIC_TOOLS,
    )
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
    uses = [b for b in message.content if b.type == "tool_use"]
    for i, block in enumerate(uses):
        assert_valid_call(block.name, block.input, cut_off=message.stop_reason == "max_tokens" and i == len(uses) - 1)
