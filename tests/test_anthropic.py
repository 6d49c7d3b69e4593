"""The Anthropic Messages API through the whole ASGI stack, with the fake engine behind it."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anthropic
import httpx
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from httpx_sse import aconnect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient, TestClient

from llamad.api.anthropic.request import MessagesRequest, to_chat
from llamad.serve.request import InvalidRequest
from llamad.app import create_app
from llamad.config import Config, LimitsConfig, ServerConfig
from fake_engine import FakeEngine, pieces

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
HELLO = {"model": "claude-whatever", "max_tokens": 32, "messages": [{"role": "user", "content": "Say hello."}]}


@asynccontextmanager
async def serve(engine: FakeEngine | None = None, config: Config | None = None) -> AsyncIterator[AsyncTestClient]:
    app = create_app(config or Config(), engine or FakeEngine())
    async with AsyncTestClient(app, timeout=10) as client:
        yield client


def body(**changes: Any) -> dict[str, Any]:
    return {**HELLO, **changes}


async def sse_events(client: httpx.AsyncClient, path: str, payload: dict[str, Any]) -> list[tuple[str, dict]]:
    async with aconnect_sse(client, "POST", path, json={**payload, "stream": True}) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(event.event, json.loads(event.data)) async for event in source.aiter_sse()]


def assert_valid_stream(events: list[tuple[str, dict]]) -> None:
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and kinds[-2] == "message_delta"
    open_index, next_index = None, 0
    for kind, payload in events:
        assert payload["type"] == kind
        if kind == "ping":
            continue
        STREAM_EVENT.validate_python(payload)
        if kind == "content_block_start":
            assert open_index is None and payload["index"] == next_index
            open_index, next_index = next_index, next_index + 1
        elif kind in ("content_block_delta", "content_block_stop"):
            assert payload["index"] == open_index
            if kind == "content_block_stop":
                open_index = None


def blocks(message: dict[str, Any]) -> list[str]:
    return [block["type"] for block in message["content"]]


THINKING_SCRIPT = ["<think>", "Pondering", " deeply", "</think>", "\n\nHello", " there", "<end_of_turn>", "  \n"]


def thinking_engine(**kwargs: Any) -> FakeEngine:
    return FakeEngine(script=lambda g: list(THINKING_SCRIPT), **kwargs)


# -- replies --------------------------------------------------------------------------------


async def test_message_reply_has_the_served_model_and_real_usage():
    engine = FakeEngine()
    async with serve(engine) as client:
        reply = await client.post("/v1/messages", json=HELLO, headers={"anthropic-version": "2023-06-01"})
        counted = await client.post("/v1/messages/count_tokens", json={k: v for k, v in HELLO.items() if k != "max_tokens"})
    assert reply.status_code == 200
    message = Message.model_validate(reply.json())
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "llama-local"
    assert message.content[0].text == "Hello from the fake model."
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens == counted.json()["input_tokens"] == len(engine.generations[0].prompt.tokens)
    assert reply.headers["request-id"]


async def test_reasoning_is_stripped_unless_asked_for():
    async with serve(thinking_engine()) as client:
        plain = (await client.post("/v1/messages", json=HELLO)).json()
        asked = (await client.post("/v1/messages", json=body(thinking={"type": "enabled", "budget_tokens": 1024}))).json()
        think = (await client.post("/v1/messages/think?beta=true", json=HELLO)).json()
    assert blocks(plain) == ["text"]
    assert "Pondering" not in plain["content"][0]["text"]
    assert blocks(asked) == blocks(think) == ["thinking", "text"]
    assert think["content"][0]["thinking"] == "Pondering deeply"
    assert think["content"][0]["signature"]
    assert think["content"][1]["text"].startswith("Hello there")


async def test_clean_route_gives_trimmed_text_without_markers_or_thinking():
    async with serve(thinking_engine()) as client:
        reply = (await client.post("/v1/messages/clean", json=body(thinking={"type": "enabled", "budget_tokens": 1024}))).json()
        streamed = await sse_events(client, "/v1/messages/clean", HELLO)
    assert reply["content"] == [{"type": "text", "text": "Hello there"}]
    assert_valid_stream(streamed)
    text = "".join(p["delta"]["text"] for k, p in streamed if k == "content_block_delta")
    assert text == "Hello there"


async def test_stream_events_come_in_order_and_fold_to_the_plain_reply():
    async with serve(thinking_engine()) as client:
        events = await sse_events(client, "/v1/messages/think", HELLO)
        plain = (await client.post("/v1/messages/think", json=HELLO)).json()
    assert_valid_stream(events)
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == plain["usage"]["input_tokens"] > 0
    assert start["model"] == "llama-local" and start["content"] == [] and start["stop_reason"] is None
    kinds = [k for k, _ in events]
    assert kinds.count("content_block_start") == 2
    signature_at = [i for i, (k, p) in enumerate(events) if k == "content_block_delta" and p["delta"]["type"] == "signature_delta"]
    assert len(signature_at) == 1 and events[signature_at[0] + 1][0] == "content_block_stop"
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "end_turn"
    assert final["usage"]["output_tokens"] == plain["usage"]["output_tokens"] == len(THINKING_SCRIPT)
    thinking = "".join(p["delta"].get("thinking", "") for k, p in events if k == "content_block_delta")
    text = "".join(p["delta"].get("text", "") for k, p in events if k == "content_block_delta")
    assert thinking == plain["content"][0]["thinking"] and text == plain["content"][1]["text"]


async def test_stop_sequences_and_max_tokens_set_the_stop_reason():
    engine = FakeEngine(script=lambda g: ["one", " two", " STOP", " three"])
    async with serve(engine) as client:
        stopped = (await client.post("/v1/messages", json=body(stop_sequences=["STOP"]))).json()
        cut = (await client.post("/v1/messages", json=body(max_tokens=2))).json()
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "STOP"
    assert stopped["content"][0]["text"] == "one two "
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["output_tokens"] == 2


async def test_max_tokens_is_capped_by_the_configured_hard_cap():
    engine = FakeEngine()
    config = Config(limits=LimitsConfig(max_tokens_hard_cap=3))
    async with serve(engine, config) as client:
        reply = (await client.post("/v1/messages", json=body(max_tokens=5000))).json()
    assert engine.generations[0].max_tokens == 3
    assert reply["stop_reason"] == "max_tokens"


async def test_sampling_and_unknown_fields_reach_or_pass_the_engine():
    engine = FakeEngine()
    payload = body(
        temperature=0.2,
        top_p=0.5,
        top_k=7,
        metadata={"user_id": "u1"},
        service_tier="auto",
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    )
    async with serve(engine) as client:
        reply = await client.post("/v1/messages?beta=true", json=payload, headers={"anthropic-beta": "x", "x-api-key": "k"})
    assert reply.status_code == 200
    sampling = engine.generations[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.2, 0.5, 7)
    assert "Be brief." in engine.generations[0].prompt.text


@asynccontextmanager
async def concurrent(client: AsyncTestClient) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests really overlap (the test client runs one at a time)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://testserver") as http:
        yield http


async def hold_engine(http: httpx.AsyncClient, engine: FakeEngine) -> asyncio.Task:
    """A slow request in the background; returns once it holds the engine."""
    task = asyncio.ensure_future(http.post("/v1/messages", json=HELLO))
    while not engine.generating:
        await asyncio.sleep(0.01)
    return task


async def test_ping_is_sent_while_the_request_waits_for_the_engine(monkeypatch):
    monkeypatch.setattr("llamad.engine.base.KEEPALIVE_S", 0.05)
    engine = FakeEngine(token_delay=0.1, script=lambda g: ["x"] * 5)
    async with serve(engine) as client, concurrent(client) as http:
        first = await hold_engine(http, engine)
        events = await sse_events(http, "/v1/messages", HELLO)
        assert (await first).status_code == 200
    assert_valid_stream(events)
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and events[0][1]["message"]["usage"]["input_tokens"] > 0
    # Queued for ~0.5 s behind the first request, at a 0.05 s keep-alive interval.
    assert kinds[: kinds.index("content_block_start")].count("ping") >= 3


WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


async def test_tool_calls_come_back_as_tool_use_blocks_streamed_and_not():
    engine = FakeEngine(script=lambda g: pieces(CALL_TEXT, 4))
    payload = body(tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Paris?"}])
    async with serve(engine) as client:
        plain = (await client.post("/v1/messages", json=payload)).json()
        events = await sse_events(client, "/v1/messages", payload)
    assert plain["stop_reason"] == "tool_use"
    assert blocks(plain) == ["text", "tool_use"]
    call = plain["content"][1]
    assert call["id"].startswith("toolu_") and call["name"] == "get_weather" and call["input"] == {"city": "Paris"}
    assert "get_weather" in engine.generations[0].prompt.text  # the tools were offered in the prompt
    assert engine.generations[0].grammar is not None
    assert_valid_stream(events)
    start = next(p["content_block"] for k, p in events if k == "content_block_start" and p["index"] == 1)
    assert start["type"] == "tool_use" and start["input"] == {}
    arguments = "".join(p["delta"]["partial_json"] for k, p in events if k == "content_block_delta" and p["index"] == 1)
    assert json.loads(arguments) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_tool_round_trip_reaches_the_prompt_and_unknown_results_are_refused():
    engine = FakeEngine()
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "18C and sunny"}]},
    ]
    orphan = [history[0], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "?"}]}]
    async with serve(engine) as client:
        reply = await client.post("/v1/messages", json=body(tools=[WEATHER], messages=history))
        refused = await client.post("/v1/messages", json=body(tools=[WEATHER], messages=orphan))
        named = await client.post("/v1/messages", json=body(tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}))
    assert reply.status_code == 200
    prompt = engine.generations[0].prompt.text
    assert '"city": "Paris"' in prompt and "18C and sunny" in prompt
    status, kind, message = await error_of(refused)
    assert (status, kind) == (400, "invalid_request_error") and "toolu_x" in message
    status, kind, message = await error_of(named)
    assert (status, kind) == (400, "invalid_request_error") and "nope" in message


CLAUDE_CODE_SCHEMA = "http://json-schema.org/draft-07/schema#"
CLAUDE_CODE_TOOLS = [
    {
        "name": "Bash",
        "description": "Run a shell command",
        "input_schema": {
            "type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}, "run_in_background": {"type": "boolean"}},
            "required": ["command"],
            "additionalProperties": False,
            "$schema": CLAUDE_CODE_SCHEMA,
        },
    },
    {
        "name": "TodoWrite",
        "description": "Update the todo list",
        "input_schema": {
            "type": "object",
            "properties": {
                "todos": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "content": {"type": "string", "minLength": 1},
                            "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                        },
                        "required": ["content", "status"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["todos"],
            "additionalProperties": False,
            "$schema": CLAUDE_CODE_SCHEMA,
        },
        "cache_control": {"type": "ephemeral"},
    },
]


async def test_a_claude_code_turn_is_accepted_and_counted_exactly():
    """The shape Claude Code sends: system blocks with cache_control, reminders, replayed
    thinking with a signature, tool results, extra top-level fields, ?beta=true."""
    engine = FakeEngine(script=lambda g: pieces('<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>', 6))
    payload = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be concise."},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"}, {"type": "text", "text": "list files"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "run ls", "signature": "llamad-unsigned"},
                    {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "pwd"}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "/work", "cache_control": {"type": "ephemeral"}}]},
        ],
        "tools": CLAUDE_CODE_TOOLS,
        "metadata": {"user_id": "user_x_session_y"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": []},
        "stream": True,
    }
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219", "x-app": "cli"}
    async with serve(engine) as client:
        events = await sse_events(client, "/v1/messages?beta=true", payload)
        counted = await client.post("/v1/messages/count_tokens?beta=true", json=payload, headers=headers)
    assert_valid_stream(events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == counted.json()["input_tokens"]
    call = next(p["content_block"] for k, p in events if k == "content_block_start")
    assert call["type"] == "tool_use" and call["name"] == "Bash"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    prompt = engine.generations[0].prompt.text
    assert "You are Claude Code." in prompt and "/work" in prompt and "run ls" not in prompt


# -- translation of requests ----------------------------------------------------------------


def request_of(**payload: Any) -> MessagesRequest:
    import msgspec

    return msgspec.convert({**HELLO, **payload}, MessagesRequest)


def test_system_prompts_and_system_turns_fold_into_one_system_message():
    chat = to_chat(
        request_of(
            system="You are terse.",
            messages=[
                {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hi"},
            ],
        ),
        max_messages=100,
    )
    assert [m.role for m in chat.messages] == ["system", "user"]
    assert chat.messages[0].content == "You are terse.\n\nAnswer in French."


def test_tool_history_becomes_tool_calls_and_named_tool_results():
    chat = to_chat(
        request_of(
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "need a tool", "signature": "sig"},
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "boom", "is_error": True},
                        {"type": "text", "text": "Thanks"},
                    ],
                },
            ],
            tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        ),
        max_messages=100,
    )
    user, assistant, result, failed, thanks = chat.messages
    assert assistant.content == "Let me check."  # replayed thinking is not answer text
    assert assistant.tool_calls[0].id == "toolu_1" and json.loads(assistant.tool_calls[0].arguments) == {"city": "Paris"}
    assert (result.role, result.tool_call_id, result.name, result.content) == ("tool", "toolu_1", "get_weather", "18C")
    assert failed.is_error and failed.content == "boom"
    assert (thanks.role, thanks.content) == ("user", "Thanks")
    assert chat.tools[0].name == "get_weather" and chat.tools[0].parameters["properties"]["city"]


def test_images_are_refused_not_dropped():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(InvalidRequest) as refused:
        to_chat(request_of(messages=[{"role": "user", "content": [image]}]), max_messages=100)
    assert "not supported" in refused.value.message
    assert refused.value.param == "messages[0].content[0]"


# -- errors -----------------------------------------------------------------------------------


async def error_of(response) -> tuple[int, str, str]:
    payload = response.json()
    assert payload["type"] == "error"
    assert response.headers["request-id"]
    return response.status_code, payload["error"]["type"], payload["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        (body(max_tokens="many"), "max_tokens"),
        (body(messages="hello"), "messages"),
        (body(messages=[]), "messages"),
        (body(messages=[{"role": "robot", "content": "hi"}]), "role"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), "image"),
        (body(messages=[{"role": "user", "content": [{"type": "hologram"}]}]), "hologram"),
        (body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "server tool"),
        (body(tool_choice={"type": "any"}), "tool_choice"),
        (body(temperature=7), "temperature"),
        (body(max_tokens=0), "max_tokens"),
    ],
)
async def test_bad_requests_are_invalid_request_errors(payload, needle):
    async with serve() as client:
        status, kind, message = await error_of(await client.post("/v1/messages", json=payload))
    assert (status, kind) == (400, "invalid_request_error")
    assert needle in message


async def test_malformed_json_is_a_400():
    async with serve() as client:
        response = await client.post("/v1/messages", content=b'{"model": ', headers={"content-type": "application/json"})
        status, kind, message = await error_of(response)
    assert (status, kind) == (400, "invalid_request_error") and "JSON" in message


async def test_unknown_route_under_messages_is_not_found():
    async with serve() as client:
        status, kind, _ = await error_of(await client.post("/v1/messages/batches", json=HELLO))
    assert (status, kind) == (404, "not_found_error")


async def test_unknown_route_from_an_anthropic_client_is_an_anthropic_404():
    """Claude Code posts telemetry to routes llamad does not have; its SDK parses the error."""
    async with serve() as client:
        response = await client.post("/api/event_logging/batch", json={}, headers={"anthropic-version": "2023-06-01"})
        status, kind, _ = await error_of(response)
        assert "request-id" in response.headers
        openai_client = await client.post("/api/event_logging/batch", json={})
    assert (status, kind) == (404, "not_found_error")
    assert openai_client.status_code == 404 and "type" not in openai_client.json()


async def test_too_long_prompt_is_a_400():
    async with serve(FakeEngine(n_ctx=8)) as client:
        long = body(messages=[{"role": "user", "content": "word " * 50}])
        status, kind, message = await error_of(await client.post("/v1/messages", json=long))
        counted = await client.post("/v1/messages/count_tokens", json=long)
    assert (status, kind) == (400, "invalid_request_error")
    assert message == f"prompt is too long: {counted.json()['input_tokens']} tokens > 7 maximum"
    assert counted.json()["input_tokens"] > 8


async def test_too_large_body_is_request_too_large():
    async with serve(config=Config(server=ServerConfig(max_body_bytes=200))) as client:
        big = body(messages=[{"role": "user", "content": "x" * 1000}])
        status, kind, _ = await error_of(await client.post("/v1/messages", json=big))
    assert (status, kind) == (413, "request_too_large")


async def test_full_queue_is_overloaded_529():
    engine = FakeEngine(token_delay=0.05, script=lambda g: ["x"] * 10, max_queue=0)
    async with serve(engine) as client, concurrent(client) as http:
        first = await hold_engine(http, engine)
        plain = await http.post("/v1/messages", json=HELLO)
        streamed = await http.post("/v1/messages", json=body(stream=True))
        assert (await first).status_code == 200
    for response in (plain, streamed):
        status, kind, _ = await error_of(response)
        assert (status, kind) == (529, "overloaded_error")
        assert response.headers["retry-after"]


def failing_script(generation):
    yield "Hel"
    yield "lo"
    raise RuntimeError("the GPU caught fire")


async def test_engine_failure_is_api_error_and_after_the_stream_began_an_error_event():
    async with serve(FakeEngine(script=failing_script)) as client:
        status, kind, message = await error_of(await client.post("/v1/messages", json=HELLO))
        events = await sse_events(client, "/v1/messages", HELLO)
    assert (status, kind) == (500, "api_error") and "GPU" not in message
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "error"
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": message}}


async def test_head_and_get_root_answer():
    async with serve() as client:
        head = await client.head("/")
        get = await client.get("/")
    assert head.status_code == get.status_code == 200


# -- the official SDK, in process ---------------------------------------------------------


def sdk_for(client: AsyncTestClient) -> anthropic.AsyncAnthropic:
    """The official SDK talking to the app in process (the client has run its lifespan)."""
    try:
        import httpx2 as http  # newer SDKs are built on httpx2 and refuse httpx clients
    except ImportError:
        import httpx as http
    transport = http.AsyncClient(transport=http.ASGITransport(app=client.app), base_url="http://testserver")
    return anthropic.AsyncAnthropic(base_url="http://testserver", api_key="local", http_client=transport, max_retries=0)


async def test_official_sdk_create_and_stream():
    async with serve(thinking_engine()) as client:
        sdk = sdk_for(client)
        message = await sdk.messages.create(model="claude-local", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].type == "text" and message.content[0].text.startswith("Hello there")
        async with sdk.messages.stream(
            model="m",
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            thinking={"type": "enabled", "budget_tokens": 1024},
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text"]
        assert text == final.content[1].text
        counted = await sdk.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
        assert counted.input_tokens == final.usage.input_tokens
        with pytest.raises(anthropic.BadRequestError):
            await sdk.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "hi"}])


# -- no user input is a server error -----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
BLOCK = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "tool_use", "tool_result", "thinking", "redacted_thinking", "image", "document", "other"])},
    optional={
        "text": st.text(max_size=8) | JSON,
        "id": st.sampled_from(["toolu_1", "toolu_2"]) | JSON,
        "name": st.sampled_from(["get_weather", ""]) | JSON,
        "input": JSON,
        "tool_use_id": st.sampled_from(["toolu_1", "toolu_2"]) | JSON,
        "content": st.text(max_size=8) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)})) | JSON,
        "is_error": JSON,
        "thinking": JSON,
        "cache_control": JSON,
    },
)
SCHEMA = st.sampled_from([WEATHER["input_schema"], {}, {"type": "array"}, {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}]) | JSON
BODY = st.fixed_dictionaries(
    {
        "max_tokens": st.integers(-3, 20) | JSON,
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": st.text(max_size=12) | st.lists(BLOCK, max_size=3)}
            ),
            max_size=4,
        )
        | JSON,
    },
    optional={
        "system": st.text(max_size=8) | JSON,
        "tools": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "t2", ""]), "input_schema": SCHEMA}, optional={"type": JSON}), max_size=2) | JSON,
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])}, optional={"name": st.sampled_from(["get_weather", "zz"]), "disable_parallel_tool_use": JSON}) | JSON,
        "thinking": st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled", "adaptive", "x"])}, optional={"budget_tokens": JSON}) | JSON,
        "stop_sequences": st.lists(st.text(max_size=4), max_size=3) | JSON,
        "temperature": JSON,
        "top_k": JSON,
        "output_format": st.fixed_dictionaries({"type": st.just("json_schema"), "schema": SCHEMA}) | JSON,
        "stream": st.booleans(),
    },
)


def test_no_request_body_causes_a_server_error():
    with TestClient(create_app(Config(), FakeEngine(script=lambda g: pieces(CALL_TEXT, 5)))) as client:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(payload=BODY, route=st.sampled_from(["/v1/messages", "/v1/messages/clean", "/v1/messages/count_tokens"]))
        def check(payload, route):
            response = client.post(route, json=payload)
            assert response.status_code in (200, 400), response.text
            assert "api_error" not in response.text

        check()


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"), (413, "request_too_large"), (429, "rate_limit_error")],
)
def test_http_errors_map_to_anthropic_type_names(status, kind):
    from litestar.exceptions import HTTPException

    from llamad.serve.errors import anthropic_body, from_exception

    error = from_exception(HTTPException(status_code=status), "anthropic")
    assert error.status == status and anthropic_body(error)["error"]["type"] == kind


async def test_unloaded_model_is_a_retryable_503_not_a_500():
    engine = FakeEngine()
    async with AsyncTestClient(create_app(Config(), engine, load_engine=False)) as client:
        response = await client.post("/v1/messages", json=HELLO)
    status, _, message = await error_of(response)
    assert status == 503 and "not loaded" in message and response.headers["retry-after"]
