"""Real tier: /v1/responses on the demo model in a real `llamad serve`, driven by the
official openai SDK (`client.responses.create`, `.stream`, `.retrieve`, `.delete`).

The demo model is a tiny base model that rarely stops by itself: where a test needs
`response.completed`, a grammar ends the answer (a forced tool call, or a JSON schema with
bounded values), so the test does not depend on what the model chooses to write."""

from __future__ import annotations

import json

import jsonschema
import openai
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
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": WEATHER_SCHEMA,
    "strict": True,
}
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "city": {"type": "string", "maxLength": 16}},
    "required": ["answer", "city"],
    "additionalProperties": False,
}
VERDICT_FORMAT = {"format": {"type": "json_schema", "name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}
QUESTION = "What is the weather in Paris right now?"


@pytest.fixture(scope="module")
def client(real_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_create_plain(client):
    response = client.responses.create(
        model="gpt-5", instructions="You are a poet.", input="Write a haiku about Jetson.", max_output_tokens=16
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == "llama-local"
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text.strip()
    assert response.output[0].type == "message" and response.output[0].id.startswith("msg_")
    assert 0 < response.usage.output_tokens <= 16
    assert response.usage.input_tokens > 10
    assert response.usage.output_tokens_details.reasoning_tokens == 0  # the demo model does not think


def test_stream_every_event_type_in_order(client):
    seen: list[str] = []
    numbers: list[int] = []
    with client.responses.stream(
        model="llama-local", input="Is Paris in France? Answer as JSON.", text=VERDICT_FORMAT, temperature=0
    ) as stream:
        for event in stream:
            seen.append(event.type)
            numbers.append(event.sequence_number)
        final = stream.get_final_response()  # raises unless the stream ended with response.completed
    assert numbers == sorted(set(numbers))
    deltas = seen.count("response.output_text.delta")
    assert deltas >= 1
    assert seen == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    jsonschema.validate(json.loads(final.output_text), VERDICT_SCHEMA)
    assert final.status == "completed" and final.usage.output_tokens > 0


def test_function_call_required_validates_streamed_and_not(client):
    response = client.responses.create(
        model="llama-local", input=QUESTION, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False
    )
    assert response.status == "completed"
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)

    kinds: list[str] = []
    with client.responses.stream(
        model="llama-local",
        input=QUESTION,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    ) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
    for item in final.output:
        if item.type == "function_call":
            jsonschema.validate(json.loads(item.arguments), WEATHER_SCHEMA)


def test_function_call_output_round_trip(client):
    first = client.responses.create(
        model="llama-local", input=QUESTION, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, store=False
    )
    call = next(item for item in first.output if item.type == "function_call")
    history = [
        {"role": "user", "content": QUESTION},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees celsius and sunny"},
    ]
    second = client.responses.create(model="llama-local", input=history, tools=[WEATHER], tool_choice="none", max_output_tokens=16)
    assert second.status in ("completed", "incomplete")
    assert second.output_text.strip()
    assert not [item for item in second.output if item.type == "function_call"]  # tool_choice none
    # The call and its result were in the prompt: it is longer than the question alone.
    alone = client.responses.create(model="llama-local", input=QUESTION, tools=[WEATHER], tool_choice="none", max_output_tokens=1)
    assert second.usage.input_tokens > alone.usage.input_tokens + 10


def test_previous_response_id_retrieve_and_delete(client):
    first = client.responses.create(model="llama-local", input="My name is Ada.", max_output_tokens=8, temperature=0)
    second = client.responses.create(
        model="llama-local", input="What is my name?", previous_response_id=first.id, max_output_tokens=8, temperature=0
    )
    assert second.previous_response_id == first.id
    # The second prompt holds the first turn and its answer.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    fetched = client.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="llama-local", input="again?", previous_response_id=first.id)
    assert "previous_response_id" in str(raised.value.body)
    not_kept = client.responses.create(model="llama-local", input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_kept.id)


def test_text_format_json_schema_validates(client):
    response = client.responses.create(
        model="llama-local", input="Is Paris in France? Answer as JSON.", text=VERDICT_FORMAT, temperature=0.7
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), VERDICT_SCHEMA)


def test_input_tokens_count_matches_the_prompt_of_the_response(client):
    """responses.input_tokens.count sees what the model would: instructions, tools and the
    previous_response_id history, rendered by the real chat template and tokenizer."""
    first = client.responses.create(model="llama-local", input="My name is Ada.", max_output_tokens=4, temperature=0)
    body = dict(input="What is my name?", instructions="Answer briefly.", tools=[WEATHER], previous_response_id=first.id)
    counted = client.responses.input_tokens.count(model="llama-local", **body)
    created = client.responses.create(model="llama-local", max_output_tokens=2, temperature=0, **body)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == created.usage.input_tokens
    bare = client.responses.input_tokens.count(model="llama-local", input="What is my name?")
    assert 0 < bare.input_tokens < counted.input_tokens
    too_long = client.responses.input_tokens.count(model="llama-local", input="word " * 40000)
    assert too_long.input_tokens > 40000  # past the context: still a count, not an error
    with pytest.raises(openai.BadRequestError):
        client.responses.input_tokens.count(model="llama-local", input=[{"role": "robot", "content": "x"}])


def test_input_items_list_through_the_sdk(client):
    first = client.responses.create(model="llama-local", input="My name is Ada.", max_output_tokens=4, temperature=0)
    second = client.responses.create(
        model="llama-local",
        input=[{"role": "user", "content": "What is my name?"}],
        previous_response_id=first.id,
        max_output_tokens=4,
        temperature=0,
    )
    newest_first = client.responses.input_items.list(second.id)
    # The demo model may end its turn at once (an empty answer has no output item).
    answer = [item.id for item in reversed(first.output)]
    assert [item.type for item in newest_first.data] == ["message"] + [o.type for o in reversed(first.output)] + ["message"]
    assert newest_first.data[0].content[0].text == "What is my name?"
    assert [item.id for item in newest_first.data[1:-1]] == answer  # the first answer, as it was given back
    assert newest_first.data[-1].content[0].text == "My name is Ada."
    paged = list(client.responses.input_items.list(second.id, order="asc", limit=1))  # follows `after`
    assert [item.id for item in paged] == [item.id for item in reversed(newest_first.data)]
    not_kept = client.responses.create(model="llama-local", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(not_kept.id)
