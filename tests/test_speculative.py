"""N-gram speculation in the step loop (llamad.engine.speculative, llamad.engine.slots) with the
scripted backend: drafts from the sequence's own tokens, fed after its next token with logits
on every entry, accepted while the sampler draws the drafted token, the rejected tail rolled
back so the slot's `cached` tokens are exactly the KV's; max_tokens, the context, stop strings
and grammars bound what is drafted and what is emitted."""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass

import pytest

from fake_backend import FakeBackend, FakeDraftModel
from test_engine import collect
from test_slots import FakeSlotsEngine, generation
from llamad.engine import Generation, Prompt
from llamad.engine.slots import Sequence, StepLoop
from llamad.engine.speculative import MAX_PAUSE, DraftOdds, ModelDrafter, NgramDrafter, Speculation, StepCosts, worthwhile_length

pytestmark = pytest.mark.timeout(60)

SPEC = Speculation(enabled=True, ngram=3, draft_max=8, draft_min=2)
# The prompt holds a passage the answer copies: 20..39, then other tokens.
PASSAGE = list(range(20, 40))
PROMPT = [1, 2, 3] + PASSAGE + [90, 91, 92] + PASSAGE[:3]


def sequence(tokens: list[int], max_tokens: int = 1000, **options) -> Sequence:
    return Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=max_tokens, **options))


def texts(seq: Sequence) -> list[str]:
    items = []
    while True:
        try:
            item = seq.out.get_nowait()
        except queue.Empty:
            return [i for i in items if isinstance(i, str)]
        items.append(item)


def run_until(loop: StepLoop, done, limit: int = 500) -> None:
    for _ in range(limit):
        if done():
            return
        loop.step()
    raise AssertionError("the step loop did not get there")


def kv_matches(backend: FakeBackend, loop: StepLoop) -> None:
    """Every slot's KV holds exactly the positions of its cached tokens."""
    for slot in loop.slots:
        assert backend.kv[slot.id] == list(range(len(slot.cached))), (slot.id, backend.kv[slot.id], len(slot.cached))


# -- the lookup ----------------------------------------------------------------------------------


def test_the_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_ngram():
    drafter = NgramDrafter(3, [5, 6, 7, 8, 9, 1, 5, 6, 7, 4, 4, 2, 5, 6], draft_max=8)
    drafter.append(7)  # ... 5 6 7: last seen followed by 4 4 2 5 6 7, which then repeats
    assert drafter.draft(8) == [4, 4, 2, 5, 6, 7, 4, 4]
    assert drafter.draft(2) == [4, 4]
    drafter.append(3)  # 6 7 3: never seen
    assert drafter.draft(8) == []


def test_a_draft_shorter_than_draft_min_is_not_made():
    drafter = NgramDrafter(2, [1, 2, 3, 9, 1, 2], draft_max=8, draft_min=3)
    assert drafter.draft(3) == [3, 9, 1]
    assert drafter.draft(2) == []


def test_a_loop_is_drafted_as_far_as_asked():
    drafter = NgramDrafter(2, [5, 1, 2, 3, 1, 2], draft_max=8)
    assert drafter.draft(7) == [3, 1, 2, 3, 1, 2, 3]
    run = NgramDrafter(3, [9] + [7] * 4, draft_max=8)
    assert run.draft(5) == [7] * 5


def test_drafts_grow_while_accepted_shrink_on_rejection_and_pause_after_failures():
    drafter = NgramDrafter(2, list(range(100)) + [0, 1], draft_max=32, draft_min=2)
    drafter.span = 4
    drafter.verified(4, 4)
    assert drafter.span == 8  # all accepted: twice as long
    drafter.verified(8, 3)
    assert drafter.span == 6  # partly: twice what was accepted
    drafter.verified(6, 0)
    assert drafter.span == 3 and drafter.pause == 2 and drafter.draft(8) == []
    drafter.append(2)
    drafter.append(3)
    assert drafter.pause == 0 and drafter.draft(8) == [4, 5, 6]
    for _ in range(10):
        drafter.verified(3, 0)
    assert drafter.pause == MAX_PAUSE  # a sequence whose drafts keep failing rarely drafts
    drafter.verified(3, 1)
    assert drafter.misses == 0


# -- the loop -----------------------------------------------------------------------------------------


def test_an_accepted_draft_decodes_several_tokens_in_one_step():
    # The answer copies the passage; it starts where the prompt's last 3 tokens left it.
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:])
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert "".join(texts(seq)) == "".join(f"t{t} " for t in PASSAGE[3:])
    drafted = [b for b in backend.batches if len(b["tokens"]) > 1 and all(b["outputs"])]
    assert drafted, backend.batches
    # The first answer token (23) is fed with the passage's next tokens as its draft.
    assert drafted[0]["tokens"][:3] == [23, 24, 25]
    assert loop.stats.accepted > 0 and loop.stats.accepted == loop.stats.drafted - loop.stats.rolled_back
    # Fewer decode steps than tokens: 17 tokens, one prompt step.
    assert len(backend.batches) < 1 + len(PASSAGE[3:]) // 2
    kv_matches(backend, loop)


def test_a_rejected_draft_leaves_the_kv_and_the_sampled_token_goes_on():
    # The answer follows the passage for 5 tokens, then departs from it (an edit).
    answer = PASSAGE[3:8] + [77, 78, 79, 80]
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: answer)
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT)
    loop.submit(seq)
    # Step by step: after every step the slot's cached tokens are the KV's, and they are
    # the prompt and the answer so far, but for the sampled token not yet fed.
    emitted: list[str] = []
    for _ in range(50):
        if seq.ended:
            break
        loop.step()
        emitted += texts(seq)
        kv_matches(backend, loop)
        slot = loop.slots[0]
        if seq.slot is not None and not seq.prefilling:
            assert slot.cached == PROMPT + answer[: len(emitted) - 1]
            assert seq.n_past == len(slot.cached)
    assert "".join(emitted) == "".join(f"t{t} " for t in answer)
    assert loop.stats.rolled_back > 0
    assert loop.stats.accepted < loop.stats.drafted


def test_a_draft_never_runs_past_max_tokens_or_the_context():
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:])
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT, max_tokens=6)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert texts(seq) == [f"t{t} " for t in PASSAGE[3:9]]
    # Each step fed at most what max_tokens still allowed: the next token and a draft whose
    # every token, accepted, would still be within the limit.
    fed_answer = [t for b in backend.batches[1:] for t in b["tokens"]]
    assert len(fed_answer) <= 6

    backend = FakeBackend(n_slots=1, n_ctx=len(PROMPT) + 5, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:])
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert len(texts(seq)) == 5
    assert max(len(held) for held in backend.kv.values()) <= len(PROMPT) + 5


def test_a_draft_the_grammar_refuses_is_cut_before_the_refused_token():
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:12])
    backend.forbidden = {27}
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    fed = [b["tokens"] for b in backend.batches[1:]]
    # 23's draft stops before 27; no draft ever carries it.
    assert fed[0] == [23, 24, 25, 26]
    assert not any(27 in tokens[1:] for tokens in fed)
    assert "".join(texts(seq)) == "".join(f"t{t} " for t in PASSAGE[3:12])
    kv_matches(backend, loop)


def test_no_drafts_for_a_request_that_turns_speculation_off_nor_while_a_prompt_is_read():
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:])
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT, speculative=False)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert loop.stats.drafted == 0 and all(len(b["tokens"]) == 1 for b in backend.batches[1:])

    # Off in the configuration, on for the request that asks.
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:])
    loop = StepLoop(backend, speculation=Speculation(enabled=False, ngram=3, draft_max=8, draft_min=2))
    plain, asking = sequence(PROMPT), sequence(PROMPT + [5], speculative=True)
    loop.submit(plain)
    run_until(loop, lambda: plain.ended)
    assert loop.stats.drafted == 0
    loop.submit(asking)
    run_until(loop, lambda: asking.ended)
    assert loop.stats.drafted > 0

    # A stream that could draft does not while another request's prompt is in the batch.
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:] * 3)
    loop = StepLoop(backend, speculation=SPEC)
    first = sequence(PROMPT)
    loop.submit(first)
    run_until(loop, lambda: loop.stats.drafted > 0)
    second = sequence(list(range(200, 260)))
    loop.submit(second)
    run_until(loop, lambda: not second.prefilling)
    reading = [b for b in backend.batches if any(200 <= t < 260 for t in b["tokens"])]
    assert reading and all(b["slots"].count(0) == 1 for b in reading)  # the stream fed its next token alone


# -- what a draft is worth ------------------------------------------------------------------------


def linear_costs(plain: float, entry: float, widths=(1, 2, 4, 8, 16, 32, 64)) -> StepCosts:
    costs = StepCosts()
    for width in widths:
        costs.measured(width, plain + entry * (width - 1))
    return costs


def test_a_draft_holds_the_tokens_whose_expected_saving_beats_their_cost():
    # The j-th token is kept with probability p**j and saves one plain step (10 ms); each
    # costs 4 ms: it pays while 0.8**j > 0.4, so 4 tokens (0.8**4 = 0.41, 0.8**5 = 0.33).
    costs = linear_costs(0.010, 0.004)
    assert worthwhile_length(0.8, 0.010, costs, 1, 32) == 4
    assert worthwhile_length(0.95, 0.010, linear_costs(0.010, 0.0005), 1, 32) == 32  # a copy, cheap entries
    assert worthwhile_length(0.5, 0.010, linear_costs(0.010, 0.006), 1, 32) == 0  # dearer than it is worth
    # A draft that barely pays is not fed: one token at 0.6 saves 6 ms for 4, under the
    # margin (a quarter of the 10 ms share).
    assert worthwhile_length(0.6, 0.010, costs, 1, 32) == 0
    assert worthwhile_length(0.8, 0.010, costs, 1, 32, shortest=5) == 5  # the best is under draft_min: the best from it
    assert worthwhile_length(0.8, 0.010, costs, 1, 32, shortest=12) == 0  # none from 12 on gains
    assert worthwhile_length(0.8, 0.010, StepCosts(), 1, 16) == 16  # nothing measured yet
    # A wide batch is cheaper per entry than a narrow one (a CPU's matrix kernels): 10 ms
    # each for the first 3 entries, then 0.25 ms. A draft of 3 does not pay (2.4 tokens
    # kept of 3 for 30 ms); one of 32 does (8.7 kept for 37 ms).
    concave = StepCosts()
    for width, seconds in ((1, 0.010), (4, 0.040), (36, 0.048)):
        concave.measured(width, seconds)
    assert worthwhile_length(0.9, 0.010, concave, 1, 3) == 0
    assert worthwhile_length(0.9, 0.010, concave, 1, 32) == 32
    # Wider than measured, a step is taken to cost what the widest did: a draft is tried.
    assert concave.at(100) == 0.048 and abs(concave.at(20) - 0.044) < 1e-9
    odds = DraftOdds()
    assert odds.p == 0.8
    for _ in range(5):
        odds.verified(8, 1)  # one kept, then a break-off, again and again
    assert 0.45 < odds.p < 0.6
    odds.verified(8, 8)
    assert odds.p > 0.6  # a wholly kept draft: no break-off counted


def test_where_the_kernels_take_rows_in_fours_a_draft_ends_the_step_on_an_edge():
    # Linear costs, so the unaligned best would be the whole draft; with rows of 4 the step
    # ends on a multiple of 4 entries, the width so far included.
    cheap = linear_costs(0.010, 0.0005)
    assert worthwhile_length(0.95, 0.010, cheap, 1, 32) == 32
    assert worthwhile_length(0.95, 0.010, cheap, 1, 32, rows=4) == 31  # 32 entries with the next token
    assert worthwhile_length(0.95, 0.010, cheap, 4, 32, rows=4) == 32  # four streams' next tokens first
    assert worthwhile_length(0.95, 0.010, cheap, 6, 32, rows=4) == 30
    assert worthwhile_length(0.95, 0.010, StepCosts(), 1, 32, rows=4) == 31  # nothing measured yet
    # A draft too short to reach an edge is weighed as it is.
    assert worthwhile_length(0.95, 0.010, cheap, 1, 2, shortest=2, rows=4) == 2
    # A copy (p = 0.99) on the demo model's CPU costs (docs/benchmark.md), where only 24 and
    # 33 entries were measured: the line between them makes 33 look best, which is the
    # dearest width near it (189 ms; 32 took 167). With rows of 4 the loop feeds 32, and
    # measures it.
    measured = StepCosts()
    for width, ms in ((1, 17), (24, 131), (33, 189)):
        measured.measured(width, ms / 1000)
    assert worthwhile_length(0.99, 0.017, measured, 1, 32) == 32
    assert worthwhile_length(0.99, 0.017, measured, 1, 32, rows=4) == 31


def test_the_step_loop_cuts_drafts_to_the_backends_rows():
    def widths(rows: int) -> list[int]:
        backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:], batch_rows=rows)
        loop = StepLoop(backend, speculation=Speculation(enabled=True, ngram=3, draft_max=16, draft_min=2))
        seq = sequence(PROMPT)
        loop.submit(seq)
        run_until(loop, lambda: seq.ended)
        kv_matches(backend, loop)
        return [len(b["tokens"]) for b in backend.batches[1:]]

    free = widths(1)
    assert any(w % 4 for w in free if w > 1), free  # the drafts' own lengths: 1 + 2, 1 + 4, ...
    assert all(w % 4 == 0 for w in widths(4) if w > 3), widths(4)


@dataclass
class TimedBackend(FakeBackend):
    """Steps take time on a clock of its own: 10 ms, plus `entry_s` per entry beyond one."""

    entry_s: float = 0.0
    sample_s: float = 0.0  # per row sampled (a sampler chain over the whole vocabulary)
    now: float = 0.0

    def decode(self, tokens, positions, slots, outputs):
        code = super().decode(tokens, positions, slots, outputs)
        self.now += 0.010 + self.entry_s * (len(tokens) - 1)
        return code

    def sample(self, sampler, index):
        self.now += self.sample_s
        return super().sample(sampler, index)


def drafted_steps_on(entry_s: float, sample_s: float = 0.0) -> tuple[list[int], str]:
    """A sequence that re-enters the prompt's passage, follows it for three tokens and leaves
    it, over and over (what a numbered log does): its drafts keep two or three tokens each.
    Returns the draft lengths of its steps in order, and what it wrote."""
    answer: list[int] = [23]
    for i in range(12):
        answer += [24, 60 + i, 20, 21, 22, 23]
    backend = TimedBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: answer, entry_s=entry_s, sample_s=sample_s)
    loop = StepLoop(backend, speculation=Speculation(enabled=True, ngram=3, draft_max=16, draft_min=2))
    loop.clock = lambda: backend.now
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    kv_matches(backend, loop)
    return [len(b["tokens"]) - 1 for b in backend.batches[1:]], "".join(texts(seq))


def test_drafts_stop_where_a_drafted_entry_costs_more_than_it_saves():
    cheap, cheap_text = drafted_steps_on(entry_s=0.0005)  # 5% of a plain step per entry
    dear, dear_text = drafted_steps_on(entry_s=0.010)  # a whole plain step per entry
    assert cheap_text == dear_text  # the answer is the same either way
    half = len(cheap) // 2
    assert sum(cheap[half:]) > 0  # cheap: drafting goes on to the end
    # Dear: once the loop has measured a drafted entry's cost, nothing is worth drafting
    # (p < 1 = the relative cost), so the second half goes one token a step.
    assert sum(dear[:half]) > 0 and sum(dear[len(dear) // 2 :]) == 0, dear


def test_what_a_drafted_entry_costs_includes_sampling_it():
    # The decode is as cheap as above, but sampling a row costs ten times the decode (a
    # sampled chain over a large vocabulary, on a slow core), so a drafted entry costs
    # nearly what a plain step does: drafting stops as in the dear case.
    cheap, _ = drafted_steps_on(entry_s=0.0005)
    sampled, _ = drafted_steps_on(entry_s=0.0005, sample_s=0.100)
    half = len(sampled) // 2
    assert sum(cheap[half:]) > 0 and sum(sampled[half:]) == 0, sampled


def test_a_new_request_drafts_once_at_least_so_a_dear_measure_is_taken_again():
    backend = TimedBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:], entry_s=0.010)
    loop = StepLoop(backend, speculation=SPEC)
    loop.clock = lambda: backend.now
    loop.step_costs = linear_costs(0.010, 0.050, widths=(1, 3, 9))  # measured where drafts were dearest
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    drafts = [len(b["tokens"]) - 1 for b in backend.batches[1:] if len(b["tokens"]) > 1]
    assert drafts == [SPEC.draft_min]  # one draft of draft_min tokens, then none
    assert loop.step_costs.at(3) < 0.110  # and the measure moved toward what it costs now


def test_kv_full_with_drafts_retries_without_them_and_the_stream_gets_what_it_would_without():
    def run(speculation):
        backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, kv_cells=len(PROMPT) + 8, script=lambda g: PASSAGE[3:])
        loop = StepLoop(backend, speculation=speculation)
        seq = sequence(PROMPT)
        loop.submit(seq)
        run_until(loop, lambda: seq.ended)
        kv_matches(backend, loop)
        return texts(seq), loop.stats

    plain, plain_stats = run(None)
    drafted, stats = run(Speculation(enabled=True, ngram=3, draft_max=16, draft_min=2))
    assert drafted == plain and len(plain) == 9  # the tokens whose KV fits, then KvFull
    assert stats.kv_full > plain_stats.kv_full == 1


def test_a_sequence_that_ends_inside_its_draft_keeps_no_unchecked_token():
    # The answer copies three tokens, then ends (EOG) where the passage goes on.
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:6])
    loop = StepLoop(backend, speculation=SPEC)
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert texts(seq) == [f"t{t} " for t in PASSAGE[3:6]]
    kv_matches(backend, loop)
    assert loop.slots[0].cached[: len(PROMPT) + 3] == PROMPT + PASSAGE[3:6]
    assert len(loop.slots[0].cached) <= len(PROMPT) + 3


# -- through the engine: limits and stop strings ---------------------------------------------------


class SpeculatingEngine(FakeSlotsEngine):
    def _load(self) -> None:
        self.loop = StepLoop(self.backend, engine_stats=self.stats, speculation=SPEC)
        self.loop.start()


@pytest.mark.asyncio
async def test_max_tokens_and_stop_strings_hold_with_drafts_and_the_counters_grow():
    # "t7 t7 ...": after a few tokens every step drafts the rest of the run of sevens.
    engine = SpeculatingEngine(parallel=2, backend=FakeBackend(n_slots=2, decode_delay=0.002, script=lambda g: [7] * 60))
    await engine.load()
    try:
        limited, stopped = await asyncio.wait_for(
            asyncio.gather(
                collect(engine, await generation(engine, "one", max_tokens=23)),
                collect(engine, Generation(prompt=(await generation(engine, "two")).prompt, max_tokens=60, stop=["t7 t7 t7 t7 t7 t7 t7 t7 t7 t7 t7 t7 t7 t7 t7 t7"])),
            ),
            timeout=30,
        )
        assert limited[0] == "t7 " * 23 and limited[1].completion_tokens == 23 and limited[1].finish_reason == "length"
        assert stopped[0] == "" and stopped[1].stop_sequence is not None
        assert engine.stats.draft_tokens > 0 and 0 < engine.stats.draft_accepted <= engine.stats.draft_tokens
        engine.loop.close()  # the loop's thread stops (it may still be retiring the stopped one)
        for slot in engine.loop.slots:
            assert engine.backend.kv[slot.id] == list(range(len(slot.cached)))
    finally:
        engine.close()


# -- configuration, the per-request switch, metrics -------------------------------------------------


def test_the_speculative_table_and_its_environment_overrides(tmp_path):
    from conftest import config_for_tests
    from llamad.config import ConfigError, load_config

    config = config_for_tests(tmp_path)
    assert (config.speculative.enabled, config.speculative.ngram, config.speculative.draft_max, config.speculative.draft_min) == (True, 12, 32, 2)  # on by default
    config = config_for_tests(tmp_path, LLAMAD_SPECULATIVE_ENABLED="false", LLAMAD_SPECULATIVE_NGRAM="8", LLAMAD_SPECULATIVE_DRAFT_MAX="16")
    assert (config.speculative.enabled, config.speculative.ngram, config.speculative.draft_max) == (False, 8, 16)
    toml = tmp_path / "spec.toml"
    toml.write_text("[speculative]\ndraft_min = 40\n")
    with pytest.raises(ConfigError, match="speculative.draft_min"):
        load_config(toml, env={})
    # The draft model: none by default; a file that is not there, or a p_min past 1, is an
    # error naming the key.
    assert (config.speculative.draft_model, config.speculative.draft_n_gpu_layers, config.speculative.draft_p_min) == ("", -1, 0.75)
    gguf = tmp_path / "small.gguf"
    gguf.write_bytes(b"GGUF")
    config = config_for_tests(tmp_path, LLAMAD_SPECULATIVE_DRAFT_MODEL=str(gguf), LLAMAD_SPECULATIVE_DRAFT_P_MIN="0.5")
    assert (config.speculative.draft_model, config.speculative.draft_p_min) == (str(gguf), 0.5)
    toml.write_text(f'[speculative]\ndraft_model = "{tmp_path / "missing.gguf"}"\n')
    with pytest.raises(ConfigError, match="speculative.draft_model.*an existing .gguf file"):
        load_config(toml, env={})
    toml.write_text("[speculative]\ndraft_p_min = 1.5\n")
    with pytest.raises(ConfigError, match="speculative.draft_p_min"):
        load_config(toml, env={})


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/messages", {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "m", "prompt": "hi"}),
        ("/api/generate", {"model": "m", "prompt": "hi", "stream": False}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
    ],
)
async def test_every_face_takes_the_speculative_header_into_the_generation(make_client, path, body):
    async with make_client() as client:
        for header, expected in ((None, None), ("off", False), ("On", True)):
            headers = {"X-Llamad-Speculative": header} if header else {}
            response = await client.post(path, json=body, headers=headers)
            assert response.status_code == 200, response.text
            assert client.engine.generations[-1].speculative is expected
        response = await client.post(path, json=body, headers={"X-Llamad-Speculative": "sometimes"})
        assert response.status_code == 400 and "X-Llamad-Speculative" in response.text


@pytest.mark.asyncio
async def test_metrics_count_drafted_and_accepted_tokens(make_client):
    async with make_client() as client:
        client.engine.stats.draft_tokens, client.engine.stats.draft_accepted = 40, 31
        text = (await client.get("/metrics")).text
        assert "llamad_speculative_draft_tokens_total 40" in text
        assert "llamad_speculative_accepted_tokens_total 31" in text


# -- a draft model (llamad.engine.speculative.ModelDrafter) ------------------------------------------
# The answer counts up from 101; the fake draft model guesses "the last token plus one", so it
# is right until the answer jumps. The prompt repeats nothing: the lookup never drafts.
COUNTING = [1, 5, 9, 13, 17, 21]


def drafting_loop(script: list[int], **guess) -> tuple[FakeBackend, FakeDraftModel, StepLoop]:
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: script)
    model = FakeDraftModel(n_slots=1, **guess)
    return backend, model, StepLoop(backend, speculation=SPEC, draft_model=model)


def draft_context_follows(model: FakeDraftModel, seq: Sequence) -> None:
    """The draft context holds the sequence's accepted tokens, or a prefix of them; what it
    says it holds (`held`) is what its cells hold."""
    drafter = seq.drafter
    assert isinstance(drafter, ModelDrafter)
    held = model.held[drafter.slot]
    assert held == model.context[drafter.slot]
    assert held == drafter.history[: len(held)], (held, drafter.history)


def test_the_draft_model_drafts_where_the_lookup_has_nothing_and_saves_steps():
    script = list(range(101, 117))
    backend, model, loop = drafting_loop(script)
    seq = sequence(COUNTING, max_tokens=len(script))  # no draft past the script's end
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert "".join(texts(seq)) == "".join(f"t{t} " for t in script)
    assert loop.stats.drafted > 0 and loop.stats.accepted == loop.stats.drafted
    assert len(backend.batches) < 1 + len(script) // 2
    # The prompt and the first token are read once, in one feed; after that each draft feeds
    # only what the last verification added (the last drafted token and the step's own).
    assert model.feeds[0] == (0, COUNTING + [101])
    assert all(len(tokens) <= 2 for _, tokens in model.feeds[1:]), model.feeds
    draft_context_follows(model, seq)
    kv_matches(backend, loop)


def test_a_rejected_model_draft_leaves_no_cell_in_the_draft_context():
    # Counting, then a jump: the draft after 104 (105, 106, ...) is rejected at 200.
    script = [101, 102, 103, 104, 200, 201, 202, 203, 204, 205]
    backend, model, loop = drafting_loop(script)
    seq = sequence(COUNTING)
    loop.submit(seq)
    emitted: list[str] = []
    while not seq.ended:
        loop.step()
        emitted += texts(seq)
        if not seq.ended and not seq.prefilling:
            draft_context_follows(model, seq)
            assert 105 not in model.context[0] or 105 in seq.drafter.history
    assert "".join(emitted) == "".join(f"t{t} " for t in script)
    assert loop.stats.accepted < loop.stats.drafted and loop.stats.rolled_back > 0
    kv_matches(backend, loop)


def test_the_lookup_drafts_first_and_the_draft_model_is_not_fed_while_it_does():
    backend = FakeBackend(n_slots=1, n_batch=64, prompt_step=64, script=lambda g: PASSAGE[3:])
    model = FakeDraftModel(n_slots=1, guess=lambda held: (999, 1.0))  # always wrong
    loop = StepLoop(backend, speculation=SPEC, draft_model=model)
    seq = sequence(PROMPT)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert "".join(texts(seq)) == "".join(f"t{t} " for t in PASSAGE[3:])
    # The copy is drafted by the lookup; the model drafts only past its end (wrongly).
    copied = [b for b in backend.batches if b["tokens"][:3] == [23, 24, 25]]
    assert copied and not any(999 in b["tokens"] for b in copied)
    assert loop.stats.accepted >= len(PASSAGE[3:]) // 2
    draft_context_follows(model, seq)


def test_a_model_draft_stops_before_an_improbable_token_and_a_short_one_is_not_fed():
    model = FakeDraftModel(n_slots=1, guess=lambda held: (held[-1] + 1, 0.9 if held[-1] < 104 else 0.3))
    lookup = NgramDrafter(SPEC.ngram, COUNTING + [101], SPEC.draft_max, SPEC.draft_min)
    drafter = ModelDrafter(lookup, model, 0, draft_max=8, draft_min=2, p_min=0.75)
    assert drafter.draft(8) == [102, 103, 104]  # 105 was guessed with p 0.3
    drafter.verified(3, 3)
    for token in (102, 103, 104):
        drafter.append(token)
    drafter.append(105)  # the step's own token
    assert drafter.draft(8) == []  # only improbable guesses from here
    assert model.held[0] == COUNTING + [101, 102, 103, 104, 105]


def test_a_model_draft_the_loop_does_not_feed_leaves_nothing_in_the_draft_context():
    # The "grammar" refuses 103: the draft after 101 (102, 103, ...) is cut to one token, too
    # short to feed. The draft model had decoded those tokens into its context; the loop
    # drops them at once (a draft the cost rule cuts to nothing goes the same way), and a
    # sequence that then ends leaves nothing either.
    script = list(range(101, 131))
    backend, model, loop = drafting_loop(script)
    backend.forbidden = {103}
    seq = sequence(COUNTING)
    loop.submit(seq)
    loop.step()  # the prompt; 101 is sampled
    loop.step()  # 101 fed alone: its draft was refused
    assert loop.stats.drafted == 0 and 103 not in model.context[0] and 103 not in seq.drafter.history
    assert model.held[0] == model.context[0] == seq.drafter.history[: len(model.held[0])]
    seq.cancel.set()
    loop.step()
    assert seq.ended
    assert model.held[0] == model.context[0] == seq.drafter.history[: len(model.held[0])]
