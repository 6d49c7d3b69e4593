"""The family tool formats with the real llama.cpp engine: a copy of the demo GGUF carrying
a family's published template (tests/template_gguf.py) is detected as that family at load,
and a required call, decoded under the family's grammar by llama.cpp's sampler, comes back
parsed with schema-valid arguments. The demo model never learned these formats: the
grammar alone makes the call well-formed."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from conftest import TEST_MODEL
from llamad.config import Config, ModelConfig, SpeculativeConfig
from llamad.engine import Generation, Sampling
from llamad.engine.chat import Chat, ChatMessage, ToolSpec
from llamad.engine.llama import LlamaEngine
from llamad.serve.answer import answer_events, fold
from llamad.tools import ToolChoice, apply

pytestmark = pytest.mark.real

pytest.importorskip("gguf")
template_gguf = pytest.importorskip("template_gguf")

TEMPLATES = Path(__file__).parent / "data" / "templates"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = ToolSpec("get_weather", "Current weather for a city", SCHEMA)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name,family",
    [
        ("Qwen3-Coder", "qwen3-coder"),
        ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
        ("unsloth-mistral-Devstral-Small-2507", "mistral-args"),
        ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
        pytest.param("openai-gpt-oss-120b", "harmony", marks=pytest.mark.xfail(strict=False, reason="flaky on the base demo model: its greedy reasoning looped to max_tokens in two fresh-clone CI runs, passed in others")),
    ],
)
async def test_required_call_in_the_family_format(name, family):
    source = Path(TEST_MODEL)
    if not source.is_file():
        pytest.skip("the demo GGUF is not downloaded")
    path = template_gguf.template_model(source, (TEMPLATES / f"{name}.jinja").read_text())
    # The base demo model finds the call within 160 greedy tokens on the path one-token steps
    # take: a drafted entry's logits differ in the last digits, and at a near-tie its greedy
    # answer can loop in the reasoning instead (seen once in CI, harmony).
    config = Config(
        model=ModelConfig(path=str(path), n_ctx=2048, prompt_cache_bytes=0), speculative=SpeculativeConfig(enabled=False)
    )
    engine = LlamaEngine(config, path)
    await engine.load()
    try:
        assert engine.tool_format.name == family
        chat = Chat(messages=[ChatMessage("user", "Weather in Paris for 3 days?")], tools=[WEATHER])
        grammar, make_parser = apply(
            chat, ToolChoice("required"), parallel=False, response_format=None,
            template_supports_tools=engine.template_supports_tools, id_prefix="call_", tool_format=engine.tool_format,
        )
        prompt = await engine.prepare(chat, grammar)
        generation = Generation(prompt=prompt, max_tokens=160, grammar=grammar, sampling=Sampling(seed=3, temperature=0.0))
        answer = await fold(answer_events(engine, generation, keep_reasoning=True, parser=make_parser()))
        assert answer.finish is not None and answer.finish.reason == "tool_calls", (answer.text, answer.reasoning)
        [call] = answer.tool_calls
        assert call.name == "get_weather"
        import json

        jsonschema.validate(json.loads(call.arguments), SCHEMA)
    finally:
        engine.close()
