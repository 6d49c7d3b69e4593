"""Golden renders per family with the published templates (tests/data/templates): a call
rendered back into the history through the family's template is what the family's grammar
lets the model write, parses back to the same call, and the next turn's prompt extends the
last one (so the prefix cache reuses it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.engine.chat import Chat, ChatMessage, ChatTemplate, ToolCall, ToolSpec
from llamad.tools.formats import detect
from test_tool_formats import family_plan, run_parser, summary  # noqa: F401
from test_tools_grammar import checker  # noqa: F401

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = ToolSpec(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]},
)
ARGS = {"city": "Paris", "days": 3}
# (template, family, the text that ends the assistant's call turn in the rendered history)
FAMILIES = [
    ("Qwen-Qwen2.5-7B-Instruct", "hermes", "<|im_end|>"),
    ("Qwen-Qwen3-0.6B", "hermes", "<|im_end|>"),
    ("Qwen3-Coder", "qwen3-coder", "<|im_end|>"),
    ("Qwen3.5-4B", "qwen3-coder", "<|im_end|>"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3", "<|eot_id|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral", "</s>"),
    ("unsloth-mistral-Devstral-Small-2507", "mistral-args", "</s>"),
    ("openai-gpt-oss-120b", "harmony", "<|call|>"),
    ("GLM-4.6", "glm", "<|observation|>"),
]


def template(name: str) -> ChatTemplate:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    text = (TEMPLATES / f"{name}.jinja").read_text()
    return ChatTemplate(source="gguf", render_fn=Jinja2ChatFormatter(template=text, eos_token="</s>", bos_token="<s>"), supports_tools=True)


def turns(name: str) -> tuple[str, str]:
    """(prompt of the first turn, prompt of the next turn with the call and its result)."""
    chat_template = template(name)
    user = ChatMessage("user", "Weather in Paris for 3 days?")
    first = chat_template.render(Chat([user], tools=[WEATHER]))[0]
    call = ToolCall("call_Q2VUS9pXkbT3mE8aLr0cHw1Z", "get_weather", '{"city": "Paris", "days": 3}')
    history = [user, ChatMessage("assistant", "", tool_calls=[call]),
               ChatMessage("tool", "18 C", tool_call_id=call.id, name="get_weather")]
    return first, chat_template.render(Chat(history, tools=[WEATHER]))[0]


@pytest.mark.parametrize("name,family,end", FAMILIES)
def test_rendered_call_is_the_family_format_and_extends_the_last_prompt(checker, name, family, end):
    assert detect((TEMPLATES / f"{name}.jinja").read_text()).name == family
    first, second = turns(name)
    assert second.startswith(first), "the next turn's prompt must extend the last one"
    written = second[len(first) : second.index(end, len(first))]
    if "</think>" in written:  # Qwen3.5 renders the (empty) reasoning of a past turn
        written = written.split("</think>", 1)[1].lstrip("\n")
    planned = family_plan(family, tools=[WEATHER])
    assert checker.accepts(planned.grammar, written), written
    assert summary(run_parser(planned, list(written))) == ("", [("get_weather", ARGS)])


def test_glm_47_renders_its_calls_without_newlines_and_the_grammar_takes_them(checker):
    """GLM 4.7's template opens <think> in the generation prompt and closes it in the history,
    so its next prompt cannot extend the last one; the call it renders is still GLM's."""
    assert detect((TEMPLATES / "GLM-4.7-Flash.jinja").read_text()).name == "glm"
    first, second = turns("GLM-4.7-Flash")
    assert first.endswith("<|assistant|><think>")
    written = second.split("<|assistant|>", 1)[1].split("<|observation|>", 1)[0]
    assert written.startswith("</think>")
    written = written[len("</think>") :]
    assert written == "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
    planned = family_plan("glm", tools=[WEATHER])
    assert checker.accepts(planned.grammar, written)
    assert summary(run_parser(planned, list(written))) == ("", [("get_weather", ARGS)])
