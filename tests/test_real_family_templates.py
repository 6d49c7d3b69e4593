"""A family's real published template inside a GGUF (a copy of the demo model, see
tests/template_gguf.py), through the real engine: LlamaEngine picks the GGUF's template,
renders the golden conversations exactly as tests/test_templates_golden.py expects, passes
the request's switches, and tokenizes the family's markers as text the model can read."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TEST_MODEL
from llamad.config import Config, ModelConfig
from llamad.engine.chat import Chat
from llamad.engine.llama import LlamaEngine
from test_templates_golden import CASES, DATA, GOLDEN

pytestmark = pytest.mark.real

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def qwen3_model() -> Path:
    from template_gguf import template_model

    return template_model(Path(TEST_MODEL), (DATA / "Qwen-Qwen3-0.6B.jinja").read_text())


async def test_the_engine_renders_the_gguf_template_as_the_golden_renders(qwen3_model: Path) -> None:
    engine = LlamaEngine(Config(model=ModelConfig(path=str(qwen3_model), n_ctx=1024, prompt_cache_bytes=0)), qwen3_model)
    await engine.load()
    try:
        assert engine.info["chat_template"] == "gguf"
        for case, chat in sorted(CASES.items()):
            prompt = await engine.prepare(chat)
            assert prompt.text == (GOLDEN / f"qwen3.{case}.txt").read_text(), case
            # The demo vocabulary has no <|im_start|> token: it is read as text, after the
            # BOS the vocabulary asks for, once.
            assert prompt.tokens[0] == engine.llm.token_bos() and prompt.tokens.count(prompt.tokens[0]) == 1
        # The request's switch reaches the template: thinking off is an empty, closed block.
        prompt = await engine.prepare(Chat(messages=CASES["plain"].messages, switches={"enable_thinking": False}))
        assert prompt.text == (GOLDEN / "qwen3.switch.txt").read_text()
        assert not prompt.opens_reasoning
    finally:
        engine.close()
