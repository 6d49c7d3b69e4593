"""Chat template choice with the real llama.cpp engine: the GGUF's own template, the
`chat_format` override, and for a GGUF without one: a plain transcript for a base model (the
demo model), the architecture's format for a tuned one.

The tiny model (tests/tiny_gguf.py) carries a Jinja template that opens `<think>` and
renders tools, so the same test also shows both follow the template.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TEST_MODEL
from llamad.serve.answer import answer_events, fold
from llamad.engine.chat import Chat, ChatMessage, ToolSpec
from llamad.config import Config, ModelConfig
from llamad.engine import Generation, Sampling
from llamad.engine.llama import LlamaEngine

pytestmark = pytest.mark.real

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_gguf import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


async def _engine(path: Path, chat_format: str = "") -> LlamaEngine:
    config = Config(model=ModelConfig(path=str(path), n_ctx=512, chat_format=chat_format, prompt_cache_bytes=0))
    engine = LlamaEngine(config, path)
    await engine.load()
    return engine


HELLO = Chat(messages=[ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hello")])


async def test_the_gguf_template_is_used_when_the_file_has_one(tiny_model: Path) -> None:
    engine = await _engine(tiny_model)
    try:
        assert engine.info["chat_template"] == "gguf"
        prompt = await engine.prepare(HELLO)
        assert prompt.text == "<s><|system|>Be brief.<|end|><|user|>Hello<|end|><|assistant|><think>"
        # The template opened a reasoning block: the answer starts inside it.
        assert prompt.opens_reasoning
        assert prompt.tokens[0] == 1 and prompt.tokens.count(1) == 1  # one BOS, not two
        assert engine.template_supports_tools
        with_tools = await engine.prepare(
            Chat(messages=HELLO.messages, tools=[ToolSpec(name="get_weather"), ToolSpec(name="get_time")])
        )
        assert "<|tools|>get_weather get_time <|end|>" in with_tools.text
        # Decoding runs through this template: a few noise tokens, all in the reasoning part.
        answer = await fold(answer_events(engine, Generation(prompt=prompt, max_tokens=4, sampling=Sampling(seed=1)), keep_reasoning=True))
        assert answer.finish is not None and answer.finish.usage.completion_tokens >= 1
        assert answer.text == ""
    finally:
        engine.close()


async def test_chat_format_overrides_the_gguf_template(tiny_model: Path) -> None:
    engine = await _engine(tiny_model, chat_format="chatml")
    try:
        assert engine.info["chat_template"] == "format:chatml"
        prompt = await engine.prepare(HELLO)
        assert "<|im_start|>user\nHello<|im_end|>" in prompt.text
        assert not prompt.opens_reasoning
        assert not engine.template_supports_tools
    finally:
        engine.close()


async def test_a_base_model_without_template_gets_a_transcript_that_ends_at_the_next_speaker() -> None:
    engine = await _engine(Path(TEST_MODEL))
    try:
        metadata = engine.llm.metadata if engine.llm is not None else {}
        assert "tokenizer.chat_template" not in metadata and "general.finetune" not in metadata
        assert engine.info["chat_template"] == "format:transcript"
        prompt = await engine.prepare(HELLO)
        assert prompt.text == "System: Be brief.\n\nUser: Hello\n\nAssistant:"
        assert "\nUser:" in prompt.template_stops
        # A final assistant message is continued, not closed and answered anew.
        prefilled = await engine.prepare(
            Chat(messages=HELLO.messages + [ChatMessage(role="assistant", content='{"colors": ["red",')])
        )
        assert prefilled.text == prompt.text + '{"colors": ["red",'
        # The base model ends its turn where it starts the next speaker's line: under the
        # architecture's own format (Gemma's turn tokens, which it never learned) this same
        # greedy answer ran on to the token limit.
        ask = Chat(messages=[ChatMessage(role="user", content="Reply with the word OK.")])
        generation = Generation(prompt=await engine.prepare(ask), max_tokens=200, sampling=Sampling(temperature=0.0))
        answer = await fold(answer_events(engine, generation, keep_reasoning=False))
        assert answer.finish is not None and answer.finish.reason == "stop", answer
        assert answer.text.strip() and "User:" not in answer.text
    finally:
        engine.close()


async def test_a_tuned_model_without_template_gets_its_architectures_format(tmp_path: Path) -> None:
    from tiny_gguf import write_tiny_llama

    tuned = write_tiny_llama(tmp_path / "tuned.gguf", template=None, finetune="Instruct")
    engine = await _engine(tuned)
    try:
        assert engine.info["chat_template"] == "format:llama-3"
        assert (await engine.prepare(HELLO)).text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    finally:
        engine.close()
    base = write_tiny_llama(tmp_path / "base.gguf", template=None)
    engine = await _engine(base)
    try:
        assert engine.info["chat_template"] == "format:transcript"
    finally:
        engine.close()
