"""OpenAI Responses routes through the real ASGI stack with a fake engine: shapes, event
order, sequence numbers, tools, state and errors. Payloads are validated against the
official `openai` SDK's own types."""

from __future__ import annotations

import json

import pydantic
import pytest
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent

from fake_engine import FakeEngine, pieces

pytestmark = pytest.mark.asyncio

RESPONSES = "/v1/responses"
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}
CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def sse(body: str) -> list[tuple[str, dict]]:
    """(event name, payload) of an SSE body; checks the framing: `event:` equals `type`."""
    events = []
    for frame in body.split("\n\n"):
        if not frame or frame.startswith(":"):
            continue
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, frame
        name, payload = lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])
        assert payload["type"] == name
        events.append((name, payload))
    return events


def assert_well_formed(events: list[tuple[str, dict]]) -> None:
    """What the SDK's stream helper and Codex rely on."""
    numbers = [p["sequence_number"] for _, p in events]
    assert numbers == sorted(set(numbers)), "sequence_number must strictly increase"
    assert [k for k, _ in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1][0] in ("response.completed", "response.incomplete", "response.failed")
    added: set[int] = set()
    done: set[int] = set()
    for kind, payload in events:
        STREAM_EVENT.validate_python(payload)
        if "output_index" in payload and kind != "response.output_item.added":
            assert payload["output_index"] in added, f"{kind} before its item was added"
        if kind == "response.output_item.added":
            assert payload["output_index"] == len(added)
            added.add(payload["output_index"])
        if kind == "response.output_item.done":
            done.add(payload["output_index"])
    assert added == done, "every item added is done before the end"


async def create(client, **body) -> dict:
    response = await client.post(RESPONSES, json={"model": "gpt-5", "input": "Hi", **body})
    assert response.status_code == 200, response.text
    return response.json()


async def stream(client, **body) -> list[tuple[str, dict]]:
    response = await client.post(RESPONSES, json={"model": "gpt-5", "input": "Hi", "stream": True, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert_well_formed(events)
    return events


async def test_plain_response_has_the_sdk_shape_and_real_usage(make_client):
    async with make_client() as client:
        body = await create(client)
    SdkResponse.model_validate(body)
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["model"] == "llama-local" and isinstance(body["created_at"], int)
    assert body["status"] == "completed" and body["incomplete_details"] is None
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello from the fake model.", "annotations": [], "logprobs": []}]
    usage = body["usage"]
    assert usage["output_tokens"] == 5 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + 5
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0


async def test_stream_has_the_full_typed_event_sequence_and_folds_to_the_plain_reply(make_client):
    async with make_client() as client:
        events = await stream(client)
        plain = await create(client)
    kinds = [k for k, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert {p["response"]["id"] for k, p in events if "response" in p} == {created["id"]}
    assert "".join(p["delta"] for k, p in events if k == "response.output_text.delta") == "Hello from the fake model."
    assert events[-3][1]["part"]["text"] == "Hello from the fake model."
    final = events[-1][1]["response"]
    SdkResponse.model_validate(final)
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 5
    # The plain reply is the same answer (ids and times aside).
    strip = lambda r: [{k: v for k, v in item.items() if k != "id"} for item in r["output"]]  # noqa: E731
    assert strip(final) == strip(plain)


async def test_reasoning_becomes_a_reasoning_item_with_its_own_events_and_token_count(make_client):
    engine = FakeEngine(script=lambda g: pieces("<think>first plan it</think>The answer.", 4))
    async with make_client(engine) as client:
        events = await stream(client)
        plain = await create(client, reasoning={"effort": "low", "summary": "auto"})
    kinds = [k for k, _ in events]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    assert "response.reasoning_text.done" in kinds
    reasoning, message = plain["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "first plan it"}]
    assert message["content"][0]["text"] == "The answer."  # not fed into the answer text
    # The fake engine counts words as tokens: "first plan it" is 3.
    assert plain["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
    SdkResponse.model_validate(plain)


async def test_function_call_items_streamed_and_not(make_client):
    engine = FakeEngine(script=lambda g: pieces(CALL_TEXT, 5))
    async with make_client(engine) as client:
        plain = await create(client, tools=[WEATHER])
        events = await stream(client, tools=[WEATHER])
    assert "get_weather" in engine.generations[0].prompt.text  # offered in the prompt
    text, call = plain["output"]
    assert text["content"][0]["text"].strip() == "Checking."
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["status"] == "completed" and plain["status"] == "completed"
    kinds = [k for k, _ in events]
    assert "response.function_call_arguments.delta" in kinds
    added = next(p for k, p in events if k == "response.output_item.added" and p["item"]["type"] == "function_call")
    assert added["item"]["arguments"] == "" and added["item"]["name"] == "get_weather"
    deltas = "".join(p["delta"] for k, p in events if k == "response.function_call_arguments.delta")
    done = next(p for k, p in events if k == "response.function_call_arguments.done")
    assert json.loads(deltas) == json.loads(done["arguments"]) == {"city": "Paris"}
    assert done["item_id"] == added["item"]["id"]


async def test_tool_choice_required_and_named_constrain_the_output(make_client):
    engine = FakeEngine(script=lambda g: pieces(CALL_TEXT.split("\n", 1)[1], 5))
    async with make_client(engine) as client:
        await create(client, tools=[WEATHER], tool_choice="required")
        await create(client, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
        await create(client, tools=[WEATHER], tool_choice="none")
        await create(client, tools=[WEATHER], tool_choice="auto", parallel_tool_calls=False)
        unknown = await client.post(RESPONSES, json={"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}})
    required, named, none, auto = engine.generations
    assert required.grammar is not None and "get_weather" in required.grammar
    assert named.grammar is not None and "You must call the function get_weather." in named.prompt.text
    assert none.grammar is None and "get_weather" not in none.prompt.text
    assert "Call at most one function." in auto.prompt.text
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"]


async def test_text_format_json_schema_and_json_object_are_grammar_constrained(make_client):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": False}
    engine = FakeEngine(script=lambda g: ['{"answer": "4"}'])
    async with make_client(engine) as client:
        plain = await create(client, text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}})
        await create(client, text={"format": {"type": "json_object"}})
        await create(client, text={"format": {"type": "text"}, "verbosity": "low"})
    with_schema, with_object, free = engine.generations
    assert with_schema.grammar is not None and "answer" in with_schema.grammar
    assert with_object.grammar is not None
    assert free.grammar is None
    assert json.loads(plain["output"][0]["content"][0]["text"]) == {"answer": "4"}
    assert plain["text"]["format"]["type"] == "json_schema"  # echoed


async def test_max_output_tokens_makes_the_response_incomplete(make_client):
    async with make_client() as client:
        plain = await create(client, max_output_tokens=2)
        events = await stream(client, max_output_tokens=2)
    assert plain["status"] == "incomplete" and plain["incomplete_details"] == {"reason": "max_output_tokens"}
    assert plain["output"][0]["status"] == "incomplete" and plain["usage"]["output_tokens"] == 2
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert plain["max_output_tokens"] == 2


async def test_input_items_reach_the_prompt_and_reasoning_items_do_not(make_client):
    engine = FakeEngine()
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "SystemRule"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "SecretThought"}], "encrypted_content": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_A", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_A", "output": "18C and sunny"},
        {"role": "user", "content": "Thanks"},
    ]
    async with make_client(engine) as client:
        await create(client, input=items, instructions="You are Tester.", tools=[WEATHER],
                     store=False, include=["reasoning.encrypted_content"], prompt_cache_key="k", metadata={"a": "b"},
                     truncation="auto", user="u", service_tier="auto", reasoning={"effort": "high", "summary": "auto"})
    prompt = engine.generations[0].prompt.text
    for text in ("You are Tester.", "Be brief.", "SystemRule", "Weather in Paris?", "Looking.", '"city": "Paris"', "18C and sunny", "Thanks"):
        assert text in prompt, text
    assert "SecretThought" not in prompt
    assert prompt.index("Looking.") < prompt.index("18C and sunny") < prompt.index("Thanks")
    assert '<tool_response name="get_weather">' in prompt


async def test_tool_types_llamad_cannot_run_are_left_out_not_refused(make_client):
    engine = FakeEngine()
    hosted = [
        {"type": "web_search", "search_context_size": "low"},
        {"type": "namespace", "name": "mcp__files", "tools": [{"type": "function", "name": "ns_read"}]},
        {"type": "custom", "name": "apply_patch", "format": {"type": "grammar", "syntax": "lark", "definition": "start: /x/"}},
        {"type": "local_shell"},
        {"type": "mcp", "server_label": "deepwiki", "server_url": "https://example.invalid"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "image_generation"},
        {"type": "a_tool_type_from_the_future", "name": "future_tool"},
    ]
    async with make_client(engine) as client:
        body = await create(client, tools=[*hosted, WEATHER], tool_choice={"type": "web_search"})
    prompt = engine.generations[0].prompt.text
    assert "get_weather" in prompt
    for name in ("ns_read", "apply_patch", "deepwiki", "future_tool", "web_search"):
        assert name not in prompt
    assert len(body["tools"]) == len(hosted) + 1  # echoed as sent


async def test_bad_input_is_a_400_in_openai_shape_naming_the_field(make_client):
    cases = [
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call_output", "call_id": "call_nobody", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "top_p": -1}, "top_p"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
        ({"input": "x", "tools": [{"type": "function", "description": "no name"}]}, "tools[0].name"),
        ({"input": []}, "input"),
        ({}, "input"),
    ]
    async with make_client() as client:
        for body, param in cases:
            response = await client.post(RESPONSES, json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
            assert error["message"]
        not_json = await client.post(RESPONSES, content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "error" in not_json.json()
    assert client.engine.generations == []  # no bad request reached the engine


async def test_previous_response_id_continues_the_stored_conversation(make_client):
    engine = FakeEngine()
    async with make_client(engine) as client:
        first = await create(client, input="My name is Ada.", instructions="First instructions.")
        second = await create(client, input="What is my name?", previous_response_id=first["id"])
        fetched = await client.get(f"{RESPONSES}/{first['id']}")
        missing = await client.post(RESPONSES, json={"input": "x", "previous_response_id": "resp_nothere"})
    prompt = engine.generations[1].prompt.text
    assert "My name is Ada." in prompt and "Hello from the fake model." in prompt and "What is my name?" in prompt
    assert "First instructions." not in prompt  # instructions are not carried over (as OpenAI does)
    assert second["previous_response_id"] == first["id"]
    assert fetched.status_code == 200 and fetched.json() == first
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["param"] == "previous_response_id" and "resp_nothere" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_a_function_call_output_answers_a_call_of_the_previous_response(make_client):
    engine = FakeEngine(script=lambda g: pieces(CALL_TEXT, 5) if len(engine.generations) == 1 else ["It is 18C."])
    async with make_client(engine) as client:
        first = await create(client, input="Weather in Paris?", tools=[WEATHER])
        call = first["output"][-1]
        second = await create(
            client,
            input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "18C"}],
            previous_response_id=first["id"],
            tools=[WEATHER],
        )
    assert second["output"][0]["content"][0]["text"] == "It is 18C."
    prompt = engine.generations[1].prompt.text
    assert '"city": "Paris"' in prompt and "18C" in prompt


async def test_get_and_delete_stored_responses_and_store_false_keeps_nothing(make_client):
    async with make_client() as client:
        kept = await create(client)
        unkept = await create(client, store=False)
        streamed = (await stream(client))[-1][1]["response"]
        assert (await client.get(f"{RESPONSES}/{streamed['id']}")).json()["status"] == "completed"
        assert (await client.get(f"{RESPONSES}/{unkept['id']}")).status_code == 404
        deleted = await client.delete(f"{RESPONSES}/{kept['id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": kept["id"], "object": "response.deleted", "deleted": True}
        gone = await client.get(f"{RESPONSES}/{kept['id']}")
        again = await client.delete(f"{RESPONSES}/{kept['id']}")
        follow = await client.post(RESPONSES, json={"input": "x", "previous_response_id": unkept["id"]})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert again.status_code == 404 and follow.status_code == 404


async def test_the_store_is_bounded_by_count_and_bytes(make_client):
    async with make_client(LLAMAD_RESPONSES_STORE_MAX="2") as client:
        ids = [(await create(client, input=f"turn {i}"))["id"] for i in range(3)]
        found = [(await client.get(f"{RESPONSES}/{i}")).status_code for i in ids]
    assert found == [404, 200, 200]  # the oldest was evicted
    async with make_client(LLAMAD_RESPONSES_STORE_MAX_BYTES="3000") as client:
        small = await create(client, input="short")
        large = await create(client, input="word " * 2000)  # larger than the whole store: not kept
        statuses = [(await client.get(f"{RESPONSES}/{r['id']}")).status_code for r in (small, large)]
    assert statuses == [200, 404]


async def test_an_error_after_the_stream_began_is_an_error_event_then_failed(make_client):
    def script(generation):
        yield "Hello"
        raise RuntimeError("the model broke")

    async with make_client(FakeEngine(script=script)) as client:
        response = await client.post(RESPONSES, json={"input": "Hi", "stream": True})
    events = sse(response.text)
    assert_well_formed(events)
    kinds = [k for k, _ in events]
    assert kinds[-2:] == ["error", "response.failed"]
    error = events[-2][1]
    assert error["message"] and error["error"]["type"] == "server_error"
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["status"] == "incomplete"  # the item that was open is closed


async def test_keep_alive_events_while_the_prompt_is_evaluated(make_client, monkeypatch):
    """Keep-alives are `response.in_progress` events, not SSE comments: Codex's idle
    timeout counts events only, and a long prompt on a small board takes minutes."""
    monkeypatch.setattr("llamad.engine.base.KEEPALIVE_S", 0.05)
    async with make_client(FakeEngine(token_delay=0.001)) as client:
        quick = (await client.post(RESPONSES, json={"input": "hi", "stream": True})).text
    async with make_client(FakeEngine(prompt_delay=0.3)) as client:
        slow = (await client.post(RESPONSES, json={"input": "hi", "stream": True})).text
    quick_kinds = [k for k, _ in sse(quick)]
    slow_events = sse(slow)
    assert_well_formed(slow_events)
    slow_kinds = [k for k, _ in slow_events]
    assert quick_kinds.count("response.in_progress") == 1  # answered at once: no keep-alive
    before_text = slow_kinds[: slow_kinds.index("response.output_text.delta")]
    assert before_text.count("response.in_progress") >= 4  # the first, then one per quiet interval
    assert {p["response"]["status"] for k, p in slow_events if k == "response.in_progress"} == {"in_progress"}


# -- POST /v1/responses/input_tokens ------------------------------------------------------------

COUNT = "/v1/responses/input_tokens"


def openai_sdk(client):
    """The official SDK talking to the app in process (the client has run its lifespan)."""
    import openai

    try:
        import httpx2 as http  # newer SDKs are built on httpx2 and refuse httpx clients
    except ImportError:
        import httpx as http
    transport = http.AsyncClient(transport=http.ASGITransport(app=client.app), base_url="http://llamad")
    return openai.AsyncOpenAI(base_url="http://llamad/v1", api_key="x", http_client=transport, max_retries=0)


async def test_input_tokens_counts_the_prompt_a_response_would_get(make_client):
    """Instructions, input items, tools and the previous_response_id history all count:
    the answer equals the input_tokens of the response the same body creates."""
    engine = FakeEngine()
    async with make_client(engine) as client:
        sdk = openai_sdk(client)
        first = await create(client, input="My name is Ada.")
        body = dict(
            input=[{"role": "user", "content": "What is my name?"}],
            instructions="Answer in one word.",
            tools=[WEATHER, {"type": "web_search"}],
            previous_response_id=first["id"],
        )
        counted = await sdk.responses.input_tokens.count(model="gpt-5", **body)
        bare = await sdk.responses.input_tokens.count(model="gpt-5", input="What is my name?")
        created = await create(client, **body)
        kept = len(client.app.state.responses_store)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == created["usage"]["input_tokens"]
    assert bare.input_tokens < counted.input_tokens  # without instructions, tools and history
    prompt = engine.generations[-1].prompt.text
    assert counted.input_tokens == engine.count_tokens(prompt)
    assert len(engine.generations) == 2 and kept == 2  # counting generated and stored nothing


async def test_input_tokens_of_a_prompt_longer_than_the_context_is_still_a_count(make_client):
    async with make_client(FakeEngine(n_ctx=8)) as client:
        counted = await client.post(COUNT, json={"input": "word " * 50})
        created = await client.post(RESPONSES, json={"input": "word " * 50})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 50
    assert created.status_code == 400 and created.json()["error"]["code"] == "context_length_exceeded"


async def test_input_tokens_bad_input_is_a_4xx_in_openai_shape(make_client):
    cases = [
        ({"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        ({"input": "x", "tool_choice": "sometimes"}, 400, "tool_choice"),
        ({"input": "x", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
        ({}, 400, "input"),
        ({"input": "x", "previous_response_id": "resp_nothere"}, 404, "previous_response_id"),
    ]
    async with make_client() as client:
        for body, status, param in cases:
            response = await client.post(COUNT, json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        not_json = await client.post(COUNT, content=b"[", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"


# -- GET /v1/responses/{id}/input_items ----------------------------------------------------------

SENT_ITEMS = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Thinking."}]},
    {"type": "function_call", "call_id": "call_A", "name": "get_weather", "arguments": {"city": "Paris"}},
    {"type": "function_call_output", "call_id": "call_A", "output": "18C and sunny"},
    {"role": "user", "content": "Thanks"},
]


async def test_input_items_list_what_the_model_was_given_in_the_sdk_shape(make_client):
    async with make_client() as client:
        sdk = openai_sdk(client)
        created = await create(client, input=SENT_ITEMS, tools=[WEATHER])
        listed = await sdk.responses.input_items.list(created["id"])  # newest first, as OpenAI's default
        ascending = [item async for item in sdk.responses.input_items.list(created["id"], order="asc", limit=2)]
        again = (await client.get(f"{RESPONSES}/{created['id']}/input_items", params={"order": "asc"})).json()
    items = [item.model_dump(exclude_none=True) for item in ascending]
    assert [i["type"] for i in items] == ["message", "message", "reasoning", "function_call", "function_call_output", "message"]
    assert items[0]["role"] == "developer" and items[0]["content"] == [{"type": "input_text", "text": "Be brief."}]
    assert items[1]["content"] == [{"type": "input_text", "text": "Weather in Paris?"}]
    assert items[2]["id"] == "rs_1"  # a client's own id is kept
    assert items[3]["arguments"] == '{"city":"Paris"}' and items[3]["call_id"] == "call_A"
    assert items[4]["output"] == "18C and sunny" and items[5]["content"][0]["text"] == "Thanks"
    assert all(i["status"] == "completed" for i in items)
    ids = [i["id"] for i in items]
    assert len(set(ids)) == 6 and [i["id"] for i in again["data"]] == ids  # stable across calls
    assert [i.id for i in listed.data] == ids[::-1] and listed.has_more is False
    assert (again["first_id"], again["last_id"]) == (ids[0], ids[-1])


async def test_input_items_of_a_continued_response_hold_the_whole_conversation(make_client):
    async with make_client() as client:
        first = await create(client, input="My name is Ada.", instructions="Not an item.")
        second = await create(client, input="What is my name?", previous_response_id=first["id"])
        listed = (await client.get(f"{RESPONSES}/{second['id']}/input_items", params={"order": "asc"})).json()
    texts = [(i["role"], i["content"][0]["text"]) for i in listed["data"]]
    assert texts == [("user", "My name is Ada."), ("assistant", "Hello from the fake model."), ("user", "What is my name?")]
    assert listed["data"][1]["id"] == first["output"][0]["id"]  # the first answer's own item


async def test_input_items_pages_and_errors(make_client):
    async with make_client() as client:
        created = await create(client, input=[{"role": "user", "content": f"turn {i}"} for i in range(5)])
        url = f"{RESPONSES}/{created['id']}/input_items"
        everything = (await client.get(url, params={"order": "asc"})).json()["data"]
        ids = [i["id"] for i in everything]
        first = (await client.get(url, params={"order": "asc", "limit": 2})).json()
        second = (await client.get(url, params={"order": "asc", "limit": 2, "after": first["last_id"]})).json()
        newest = (await client.get(url, params={"limit": 2, "include": "message.input_image.image_url"})).json()
        back = (await client.get(url, params={"order": "asc", "limit": 2, "before": ids[3]})).json()
        errors = {
            "limit=0": await client.get(url, params={"limit": 0}),
            "limit=many": await client.get(url, params={"limit": "many"}),
            "order": await client.get(url, params={"order": "sideways"}),
            "after": await client.get(url, params={"after": "msg_nothere"}),
        }
        unkept = await create(client, store=False)
        missing = await client.get(f"{RESPONSES}/{unkept['id']}/input_items")
        await client.delete(f"{RESPONSES}/{created['id']}")
        deleted = await client.get(url)
    assert len(ids) == 5
    assert [i["id"] for i in first["data"]] == ids[:2] and first["has_more"] is True
    assert [i["id"] for i in second["data"]] == ids[2:4] and second["has_more"] is True
    assert [i["id"] for i in newest["data"]] == [ids[4], ids[3]] and newest["first_id"] == ids[4]
    assert [i["id"] for i in back["data"]] == ids[1:3] and back["has_more"] is True
    for name, response in errors.items():
        assert response.status_code == 400, name
        assert response.json()["error"]["type"] == "invalid_request_error" and response.json()["error"]["param"], name
    for response in (missing, deleted):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error" and response.json()["error"]["code"] == "response_not_found"
