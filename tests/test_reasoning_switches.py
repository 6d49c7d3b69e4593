"""The clients' reasoning switches reach the chat template, once, through the neutral
request: OpenAI chat's `chat_template_kwargs` and `reasoning_effort`, Responses'
`reasoning.effort`, Anthropic's `thinking` (and its `budget_tokens`, enforced by closing
the reasoning), Ollama's `think`. The /think and /clean routes keep their meaning."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from fake_engine import FakeEngine
from llamad.app import create_app
from llamad.config import Config
from llamad.engine.chat import Chat
from llamad.engine import Prompt

USER = [{"role": "user", "content": "Say hello."}]


class SwitchEngine(FakeEngine):
    """Records the template switches each rendered chat came with."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.switches: list[dict[str, Any]] = []

    def _prepare(self, chat: Chat) -> Prompt:
        if any(m.content == "Say hello." for m in chat.messages):  # the request's, not the engine's own probes
            self.switches.append(dict(chat.switches))
        return super()._prepare(chat)


@asynccontextmanager
async def serve(engine: FakeEngine) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(create_app(Config(), engine), timeout=10) as client:
        yield client


CASES = [
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False}),
    ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "high"}, {"reasoning_effort": "high"}),
    # An explicit template kwarg wins over the face's own field.
    (
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "high", "chat_template_kwargs": {"reasoning_effort": "low"}},
        {"reasoning_effort": "low"},
    ),
    ("/v1/chat/completions", {"messages": USER}, {}),
    ("/v1/chat/completions/think", {"messages": USER, "chat_template_kwargs": {"enable_thinking": True}}, {"enable_thinking": True}),
    ("/v1/responses", {"input": "Say hello.", "reasoning": {"effort": "low"}}, {"reasoning_effort": "low"}),
    ("/v1/messages", {"max_tokens": 16, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 1024}}, {"enable_thinking": True}),
    ("/v1/messages", {"max_tokens": 16, "messages": USER, "thinking": {"type": "disabled"}}, {"enable_thinking": False}),
    ("/v1/messages/clean", {"max_tokens": 16, "messages": USER, "thinking": {"type": "adaptive"}}, {"enable_thinking": True}),
    ("/v1/messages", {"max_tokens": 16, "messages": USER}, {}),
    ("/api/chat", {"model": "m", "stream": False, "messages": USER, "think": False}, {"enable_thinking": False}),
    ("/api/chat", {"model": "m", "stream": False, "messages": USER, "think": True}, {"enable_thinking": True}),
    ("/api/chat", {"model": "m", "stream": False, "messages": USER, "think": "high"}, {"enable_thinking": True, "reasoning_effort": "high"}),
    ("/api/generate", {"model": "m", "stream": False, "prompt": "Say hello.", "think": False}, {"enable_thinking": False}),
]


@pytest.mark.parametrize(("path", "payload", "switches"), CASES)
async def test_each_face_passes_its_switch_to_the_template(path: str, payload: dict, switches: dict) -> None:
    engine = SwitchEngine()
    async with serve(engine) as client:
        reply = await client.post(path, json=payload)
    assert reply.status_code in (200, 201), reply.text
    assert engine.switches == [switches]


def endless_reasoning(generation: Any) -> list[str]:
    """A model that thinks until it is stopped; once its reasoning is closed, it answers."""
    if generation.prompt.text.endswith("</think>\n\n"):
        return ["The", " answer."]
    return ["<think>", "Hmm"] + [" more"] * 5000


async def test_anthropic_budget_tokens_closes_the_reasoning_and_the_answer_follows() -> None:
    engine = FakeEngine(script=endless_reasoning)
    # (limits.max_tokens_hard_cap is 1024 by default: the budget is smaller than Anthropic's minimum)
    payload = {"max_tokens": 900, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 300}}
    async with serve(engine) as client:
        message = (await client.post("/v1/messages", json=payload)).json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["content"][0]["thinking"].startswith("Hmm more more")
    assert message["content"][1]["text"] == "The answer."
    assert message["stop_reason"] == "end_turn"
    # The reasoning had its budget; the answer the tokens the request had left.
    first, second = engine.generations
    assert first.max_tokens == 300 and second.max_tokens == 900 - 300
    assert second.prompt.tokens[: len(first.prompt.tokens)] == first.prompt.tokens  # the first part's KV is reused
    assert message["usage"]["output_tokens"] == 300 + 2


async def test_a_budget_the_model_stays_under_changes_nothing() -> None:
    engine = FakeEngine(script=lambda g: ["<think>", "Short.", "</think>", "Hi", " there."])
    payload = {"max_tokens": 900, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 300}}
    async with serve(engine) as client:
        message = (await client.post("/v1/messages", json=payload)).json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["content"][1]["text"] == "Hi there."
    assert len(engine.generations) == 1 and message["usage"]["output_tokens"] == 5


async def test_the_budget_is_enforced_in_a_stream_too() -> None:
    import json

    engine = FakeEngine(script=endless_reasoning)
    payload = {"max_tokens": 900, "messages": USER, "stream": True, "thinking": {"type": "enabled", "budget_tokens": 300}}
    async with serve(engine) as client:
        reply = await client.post("/v1/messages", json=payload)
    deltas = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: ")]
    text = "".join(d["delta"].get("text", "") for d in deltas if d.get("type") == "content_block_delta")
    assert text == "The answer."
    assert len(engine.generations) == 2


def endless_analysis(generation: Any) -> list[str]:
    """gpt-oss: thinks in the analysis channel until stopped; in the final channel it answers."""
    if generation.prompt.text.endswith("<|end|><|start|>assistant<|channel|>final<|message|>"):
        return ["The", " answer."]
    return ["<|channel|>analysis<|message|>", "Hmm"] + [" more"] * 5000


async def test_the_budget_closes_gpt_oss_analysis_channel_and_opens_the_final_one() -> None:
    engine = FakeEngine(script=endless_analysis, tool_format="harmony")
    payload = {"max_tokens": 900, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 300}}
    async with serve(engine) as client:
        message = (await client.post("/v1/messages", json=payload)).json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text"], message
    assert message["content"][0]["thinking"].startswith("Hmm more more")
    assert message["content"][1]["text"] == "The answer."
    first, second = engine.generations
    assert first.max_tokens == 300 and second.max_tokens == 600
    assert second.prompt.text.endswith("<|end|><|start|>assistant<|channel|>final<|message|>")


@pytest.mark.parametrize(
    ("path", "payload", "switches"),
    [
        ("/v1/chat/completions", {"messages": USER}, {"clear_thinking": False, "enable_thinking": True}),
        # a request's own switch goes over the model's default, the others stay
        ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}},
         {"clear_thinking": False, "enable_thinking": False}),
        ("/v1/messages", {"max_tokens": 16, "messages": USER, "thinking": {"type": "disabled"}},
         {"clear_thinking": False, "enable_thinking": False}),
        ("/api/chat", {"model": "m", "stream": False, "messages": USER}, {"clear_thinking": False, "enable_thinking": True}),
    ],
)
async def test_the_models_configured_template_switches_are_under_the_requests(path: str, payload: dict, switches: dict) -> None:
    """model.chat_template_kwargs (llama-server's --chat-template-kwargs): GLM 4.7's
    clear_thinking = false, say, on every request, whatever face it comes through."""
    engine = SwitchEngine()
    engine.default_template_switches = {"clear_thinking": False, "enable_thinking": True}
    async with serve(engine) as client:
        reply = await client.post(path, json=payload)
    assert reply.status_code in (200, 201), reply.text
    assert engine.switches == [switches]
