"""Golden renders of real published chat templates (tests/data/templates/*.jinja, copied
from llama.cpp's models/templates: what each family's GGUF carries as
tokenizer.chat_template) through the renderer the engine uses for a GGUF's own template
(llamad.engine.chat.gguf_formatter + ChatTemplate): a conversation with a system prompt,
the same with tools offered, a tool result round trip, and each family's reasoning switch.

The expected renders (tests/data/templates/golden/) were written once by this code and read
by hand; `LLAMAD_WRITE_GOLDEN=1` writes them again after an intended change.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from llamad.engine.chat import Chat, ChatMessage, ChatTemplate, ToolCall, ToolSpec, gguf_formatter
from llamad.serve.request import ModelRequest, template_switches

DATA = Path(__file__).parent / "data" / "templates"
GOLDEN = DATA / "golden"
WRITE = os.environ.get("LLAMAD_WRITE_GOLDEN") == "1"
NOW = datetime(2026, 1, 15, 9, 30)

# family -> (template file, BOS text, EOS text): the tokens each family's GGUF names.
FAMILIES = {
    "qwen3": ("Qwen-Qwen3-0.6B", "", "<|im_end|>"),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct", "", "<|im_end|>"),
    "qwen3-coder": ("Qwen3-Coder", "", "<|im_end|>"),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct", "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>"),
    "devstral": ("unsloth-mistral-Devstral-Small-2507", "<s>", "</s>"),
    "gpt-oss": ("openai-gpt-oss-120b", "<|startoftext|>", "<|return|>"),
    "gemma2": ("google-gemma-2-2b-it", "<bos>", "<eos>"),
    "deepseek-r1-qwen": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "glm-4.6": ("GLM-4.6", "", "<|endoftext|>"),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B", "", "<|im_end|>"),
}

WEATHER = ToolSpec(
    name="get_weather",
    description="The current weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
SYSTEM = ChatMessage(role="system", content="You are terse.")
ASK = ChatMessage(role="user", content="What is the weather in Paris?")
CALL = ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')])
RESULT = ChatMessage(role="tool", content="18 C, sunny", tool_call_id="call_1", name="get_weather")

CASES = {
    "plain": Chat(messages=[SYSTEM, ChatMessage(role="user", content="What is 2+2?")]),
    "tools": Chat(messages=[SYSTEM, ASK], tools=[WEATHER]),
    "tool_result": Chat(messages=[SYSTEM, ASK, CALL, RESULT], tools=[WEATHER]),
}
# Each family's reasoning switch, as the faces set it (ModelRequest -> template_switches).
SWITCHES = {
    "qwen3": ModelRequest(template_kwargs={"enable_thinking": False}),
    "smollm3": ModelRequest(template_kwargs={"enable_thinking": False}),
    "glm-4.6": ModelRequest(template_kwargs={"enable_thinking": False}),
    "gpt-oss": ModelRequest(reasoning_effort="high"),
    # llama.cpp's copy of the R1 distill template closes the think block unless asked.
    "deepseek-r1-qwen": ModelRequest(template_kwargs={"enable_thinking": True}),
}


def template_of(family: str) -> ChatTemplate:
    name, bos, eos = FAMILIES[family]
    text = (DATA / f"{name}.jinja").read_text()
    # As LlamaEngine._choose_template makes it for a GGUF's own template.
    return ChatTemplate(source="gguf", render_fn=gguf_formatter(text, bos, eos, clock=lambda: NOW), supports_tools="tools" in text)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if WRITE:
        path.write_text(text)
    assert path.exists(), f"no golden render {path.name}: run with LLAMAD_WRITE_GOLDEN=1 and read it"
    assert text == path.read_text(), f"{name} renders differently from {path.name}"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_golden_render(family: str, case: str) -> None:
    text, _, _ = template_of(family).render(CASES[case])
    check_golden(f"{family}.{case}", text)


@pytest.mark.parametrize("family", sorted(SWITCHES))
def test_golden_render_with_the_reasoning_switch(family: str) -> None:
    chat = Chat(messages=CASES["plain"].messages, switches=template_switches(SWITCHES[family]))
    text, _, _ = template_of(family).render(chat)
    check_golden(f"{family}.switch", text)
    plain, _, _ = template_of(family).render(CASES["plain"])
    assert text != plain  # the switch reached the template


def test_the_switches_change_what_the_template_writes() -> None:
    qwen3 = template_of("qwen3")
    off = qwen3.render(Chat(messages=CASES["plain"].messages, switches={"enable_thinking": False}))[0]
    on = qwen3.render(CASES["plain"])[0]
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    high = template_of("gpt-oss").render(Chat(messages=CASES["plain"].messages, switches={"reasoning_effort": "high"}))[0]
    assert "Reasoning: high" in high and "Reasoning: medium" in template_of("gpt-oss").render(CASES["plain"])[0]
    # strftime_now is the template's clock: gpt-oss writes today's date.
    assert "Current date: 2026-01-15" in high


def test_tool_results_reach_the_template_as_tool_messages() -> None:
    """A template that renders tools gets the call and the result in its own shape."""
    text = template_of("qwen2.5").render(CASES["tool_result"])[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert '"name": "get_weather", "description"' in text.split("<|im_start|>user")[0]


def test_a_template_that_refuses_the_conversation_gets_one_it_accepts(caplog: pytest.LogCaptureFixture) -> None:
    """Gemma 2's template raises on a system message and on a tool message; the render
    folds the system prompt into the first user turn and writes the tool turn as text."""
    import structlog

    with structlog.testing.capture_logs() as logs:
        text = template_of("gemma2").render(CASES["tool_result"])[0]
    assert text.startswith("<bos><start_of_turn>user\nYou are terse.\n\nWhat is the weather in Paris?<end_of_turn>\n")
    assert "<tool_response" in text and text.endswith("<start_of_turn>model\n")
    adapted = [entry for entry in logs if entry["event"] == "chat_template_adapted"]
    assert adapted and "System role not supported" in adapted[0]["refused"]


def test_a_conversation_no_shape_fixes_still_fails() -> None:
    template = ChatTemplate(
        source="gguf", render_fn=gguf_formatter("{{ raise_exception('never') }}", "", ""), supports_tools=False
    )
    with pytest.raises(ValueError, match="never"):
        template.render(CASES["plain"])


def test_tools_the_template_refused_still_reach_the_model() -> None:
    """A template that renders tools but refuses a tool turn: the adapted render writes the
    calls and results as text, and the offered tools go into the system prompt as text
    (the tools layer had left them to the template)."""
    text = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if tools %}[{{ tools | length }} tools]{% endif %}<assistant>"
    )
    template = ChatTemplate(source="gguf", render_fn=gguf_formatter(text, "", ""), supports_tools=True)
    assert "[1 tools]" in template.render(CASES["tools"])[0]  # no tool turn: the template's own rendering
    rendered = template.render(CASES["tool_result"])[0]
    assert '<system>You are terse.\n\nYou may call these tools:\n<tools>\n{"name": "get_weather"' in rendered
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response" in rendered and "[1 tools]" not in rendered


@pytest.mark.parametrize("family", ["qwen3", "glm-4.6"])
def test_a_tool_turns_reasoning_sent_back_makes_the_next_prompt_extend_the_last(family: str) -> None:
    """Qwen 3 and GLM render the reasoning of the assistant turns since the last user
    message (`reasoning_content`). Sent back by the client (ChatMessage.reasoning), it
    makes the next prompt begin with the last prompt and what the model wrote after it, so
    the prefix cache reuses all of it; left out (as before), the prompt changed right after
    the last prompt, and everything from there was read again."""
    template = template_of(family)
    ask = Chat(messages=[SYSTEM, ASK], tools=[WEATHER])
    first, _, _ = template.render(ask)
    thought = "The user wants Paris; I should call get_weather."
    call = ChatMessage(role="assistant", content="", tool_calls=CALL.tool_calls, reasoning=thought)
    second, _, _ = template.render(Chat(messages=[SYSTEM, ASK, call, RESULT], tools=[WEATHER]))
    assert second.startswith(first)
    written = second[len(first):]  # what the model wrote after the last prompt, as the template shows it
    assert written.lstrip("\n").startswith("<think>") and thought in written.split("</think>")[0]
    without, _, _ = template.render(Chat(messages=[SYSTEM, ASK, CALL, RESULT], tools=[WEATHER]))
    assert thought not in without
