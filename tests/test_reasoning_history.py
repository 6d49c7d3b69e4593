"""An assistant turn's reasoning sent back by the client reaches the template as that turn's
`reasoning_content`, through every face: OpenAI chat's `reasoning_content`, Anthropic's
thinking blocks, Ollama's `thinking`, Responses' reasoning items (sent back, or kept with a
stored response). Templates that render it (Qwen 3, GLM) then extend the last prompt
(tests/test_templates_golden.py)."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from fake_engine import FakeEngine
from llamad.app import create_app
from llamad.config import Config
from llamad.engine import Prompt
from llamad.engine.chat import Chat

THOUGHT = "Paris is asked for; call the tool."
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


class HistoryEngine(FakeEngine):
    """Records the assistant turns (content, reasoning) of each rendered chat."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.turns: list[list[tuple[str, str]]] = []

    def _prepare(self, chat: Chat) -> Prompt:
        if any(m.role == "user" and "weather" in m.content for m in chat.messages):
            self.turns.append([(m.content, m.reasoning) for m in chat.messages if m.role == "assistant"])
        return super()._prepare(chat)


OPENAI = {
    "model": "m",
    "tools": [TOOL],
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": THOUGHT,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    ],
}
ANTHROPIC = {
    "model": "m",
    "max_tokens": 16,
    "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": THOUGHT, "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "tool_use", "id": "c1", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "18 C"}]},
    ],
}
OLLAMA = {
    "model": "m",
    "stream": False,
    "tools": [TOOL],
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "thinking": THOUGHT,
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 C"},
    ],
}
RESPONSES = {
    "model": "m",
    "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "input": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": THOUGHT}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
    ],
}


@pytest.mark.parametrize(
    ("path", "payload"),
    [("/v1/chat/completions", OPENAI), ("/v1/messages", ANTHROPIC), ("/api/chat", OLLAMA), ("/v1/responses", RESPONSES)],
)
async def test_each_face_hands_the_reasoning_it_was_sent_to_the_template(path: str, payload: dict) -> None:
    engine = HistoryEngine()
    async with AsyncTestClient(create_app(Config(), engine), timeout=10) as client:
        reply = await client.post(path, json=payload)
    assert reply.status_code in (200, 201), reply.text
    assert engine.turns == [[("", THOUGHT)]]


async def test_a_stored_responses_reasoning_is_part_of_the_turn_the_next_request_continues() -> None:
    """previous_response_id: the stored response's reasoning item goes with its turn."""
    engine = HistoryEngine(script=lambda generation: ["<think>", THOUGHT, "</think>", "Sunny."])
    async with AsyncTestClient(create_app(Config(), engine), timeout=10) as client:
        first = await client.post("/v1/responses", json={"model": "m", "input": "What is the weather in Paris?"})
        assert first.status_code == 200, first.text
        assert any(item["type"] == "reasoning" for item in first.json()["output"])
        second = await client.post("/v1/responses", json={"model": "m", "input": "And tomorrow?", "previous_response_id": first.json()["id"]})
        assert second.status_code == 200, second.text
    assert engine.turns[-1] == [("Sunny.", THOUGHT)]
