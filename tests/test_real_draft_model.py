"""Real tier: a draft model ([speculative] draft_model) on the demo model, drafting for itself
(the one pair with the same vocabulary on this machine; it shows the mechanism, and cannot be
faster than the target alone). The step loop is driven step by step in this thread over the
engine's llama.cpp backend and draft context.

- greedy answers are the same tokens with and without the draft model, and its drafts are
  fed and accepted (the engine's counters, which /metrics reports);
- after every step, the draft context holds for the slot exactly the sequence's accepted
  tokens or a prefix of them (llama_memory_seq_pos_max): a rejected draft leaves nothing
  there either, with drafts rejected often (a sampled answer against greedy drafts);
- a draft model with another vocabulary (SmolLM2's) is a load error naming both files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TEST_MODEL, config_for_tests
from test_real_speculative import stepped
from llamad.engine.chat import Chat, ChatMessage
from llamad.engine.slots import Sequence, StepLoop
from llamad.engine.speculative import ModelDrafter, Speculation
from llamad.engine.types import Generation, Prompt, Sampling

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

SMOLLM = Path.home() / ".cache/llamad/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# ngram 64: the lookup matches nothing in an answer that does not copy, so every draft here
# is the draft model's.
SPEC = Speculation(enabled=True, ngram=64, draft_max=8, draft_min=2, draft_model="self", draft_p_min=0.5)
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
PROSE = "Write a short paragraph about why lighthouses were built on rocky coasts."
# A greedy answer the demo model is sure of at every token. Logits differ with the shape of
# the batch they are computed in, so where two tokens are nearly tied a greedy answer may
# differ with and without drafts (PROSE's does, 20 tokens in: 22.64, 22.58 and 22.51 for
# its three best), as it may between llama-server's batch shapes.
FRUIT = "apple banana cherry date elderberry fig grape honeydew kiwi lemon mango nectarine orange papaya quince raspberry"
COPY = "Copy this list exactly:\n" + "\n".join(f"{i}. {fruit}" for i, fruit in enumerate(FRUIT.split(), 1))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from llamad.engine.llama import LlamaEngine

    config = config_for_tests(
        tmp_path_factory.mktemp("draft"), MODEL_PATH=TEST_MODEL, PARALLEL="2", N_CTX="2048", N_THREADS="2",
        LLAMAD_SPECULATIVE_ENABLED="true", LLAMAD_SPECULATIVE_DRAFT_MODEL=TEST_MODEL,
    )
    engine = LlamaEngine(config, Path(TEST_MODEL))
    engine._load()
    engine.loop.close()  # the tests step a loop of their own over the backend, in this thread
    yield engine
    engine.close()


def chat_tokens(engine, content: str) -> list[int]:
    return engine._prepare(Chat(messages=[ChatMessage(role="user", content=content)])).tokens


def fresh_loop(engine, speculation: Speculation | None, draft: bool = True) -> StepLoop:
    backend, model = engine.backend, engine.draft_model
    for slot in range(backend.n_slots):
        backend.forget(slot, 0)  # every run reads its prompt cold, in the same chunks
        model.forget(slot, 0)
        model.held[slot].clear()
    return StepLoop(backend, speculation=speculation, draft_model=model if draft else None, engine_stats=engine.stats)


def run(loop: StepLoop, seq: Sequence, after_step=lambda: None, steps: int = 400) -> str:
    return "".join(item for item in stepped(loop, seq, steps, after_step) if isinstance(item, str))


def sequence(tokens: list[int], max_tokens: int, sampling: Sampling = GREEDY) -> Sequence:
    return Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=max_tokens, sampling=sampling))


def test_the_engine_loads_the_draft_model_and_says_so(engine):
    assert engine.draft_model is not None
    assert engine.info["speculative"] == (
        f"ngram 12, draft 2..32 tokens, draft model {Path(TEST_MODEL).name} (p_min 0.75)"
    )


def test_greedy_answers_are_the_same_with_the_draft_model_whose_drafts_are_accepted(engine):
    tokens = chat_tokens(engine, COPY)
    plain = run(fresh_loop(engine, None), sequence(tokens, 60))
    before = engine.stats.draft_tokens, engine.stats.draft_accepted
    loop = fresh_loop(engine, SPEC)
    seq = sequence(tokens, 60)
    drafted = run(loop, seq)
    assert "9. kiwi\n10. lemon" in plain
    assert drafted == plain
    assert isinstance(seq.drafter, ModelDrafter) and seq.drafter.source == "model"
    # The counters /metrics reports: a model drafting for itself is nearly always right.
    fed, accepted = engine.stats.draft_tokens - before[0], engine.stats.draft_accepted - before[1]
    assert fed > 20 and accepted > 0.8 * fed, (fed, accepted)
    # Fewer target steps than tokens (what a real, cheaper draft model turns into speed).
    assert loop.stats.steps - 1 < 60 / 1.5, loop.stats


def test_a_rejected_draft_leaves_no_cell_in_the_draft_context(engine, monkeypatch):
    # A sampled answer against greedy drafts: drafts are rejected often. The cost rule would
    # soon stop such drafts (they do not pay); here every draft is fed, whatever it costs.
    from llamad.engine import slots

    monkeypatch.setattr(slots, "worthwhile_length", lambda p, share, costs, width, longest, shortest=1, rows=1: longest)
    sampled = Sampling(temperature=1.5, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=7)
    loop = fresh_loop(engine, Speculation(enabled=True, ngram=64, draft_max=6, draft_min=2, draft_p_min=0.0))
    model = engine.draft_model
    seq = sequence(chat_tokens(engine, PROSE), 80, sampled)
    checked = []

    def draft_context_follows_the_answer():
        drafter = seq.drafter
        if seq.ended or drafter is None or not isinstance(drafter, ModelDrafter):
            return
        slot = drafter.slot
        held = model.held[slot]
        accepted = drafter.history  # the prompt and every token the target kept
        assert held == accepted[: len(held)], "the draft context holds a token the target did not keep"
        assert model.positions(slot) == len(held) - 1, "the draft context's cells are not the tokens it says it holds"
        checked.append(len(held))

    run(loop, seq, draft_context_follows_the_answer)
    assert loop.stats.drafted - loop.stats.accepted > 10, loop.stats  # rejections happened
    assert loop.stats.accepted > 0, loop.stats
    assert len(checked) > 10 and max(checked) > len(seq.tokens)


def test_a_draft_model_with_another_vocabulary_is_a_load_error_naming_both_files(tmp_path):
    from llamad.engine.llama import LlamaEngine

    if not SMOLLM.is_file():
        pytest.skip(f"{SMOLLM} is not here")
    config = config_for_tests(
        tmp_path, MODEL_PATH=TEST_MODEL, PARALLEL="1", N_CTX="1024", N_THREADS="2",
        LLAMAD_SPECULATIVE_DRAFT_MODEL=str(SMOLLM),
    )
    engine = LlamaEngine(config, Path(TEST_MODEL))
    try:
        with pytest.raises(RuntimeError, match="vocabularies differ") as error:
            engine._load()
        assert str(SMOLLM) in str(error.value) and str(Path(TEST_MODEL)) in str(error.value)
        assert "262144 tokens against 49152" in str(error.value)
    finally:
        engine.close()
