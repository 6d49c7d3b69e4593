"""Real tier: n-gram speculation on the demo model, the step loop driven step by step in this
thread over the engine's llama.cpp backend.

- greedy answers are the same tokens with and without drafts, on a prompt the answer copies
  (see COPY on why a confident one), while drafts are fed and accepted;
- after a rejected draft, llama.cpp's KV for the slot holds exactly the slot's cached
  positions (llama_memory_seq_pos_max), and the answer goes on as without the draft;
- a JSON-schema grammar with drafts on: drafts are checked against the grammar, and the
  answer is the one without them;
- seeded sampling draws the same answer with and without drafts (one draw per token either
  way, from the same distributions).
"""

from __future__ import annotations

import json
import queue
from pathlib import Path

import pytest

from conftest import TEST_MODEL, config_for_tests
from llamad.engine.chat import Chat, ChatMessage
from llamad.engine.slots import Sequence, StepLoop
from llamad.engine.speculative import Speculation
from llamad.engine.types import Generation, Prompt, Sampling

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

SPEC = Speculation(enabled=True, ngram=6, draft_max=16, draft_min=2)
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
FRUIT = "apple banana cherry date elderberry fig grape honeydew kiwi lemon mango nectarine orange papaya quince raspberry"
# A prompt whose answer the demo model copies with confidence. Logits differ with the shape of
# the batch they are computed in (a drafted entry's row against a one-token step's, by up
# to ~0.5 here), so where two tokens are nearly tied the greedy choice may differ with and
# without drafts, as it does between llama-server's batch shapes; a confident copy has no
# such ties. (A source file's copy had one: 12.83 against 12.79, 54 tokens in.)
COPY = "Copy this list exactly:\n" + "\n".join(f"{i}. {fruit}" for i, fruit in enumerate(FRUIT.split(), 1))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from llamad.engine.llama import LlamaEngine

    config = config_for_tests(
        tmp_path_factory.mktemp("spec"), MODEL_PATH=TEST_MODEL, PARALLEL="2", N_CTX="2048", N_THREADS="2",
        LLAMAD_SPECULATIVE_ENABLED="true",
    )
    engine = LlamaEngine(config, Path(TEST_MODEL))
    engine._load()
    engine.configured = engine.loop.speculation, engine.info["speculative"]
    engine.loop.close()  # the tests step a loop of their own over the backend, in this thread
    yield engine
    engine.close()


def test_the_engine_speculates_with_the_configured_table_and_says_so(engine):
    # [speculative] turned on, with its default sizes; `llamad check` logs info["speculative"].
    assert engine.configured == (Speculation(enabled=True, ngram=12, draft_max=32, draft_min=2), "ngram 12, draft 2..32 tokens")
    # On the CPU, llama.cpp's matrix kernels take rows in fours: drafts end a step on an edge.
    on_gpu = not engine.info["gpu_layers_offloaded"].startswith("0")
    assert engine.backend.batch_rows == (1 if on_gpu else 4)


def chat_tokens(engine, content: str) -> list[int]:
    return engine._prepare(Chat(messages=[ChatMessage(role="user", content=content)])).tokens


def fresh_loop(engine, speculation: Speculation | None) -> StepLoop:
    backend = engine.backend
    for slot in range(backend.n_slots):
        backend.forget(slot, 0)  # every run reads its prompt cold, in the same chunks
    return StepLoop(backend, speculation=speculation)


def stepped(loop: StepLoop, seq: Sequence, steps: int = 400, after_step=lambda: None) -> list:
    """Submits `seq` and steps the loop until it ends (`after_step` after each step); what it
    put out: text pieces, or TokenLogprob entries when `logprobs` is asked."""
    loop.submit(seq)
    for _ in range(steps):
        if seq.ended:
            break
        loop.step()
        after_step()
    assert seq.ended
    items = []
    while True:
        try:
            item = seq.out.get_nowait()
        except queue.Empty:
            break
        if isinstance(item, BaseException):
            raise item
        items.append(item)
    return items


def run(loop: StepLoop, tokens: list[int], max_tokens: int, steps: int = 400, **options) -> tuple[list, Sequence]:
    options.setdefault("sampling", GREEDY)
    seq = Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=max_tokens, **options))
    return stepped(loop, seq, steps), seq


def answer(loop: StepLoop, tokens: list[int], max_tokens: int, steps: int = 400, **options) -> tuple[str, Sequence]:
    items, seq = run(loop, tokens, max_tokens, steps, **options)
    return "".join(item for item in items if isinstance(item, str)), seq


def kv_positions(engine, slot: int) -> tuple[int, int]:
    import llama_cpp

    memory = engine.backend.memory
    return llama_cpp.llama_memory_seq_pos_min(memory, slot), llama_cpp.llama_memory_seq_pos_max(memory, slot)


def test_greedy_answers_are_the_same_with_drafts_which_are_fed_and_accepted(engine):
    tokens = chat_tokens(engine, COPY)
    plain, _ = answer(fresh_loop(engine, None), tokens, 120)
    loop = fresh_loop(engine, SPEC)
    drafted, seq = answer(loop, tokens, 120)
    assert "16. raspberry" in plain  # the demo model copies
    assert drafted == plain
    assert loop.stats.drafted > 0 and loop.stats.accepted > loop.stats.drafted // 2, loop.stats
    # Tokens per decode step: well over one.
    answer_steps = loop.stats.steps - 1
    assert 120 / answer_steps > 1.5, loop.stats


class ScriptedDrafter:
    """Stands in for the n-gram lookup: one given draft, then none."""

    draft_min = 1

    def __init__(self, draft: list[int]):
        self.drafts = [draft]

    def draft(self, limit: int) -> list[int]:
        return self.drafts.pop()[:limit] if self.drafts else []

    def append(self, token: int) -> None:
        pass

    def verified(self, drafted: int, accepted: int) -> None:
        self.outcome = (drafted, accepted)

    def release(self) -> None:
        pass


def test_a_rejected_draft_leaves_nothing_in_llama_cpps_kv_and_the_answer_goes_on(engine):
    tokens = chat_tokens(engine, COPY)
    loop = fresh_loop(engine, None)
    plain, seq = answer(loop, tokens, 24)
    slot = loop.slots[0]
    ids = slot.cached[len(tokens) :]  # the answer's tokens (all but the last, never fed)
    assert len(ids) == 23

    loop = fresh_loop(engine, SPEC)
    seq = Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=24, sampling=GREEDY))
    loop.submit(seq)
    loop.step()  # the prompt; the answer's first token is sampled
    assert seq.next_token == ids[0]
    # Three right tokens, then four the model would not write here (with the next token, a
    # step of 8 entries: on a CPU the loop cuts a draft to end a step on a multiple of 4).
    wrong = [t for t in (255990, 255991, 255992, 255993) if t not in ids[4:8]]
    seq.drafter = drafter = ScriptedDrafter(ids[1:4] + wrong)
    loop.step()
    assert drafter.outcome == (7, 3), drafter.outcome
    slot = seq.slot
    # The KV holds the prompt, the fed token and the three accepted ones: no rejected cell.
    assert slot.cached == tokens + ids[:4]
    assert kv_positions(engine, slot.id) == (0, len(tokens) + 3)
    assert seq.n_past == len(slot.cached) and seq.next_token == ids[4]
    assert loop.stats.rolled_back == 4
    for _ in range(100):
        if seq.ended:
            break
        loop.step()
    pieces = []
    while not seq.out.empty():
        item = seq.out.get_nowait()
        if isinstance(item, str):
            pieces.append(item)
    assert "".join(pieces) == plain
    assert kv_positions(engine, slot.id)[1] == len(slot.cached) - 1

    # A draft rejected at its first token: only the fed token stays.
    loop = fresh_loop(engine, SPEC)
    seq = Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=24, sampling=GREEDY))
    loop.submit(seq)
    loop.step()
    seq.drafter = ScriptedDrafter([255990, 255991, 255992, 255993])
    loop.step()
    assert seq.slot.cached == tokens + ids[:1]
    assert kv_positions(engine, seq.slot.id) == (0, len(tokens))
    assert seq.next_token == ids[1]


def test_a_json_schema_grammar_with_drafts_gives_the_answer_it_gives_without(engine):
    import jsonschema

    from llamad.tools.grammar import build_grammar

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "port": {"type": "integer"},
            "hosts": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "port", "hosts"],
    }
    grammar = build_grammar([], "none", True, answer_schema=schema)
    record = {"name": "gateway-service-primary", "port": 8443,
              "hosts": ["alpha.internal.example.org", "beta.internal.example.org", "gamma.internal.example.org"]}
    tokens = chat_tokens(engine, "Return this JSON object exactly as it is:\n" + json.dumps(record))
    plain, _ = answer(fresh_loop(engine, None), tokens, 120, grammar=grammar)
    loop = fresh_loop(engine, SPEC)
    drafted, _ = answer(loop, tokens, 120, grammar=grammar)
    assert drafted == plain
    jsonschema.validate(json.loads(drafted), schema)
    assert loop.stats.drafted > 0 and loop.stats.accepted > 0, loop.stats

    # The check a draft passes before it is fed: the longest prefix the grammar allows, walked
    # on a copy (the sequence's grammar is not advanced by it).
    from llamad.grammar.constraint import GrammarConstraint

    constraint = GrammarConstraint(engine.backend.vocab, grammar)
    try:
        start = engine.tokenize('{"name": "x"', add_special=False)
        refused = engine.tokenize("hello", add_special=False)[0]
        assert constraint.allowed_prefix(start + [refused] + start) == len(start)
        assert constraint.allowed_prefix(start) == len(start) and constraint.allows(start[0])
    finally:
        constraint.close()


def test_seeded_sampling_draws_the_same_answer_with_drafts(engine):
    sampled = Sampling(temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, seed=1234)
    tokens = chat_tokens(engine, COPY)
    # Within the copy (the list is ~60 tokens): past it, where the model is unsure, a draw
    # may differ with the batch shape's logits, as it may between two llama-server runs.
    plain, _ = answer(fresh_loop(engine, None), tokens, 50, sampling=sampled)
    loop = fresh_loop(engine, SPEC)
    drafted, _ = answer(loop, tokens, 50, sampling=sampled)
    assert drafted == plain
    assert loop.stats.accepted > 0, loop.stats


def scored(loop: StepLoop, tokens: list[int], max_tokens: int) -> tuple[list, Sequence]:
    from llamad.engine.types import TokenLogprob

    items, seq = run(loop, tokens, max_tokens, logprobs=3)
    return [item for item in items if isinstance(item, TokenLogprob)], seq


def test_log_probabilities_with_drafts_score_every_token_as_without(engine):
    """A token accepted from a draft is scored from its own entry's logits, as a token
    decoded alone is: same tokens, same alternatives, log probabilities equal up to the
    batch shape's rounding."""
    tokens = chat_tokens(engine, COPY)
    plain, _ = scored(fresh_loop(engine, None), tokens, 60)
    loop = fresh_loop(engine, SPEC)
    drafted, _ = scored(loop, tokens, 60)
    assert loop.stats.accepted > 20, loop.stats  # most tokens came from drafts
    assert len(drafted) == len(plain) == 60
    assert [e.id for e in drafted] == [e.id for e in plain]
    for with_draft, alone in zip(drafted, plain):
        assert abs(with_draft.logprob - alone.logprob) < 0.3, (with_draft, alone)
        assert len(with_draft.top) == len(alone.top) == 3
        assert with_draft.top[0].logprob == pytest.approx(with_draft.logprob) or with_draft.top[0].text != with_draft.text
