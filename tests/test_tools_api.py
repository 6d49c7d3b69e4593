"""Tool calling through both API families (real ASGI stack, fake engine): the wire shapes,
stream and non-stream agreeing, history repair and the 400s."""

from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine, pieces

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
TWO_CALLS = CALL_TEXT + "\n" + CALL_TEXT.replace("Paris", "Oslo")


def scripted(text: str, size: int = 3) -> FakeEngine:
    return FakeEngine(script=lambda generation: pieces(text, size))


def openai_body(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": OPENAI_TOOLS, **extra}


def anthropic_body(**extra) -> dict:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": ANTHROPIC_TOOLS, **extra}


def sse_data(body: str) -> list[dict]:
    out = []
    for frame in body.split("\n\n"):
        for line in frame.split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[len("data: "):]))
    return out


# -- OpenAI -----------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_openai_required_call_non_stream(make_client, choice):
    engine = scripted(CALL_TEXT)
    async with make_client(engine) as client:
        response = await client.post(CHAT, json=openai_body(tool_choice=choice))
    assert response.status_code == 200, response.text
    choice0 = response.json()["choices"][0]
    assert choice0["finish_reason"] == "tool_calls"
    message = choice0["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and len(call["id"]) == 29 and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    generation = engine.generations[0]
    assert generation.grammar and 'get_weather' in generation.grammar
    assert "<tools>" in generation.prompt.text and "You must call" in generation.prompt.text


async def test_openai_stream_tool_call_chunks_and_same_calls_as_non_stream(make_client):
    async with make_client(scripted(TWO_CALLS, size=4)) as client:
        plain = (await client.post(CHAT, json=openai_body(tool_choice="required"))).json()
        response = await client.post(CHAT, json=openai_body(tool_choice="required", stream=True))
    chunks = sse_data(response.text)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.get("tool_calls") or []:
            if part["index"] not in calls:
                # the first chunk of a call: id, type, name and empty arguments
                assert part["id"].startswith("call_") and part["type"] == "function"
                assert part["function"] == {"name": "get_weather", "arguments": ""}
                calls[part["index"]] = {"id": part["id"], "name": part["function"]["name"], "arguments": ""}
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                calls[part["index"]]["arguments"] += part["function"]["arguments"]
    assert len([d for d in deltas if d.get("tool_calls")]) > 3, "arguments should stream in pieces"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    streamed = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    folded = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in plain["choices"][0]["message"]["tool_calls"]]
    assert streamed == folded == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_weather", {"city": "Oslo", "unit": "c"})]


async def test_openai_auto_text_answer_and_lookalike_call_stay_text(make_client):
    lookalike = '<tool_call>\n{"name": "format_disk", "arguments": {}}\n</tool_call>'
    for text in ("It is sunny.", lookalike):
        async with make_client(scripted(text)) as client:
            body = (await client.post(CHAT, json=openai_body())).json()
        choice = body["choices"][0]
        assert choice["message"]["content"] == text and not choice["message"].get("tool_calls")
        assert choice["finish_reason"] == "stop"


async def test_openai_tool_choice_none_has_no_grammar_and_no_tool_prompt(make_client):
    engine = scripted("Fine.")
    async with make_client(engine) as client:
        response = await client.post(CHAT, json=openai_body(tool_choice="none"))
    assert response.status_code == 200
    assert engine.generations[0].grammar is None and "<tools>" not in engine.generations[0].prompt.text


async def test_openai_history_with_calls_results_and_repairs(make_client):
    engine = scripted("It is 18C in Paris.")
    history = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}},
            {"id": "call_2", "type": "function", "function": {"name": "old_tool", "arguments": "not json at all"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "?"},
    ]
    async with make_client(engine) as client:
        response = await client.post(CHAT, json=openai_body(messages=history))
    assert response.status_code == 200, response.text
    prompt = engine.generations[0].prompt.text
    assert '{"name": "get_weather", "arguments": {"city": "Par"}}' in prompt  # cut-off JSON closed
    assert "not json at all" in prompt  # kept as text, not dropped
    assert "<tool_response>\n18C\n</tool_response>" in prompt


async def test_openai_tool_result_without_a_call_is_a_400_naming_it(make_client):
    history = [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_zzz", "content": "18C"}]
    async with make_client() as client:
        response = await client.post(CHAT, json=openai_body(messages=history))
    assert response.status_code == 400
    error = response.json()["error"]
    assert "messages[1]" in error["message"] and "call_zzz" in error["message"]


async def test_openai_schema_that_cannot_be_a_grammar_is_a_400(make_client):
    tools = [{"type": "function", "function": {"name": "bad", "parameters": {"type": "object", "properties": {"d": {"type": "date"}}}}}]
    async with make_client() as client:
        response = await client.post(CHAT, json=openai_body(tools=tools, tool_choice="required"))
    assert response.status_code == 400
    assert "tool 'bad' parameters.properties.d.type" in response.json()["error"]["message"]


async def test_openai_response_format_json_schema(make_client):
    engine = scripted('{"name": "Ada", "age": 36}')
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    async with make_client(engine) as client:
        response = await client.post(CHAT, json={"model": "m", "messages": [{"role": "user", "content": "Ada?"}], "response_format": fmt})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"]) == {"name": "Ada", "age": 36}
    assert 'age-kv' in engine.generations[0].grammar


# -- Anthropic --------------------------------------------------------------------------
async def test_anthropic_any_tool_use_non_stream_and_stream_agree(make_client):
    async with make_client(scripted(CALL_TEXT, size=5)) as client:
        plain = await client.post(MESSAGES, json=anthropic_body(tool_choice={"type": "any"}))
        streamed = await client.post(MESSAGES, json=anthropic_body(tool_choice={"type": "any"}, stream=True))
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["stop_reason"] == "tool_use"
    [block] = [b for b in body["content"] if b["type"] == "tool_use"]
    assert block["id"].startswith("toolu_") and block["name"] == "get_weather"
    assert block["input"] == {"city": "Paris", "unit": "c"}

    events = sse_data(streamed.text)
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    start = starts[0]["content_block"]
    assert start["input"] == {} and start["id"].startswith("toolu_") and start["name"] == "get_weather"
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == block["input"]
    [delta] = [e for e in events if e["type"] == "message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use"


async def test_anthropic_named_tool_and_tool_result_round_trip(make_client):
    engine = scripted("It is 18C.")
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]},
    ]
    async with make_client(engine) as client:
        response = await client.post(MESSAGES, json=anthropic_body(messages=messages))
    assert response.status_code == 200, response.text
    assert response.json()["content"] == [{"type": "text", "text": "It is 18C."}]
    assert "18C" in engine.generations[0].prompt.text


async def test_anthropic_disable_parallel_tool_use_allows_one_call(make_client):
    engine = scripted(CALL_TEXT)
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    async with make_client(engine) as client:
        response = await client.post(MESSAGES, json=anthropic_body(tool_choice=choice))
    assert response.status_code == 200, response.text
    grammar = engine.generations[0].grammar
    assert grammar and 'tc-more ::= ""' in grammar


@pytest.mark.parametrize("field", ["output_format", "output_config"])
async def test_anthropic_output_format_json_schema(make_client, field):
    engine = scripted('{"answer": "yes"}')
    fmt = {"type": "json_schema", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}
    value = fmt if field == "output_format" else {"format": fmt, "effort": "low"}  # newer SDKs: output_config.format
    async with make_client(engine) as client:
        response = await client.post(MESSAGES, json={"model": "m", "max_tokens": 32, field: value,
                                                     "messages": [{"role": "user", "content": "?"}]})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["content"][0]["text"]) == {"answer": "yes"}
    assert 'answer-answer-kv' in engine.generations[0].grammar


# -- the token limit and calls ------------------------------------------------------------
# max_tokens cuts the model's second call: before its tool name (dropped, so the answer
# ends on a finished call and the client should run it), or inside its arguments.
CUT_BEFORE_NAME = CALL_TEXT + '\n<tool_call>\n{"na'
CUT_IN_ARGUMENTS = CALL_TEXT + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'


@pytest.mark.parametrize("cut, openai_reason, anthropic_reason, calls", [
    (CUT_BEFORE_NAME, "tool_calls", "tool_use", 1),
    (CUT_IN_ARGUMENTS, "length", "max_tokens", 2),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_limit_that_cuts_only_the_next_call_head_still_reports_the_calls(
    make_client, cut, openai_reason, anthropic_reason, calls, stream
):
    limit = len(pieces(cut))
    engine = FakeEngine(script=lambda generation: pieces(TWO_CALLS))
    async with make_client(engine) as client:
        openai = await client.post(CHAT, json=openai_body(tool_choice="required", max_tokens=limit, stream=stream))
        anthropic = await client.post(MESSAGES, json=anthropic_body(
            tool_choice={"type": "any"}, max_tokens=limit, stream=stream))
    assert openai.status_code == 200 and anthropic.status_code == 200
    if stream:
        chunks = sse_data(openai.text)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [openai_reason]
        assert len({d["index"] for c in chunks if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])}) == calls
        events = sse_data(anthropic.text)
        [delta] = [e for e in events if e["type"] == "message_delta"]
        assert delta["delta"]["stop_reason"] == anthropic_reason
        assert sum(1 for e in events if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use") == calls
    else:
        choice = openai.json()["choices"][0]
        assert choice["finish_reason"] == openai_reason and len(choice["message"]["tool_calls"]) == calls
        assert choice["message"]["content"] is None
        message = anthropic.json()
        assert message["stop_reason"] == anthropic_reason
        assert [b["type"] for b in message["content"]] == ["tool_use"] * calls


# -- validation that does not depend on tools being offered ------------------------------
async def test_tool_parts_of_the_history_are_checked_without_tools_offered(make_client):
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "nope"}]
    nameless = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "", "arguments": "{}"}}]}]
    async with make_client(FakeEngine()) as client:
        for messages in (orphan, nameless):
            response = await client.post(CHAT, json={"model": "m", "max_tokens": 4, "messages": messages})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "messages"
        response = await client.post(MESSAGES, json={"model": "m", "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "42"}]}]})
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_openai_tool_choice_that_needs_a_tool_without_tools_is_a_400(make_client, choice):
    async with make_client(FakeEngine()) as client:
        for tools in (None, []):
            body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tool_choice": choice}
            if tools is not None:
                body["tools"] = tools
            response = await client.post(CHAT, json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("parameters", [{"type": "object", "properties": [1, 2]}, {"anyOf": 5}, {"type": {"a": 1}}])
async def test_malformed_schema_shapes_are_400s_on_both_families(make_client, parameters):
    async with make_client(FakeEngine()) as client:
        openai = await client.post(CHAT, json=openai_body(
            tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}], tool_choice="required"))
        anthropic = await client.post(MESSAGES, json=anthropic_body(
            tools=[{"name": "f", "input_schema": parameters}], tool_choice={"type": "any"}))
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "tools", openai.text
    assert anthropic.status_code == 400 and anthropic.json()["error"]["type"] == "invalid_request_error"
