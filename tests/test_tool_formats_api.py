"""The engine's detected tool format reaches the one request path: the grammar the engine
gets is the family's, and the family's calls (and harmony's analysis channel) come back
as tool calls (and reasoning) on both API families, streamed and not."""

from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine, pieces
from llamad.serve.reasoning import ReasoningSplitter
from llamad.tools.formats import HARMONY_REASONING


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA}}]
ANSWERS = {
    "qwen3-coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
    "glm": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
    "mistral-args": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}',
    "harmony": '<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary'
    ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3}',
    "json": '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
}
GRAMMAR_MARK = {
    "qwen3-coder": "<function=get_weather>",
    "glm": "<arg_key>city</arg_key>",
    "llama3": '\\"parameters\\": ',
    "mistral": "[TOOL_CALLS][",
    "mistral-args": "get_weather[ARGS]",
    "harmony": " to=functions.",
    "json": '\\"arguments\\": ',
    "hermes": "<tool_call>",
}


def body(**extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, **extra}


@pytest.mark.asyncio
@pytest.mark.parametrize("family", sorted(ANSWERS))
@pytest.mark.parametrize("stream", [False, True])
async def test_family_calls_come_back_as_tool_calls(make_client, family, stream):
    engine = FakeEngine(script=lambda g: pieces(ANSWERS[family], 3), template_supports_tools=True, tool_format=family)
    async with make_client(engine) as client:
        response = await client.post("/v1/chat/completions", json=body(tool_choice="required", stream=stream))
    assert response.status_code == 200, response.text
    assert GRAMMAR_MARK[family] in engine.generations[-1].grammar
    if not stream:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}
        assert (choice["message"].get("content") or "") == ""
        return
    arguments, names, finish = "", [], None
    for line in response.text.split("\n"):
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            assert not delta.get("content"), delta
            for call in delta.get("tool_calls") or []:
                names += [call["function"]["name"]] if call["function"].get("name") else []
                arguments += call["function"].get("arguments") or ""
            finish = (chunk["choices"][0].get("finish_reason") if chunk["choices"] else None) or finish
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris", "days": 3}
    assert finish == "tool_calls"


@pytest.mark.asyncio
async def test_harmony_analysis_is_reasoning_and_final_is_text(make_client):
    text = "<|channel|>analysis<|message|>Think a bit.<|end|><|start|>assistant<|channel|>final<|message|>Hi!"
    engine = FakeEngine(script=lambda g: pieces(text, 2), template_supports_tools=True, tool_format="harmony")
    async with make_client(engine) as client:
        hidden = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        response = await client.post("/v1/chat/completions/think", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert hidden.json()["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    message = response.json()["choices"][0]["message"]
    assert message["content"] == "Hi!"
    assert message.get("reasoning_content") == "Think a bit."


def test_reasoning_splitter_takes_the_family_markers():
    splitter = ReasoningSplitter(markers=HARMONY_REASONING)
    text = "<|channel|>analysis<|message|>why<|end|><|start|>assistant<|channel|>final<|message|>ok"
    out = []
    for c in text:
        out += splitter.feed(c)
    out += splitter.finish()
    reasoning = "".join(t for k, t in out if k == "reasoning")
    answer = "".join(t for k, t in out if k == "text")
    assert reasoning == "why" and answer == "<|start|>assistant<|channel|>final<|message|>ok"


GLM_THINKING = "\n<think>The user wants Paris.</think>\n" + ANSWERS["glm"]


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_glm_calls_come_back_on_anthropic_and_ollama(make_client, stream):
    """A GLM model's call, after its reasoning, is a tool_use block on /v1/messages and an
    object-argument tool call on /api/chat; none of its markup leaks into the text."""
    engine = FakeEngine(script=lambda g: pieces(GLM_THINKING, 3), template_supports_tools=True, tool_format="glm")
    anthropic_tool = {"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    async with make_client(engine) as client:
        claude = await client.post(
            "/v1/messages", json={"model": "m", "max_tokens": 200, "messages": messages, "tools": [anthropic_tool], "stream": stream}
        )
        ollama = await client.post("/api/chat", json={"model": "m", "messages": messages, "tools": TOOLS, "stream": stream})
    assert claude.status_code == 200 and ollama.status_code == 200, (claude.text, ollama.text)
    assert all("<arg_key>city</arg_key>" in g.grammar for g in engine.generations)
    if stream:
        events = [json.loads(line[6:]) for line in claude.text.split("\n") if line.startswith("data: {")]
        start = next(e["content_block"] for e in events if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use")
        assert start["name"] == "get_weather"
        deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
        assert json.loads("".join(d.get("partial_json", "") for d in deltas)) == {"city": "Paris", "days": 3}
        assert not "".join(d.get("text", "") for d in deltas).strip()
        assert next(e for e in events if e["type"] == "message_delta")["delta"]["stop_reason"] == "tool_use"
        objects = [json.loads(line) for line in ollama.text.split("\n") if line]
    else:
        blocks = claude.json()["content"]
        assert [b for b in blocks if b["type"] == "tool_use"][0]["input"] == {"city": "Paris", "days": 3}
        assert not "".join(b.get("text", "") for b in blocks if b["type"] == "text").strip()
        assert claude.json()["stop_reason"] == "tool_use"
        objects = [ollama.json()]
    calls = [c for o in objects for c in o["message"].get("tool_calls", [])]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_weather", {"city": "Paris", "days": 3})]
    assert "<tool_call>" not in "".join(o["message"].get("content", "") for o in objects)
    assert "<think>" not in "".join(o["message"].get("content", "") for o in objects)
