"""Tool formats per family: detection from the published templates (tests/data/templates,
copied from llama.cpp's models/templates), grammar round trips and streamed parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamad.tools.formats import HARMONY_REASONING, THINK_REASONING, detect

TEMPLATES = Path(__file__).parent / "data" / "templates"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize(
    "name,expected,reasoning",
    [
        ("Qwen-Qwen2.5-7B-Instruct", "hermes", None),
        ("Qwen-Qwen3-0.6B", "hermes", THINK_REASONING),
        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes", None),
        ("Qwen3-Coder", "qwen3-coder", None),
        ("Qwen3.5-4B", "qwen3-coder", THINK_REASONING),
        ("meta-llama-Llama-3.1-8B-Instruct", "llama3", None),
        ("meta-llama-Llama-3.2-3B-Instruct", "llama3", None),
        ("mistralai-Mistral-Nemo-Instruct-2407", "mistral", None),
        ("unsloth-mistral-Devstral-Small-2507", "mistral-args", None),
        ("Mistral-Small-3.2-24B-Instruct-2506", "mistral-args", None),
        ("openai-gpt-oss-120b", "harmony", HARMONY_REASONING),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "hermes", THINK_REASONING),
        ("google-gemma-2-2b-it", "hermes", None),
    ],
)
def test_detects_each_published_template(name, expected, reasoning):
    fmt = detect(template(name))
    assert (fmt.name, fmt.reasoning) == (expected, reasoning)


def test_no_template_is_hermes_and_think_comes_from_the_vocabulary():
    assert detect(None).name == "hermes"
    assert detect("", {"<think>", "</think>"}).reasoning == THINK_REASONING
    assert detect("{{ messages }} {{ tools }}").name == "json"
