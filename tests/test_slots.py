"""The continuous-batching step loop (llamad.engine.slots) with a scripted backend: admission,
slot choice, chunked prefill, cancellation, KV exhaustion, and the engine over it (streams
decoding together, one slot serving one request at a time, a hang-up handing its slot on,
SIGTERM drain)."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest

from fake_backend import FakeBackend
from fake_engine import FakeEngine
from test_engine import collect
from llamad.engine.chat import Chat, ChatMessage
from llamad.engine import Engine, Generation, Prompt, ShuttingDown, Token
from llamad.engine.prompt_cache import PromptStateCache
from llamad.engine.slots import WAITER_STEP, EVICT_FOR_PROMPT, MIN_PREFILL_CHUNK, Sequence, StepLoop


def sequence(tokens: list[int], max_tokens: int = 1000) -> Sequence:
    return Sequence(generation=Generation(prompt=Prompt(text="", tokens=tokens), max_tokens=max_tokens))


def outputs(seq: Sequence) -> list:
    items = []
    while True:
        try:
            items.append(seq.out.get_nowait())
        except queue.Empty:
            return items


def run_until(loop: StepLoop, done, limit: int = 2000) -> None:
    for _ in range(limit):
        if done():
            return
        loop.step()
    raise AssertionError("the step loop did not get there")


def slot_of(backend: FakeBackend, batch: dict, slot: int) -> list[int]:
    return [t for t, s in zip(batch["tokens"], batch["slots"]) if s == slot]


def test_admission_is_first_come_first_served_and_bounded_by_the_slots():
    backend = FakeBackend(n_slots=2)
    loop = StepLoop(backend)
    seqs = [sequence([1, 2, 3, 10 + i]) for i in range(3)]
    for seq in seqs:
        loop.submit(seq)
    loop.step()
    assert seqs[0].slot is not None and seqs[1].slot is not None and seqs[2].slot is None
    # Both prompts were evaluated in the same decode.
    assert sorted(backend.batches[0]["slots"]) == [0] * 4 + [1] * 4
    run_until(loop, lambda: seqs[0].ended)
    assert seqs[2].slot is None or seqs[2].slot.id == seqs[0].order - 1
    run_until(loop, lambda: all(s.ended for s in seqs))
    for seq in seqs:
        items = outputs(seq)
        assert items == [seq.cached, "t101 ", "t102 ", "t103 ", "t104 ", "t105 ", None]
    assert [s.order for s in seqs] == [1, 2, 3]


def test_a_new_prompt_goes_to_the_idle_slot_sharing_its_longest_prefix():
    backend = FakeBackend(n_slots=3)
    loop = StepLoop(backend)
    conversation_a = list(range(1, 41))
    conversation_b = list(range(100, 141))
    for tokens in (conversation_a, conversation_b):
        seq = sequence(tokens)
        loop.submit(seq)
        run_until(loop, lambda: seq.ended)
    slot_a = next(s for s in loop.slots if s.cached[:40] == conversation_a)
    slot_b = next(s for s in loop.slots if s.cached[:41] == conversation_b)
    assert slot_a is not slot_b

    # The next turn of conversation B, while the least recently used slot is A's.
    turn2 = sequence(conversation_b + [9, 9, 9])
    loop.submit(turn2)
    loop.step()
    assert turn2.slot is slot_b
    assert turn2.cached == len(conversation_b)  # only the new tokens are evaluated
    assert len(backend.batches[-1]["tokens"]) == 3

    # A prompt that shares nothing takes the empty slot; A's cache survives.
    other = sequence([500, 501, 502])
    loop.submit(other)
    loop.step()
    assert other.slot is not slot_a and other.slot is not slot_b
    assert slot_a.cached[:40] == conversation_a


def test_a_long_prompt_moves_the_idle_slots_out_of_the_kv_and_their_next_turn_comes_back():
    """A prompt with EVICT_FOR_PROMPT or more tokens to read clears the idle slots' KV (one
    unified buffer: their cells would widen every attention) after saving what they held;
    a short prompt leaves them alone; a cleared conversation's next turn is restored."""
    backend = FakeBackend(n_slots=3, n_ctx=2048, n_batch=512, prompt_step=512)
    loop = StepLoop(backend, PromptStateCache(1 << 30))
    conversation_a = list(range(1000, 1100))
    for tokens in (conversation_a, list(range(2000, 2010))):
        seq = sequence(tokens, max_tokens=3)
        loop.submit(seq)
        run_until(loop, lambda: seq.ended)
    slot_a = next(s for s in loop.slots if s.cached[:100] == conversation_a)
    assert backend.used() > 0

    short = sequence(list(range(3000, 3000 + EVICT_FOR_PROMPT - 1)), max_tokens=1)
    loop.submit(short)
    run_until(loop, lambda: short.ended)
    assert slot_a.cached[:100] == conversation_a and loop.stats.evictions == 0

    long = sequence(list(range(5000, 5000 + EVICT_FOR_PROMPT)), max_tokens=2)
    loop.submit(long)
    loop.step()
    assert loop.stats.evictions == 2  # A's slot and the short prompt's; the 10-token one was reused
    assert all(not s.cached for s in loop.slots if s is not long.slot)
    assert all(not backend.kv[s.id] for s in loop.slots if s is not long.slot)
    assert backend.kv[long.slot.id] == list(range(EVICT_FOR_PROMPT))
    # A's state was saved without its answer (fed tokens 101, 102): a next turn resends the
    # prompt, its answer maybe rendered otherwise.
    saved, shared = loop.prompt_cache.best(conversation_a + [101, 102])
    assert saved is not None and list(saved.tokens) == conversation_a and shared == 100
    run_until(loop, lambda: long.ended)

    # A's next turn: its 100 tokens come back from the saved-state cache, not recomputed.
    turn2 = sequence(conversation_a + [7, 7, 7], max_tokens=1)
    loop.submit(turn2)
    run_until(loop, lambda: turn2.ended)
    assert turn2.cached >= 100 and loop.prompt_cache.restores == 1


def test_a_prefix_whose_window_cells_were_overwritten_is_evaluated_again():
    """Gemma 3's sliding-window cache can lose the start of a long sequence (llama.cpp
    reuses cells that fell out of the window). A prompt sharing only that start evaluates
    everything again; one sharing enough of the rest still reuses it."""
    for shared, expected in ((3, 0), (40, 40)):
        backend = FakeBackend(n_slots=1, window=8)
        loop = StepLoop(backend)
        first = sequence(list(range(1, 41)), max_tokens=2)
        loop.submit(first)
        run_until(loop, lambda: first.ended)
        backend.window_dropped[0] = 5  # positions 0-4 are gone from the window layers
        turn = sequence(list(range(1, 1 + shared)) + [99, 98], max_tokens=1)
        loop.submit(turn)
        loop.step()
        assert turn.cached == expected
        assert backend.batches[-1]["tokens"] == turn.tokens[expected:]
        assert loop.slots[0].cached == turn.tokens


def test_prompt_tokens_evaluated_count_what_was_decoded_not_what_was_reused():
    from llamad.engine import EngineStats

    stats = EngineStats()
    loop = StepLoop(FakeBackend(n_slots=2, n_batch=16, prompt_step=16), engine_stats=stats)
    first = sequence(list(range(1, 41)), max_tokens=2)
    loop.submit(first)
    run_until(loop, lambda: first.ended)
    assert stats.prompt_tokens_evaluated == 40
    turn2 = sequence(list(range(1, 41)) + [9, 9, 9], max_tokens=2)
    loop.submit(turn2)
    run_until(loop, lambda: turn2.ended)
    # 40 reused; the answer's token that was never fed back, and the 3 new ones, evaluated.
    assert stats.prompt_tokens_evaluated == 40 + (43 - turn2.cached)


def test_a_long_prompt_is_fed_in_chunks_beside_the_running_stream():
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=16, script=lambda g: [7] * 300)
    loop = StepLoop(backend)
    running = sequence([1, 2, 3])
    loop.submit(running)
    run_until(loop, lambda: running.generated >= 5)
    long_prompt = sequence(list(range(1000, 1100)))
    loop.submit(long_prompt)
    first = len(backend.batches)
    run_until(loop, lambda: not long_prompt.prefilling)
    mixed = backend.batches[first:]
    assert len(mixed) >= 100 // 16  # the prompt took several steps...
    for batch in mixed:
        # ...and the running stream got a token in every one of them,
        assert len(slot_of(backend, batch, running.slot.id)) == 1
        # beside a prompt chunk within the budget.
        chunk = len(slot_of(backend, batch, long_prompt.slot.id))
        assert chunk <= backend.prompt_step
    assert sum(len(slot_of(backend, b, long_prompt.slot.id)) for b in mixed) == 100


def test_a_prompt_alone_is_fed_in_prompt_steps():
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=16)
    loop = StepLoop(backend)
    seq = sequence(list(range(1000, 1050)))
    loop.submit(seq)
    run_until(loop, lambda: not seq.prefilling)
    assert [len(b["tokens"]) for b in backend.batches] == [16, 16, 16, 2]
    assert [b["outputs"].count(True) for b in backend.batches] == [0, 0, 0, 1]


def test_a_prompt_alone_is_read_in_short_steps_while_a_request_waits():
    """With a request queued for a slot, a hang-up must hand the slot on soon: a prompt read
    alone goes in WAITER_STEP tokens a step instead of the backend's full step."""
    waiting = [False]
    backend = FakeBackend(n_slots=1, n_batch=512, prompt_step=512)
    loop = StepLoop(backend, someone_waits=lambda: waiting[0])
    seq = sequence(list(range(1000, 1600)))
    loop.submit(seq)
    run_until(loop, lambda: not seq.prefilling)
    assert [len(b["tokens"]) for b in backend.batches] == [512, 88]
    backend.batches.clear()
    waiting[0] = True
    other = sequence(list(range(5000, 5600)))
    loop.submit(other)
    run_until(loop, lambda: not other.prefilling)
    assert [len(b["tokens"]) for b in backend.batches if len(b["tokens"]) > 1] == [WAITER_STEP] * 4 + [600 - 4 * WAITER_STEP]


def test_the_chunk_beside_streams_shrinks_when_prompt_tokens_are_slow():
    loop = StepLoop(FakeBackend(n_slots=2, n_batch=512, prompt_step=512))
    loop._step_s, loop._token_s = 0.030, 0.002  # noqa: SLF001 - what _learn measures
    budget = loop._prefill_budget(generating=3)  # noqa: SLF001
    # A mixed step then costs at most about GAP_FACTOR decode-only steps.
    assert MIN_PREFILL_CHUNK <= budget <= 25
    assert loop._prefill_budget(generating=0) == 512  # noqa: SLF001


def test_a_cancelled_sequence_leaves_the_batch_and_its_slot_goes_to_the_next_at_once():
    backend = FakeBackend(n_slots=2, script=lambda g: [7] * 500)
    loop = StepLoop(backend)
    a, b, c = sequence([1, 2]), sequence([3, 4]), sequence([5, 6, 8])
    for seq in (a, b, c):
        loop.submit(seq)
    run_until(loop, lambda: a.generated >= 3 and b.generated >= 3)
    assert c.slot is None
    slot_a = a.slot.id
    b_before = b.generated
    a.cancel.set()  # the client hung up
    loop.step()
    batch = backend.batches[-1]
    assert a.ended and outputs(a)[-1] is None
    assert c.slot is not None and c.slot.id == slot_a  # started in the same step
    assert slot_of(backend, batch, slot_a) == [5, 6, 8]  # c's prompt, not a's token
    assert b.generated == b_before + 1  # b kept decoding


def test_no_kv_room_makes_the_new_prompt_wait_and_the_running_stream_finishes():
    # The running answer ends at 40 cells; the new one needs 50, but finds only 40 free.
    script = lambda g: [7] * 30 if len(g.prompt.tokens) == 10 else [8] * 5  # noqa: E731
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=16, kv_cells=60, script=script)
    loop = StepLoop(backend)
    running = sequence(list(range(10)))
    loop.submit(running)
    run_until(loop, lambda: running.generated >= 10)
    waiting = sequence(list(range(200, 245)))
    loop.submit(waiting)
    run_until(loop, lambda: running.ended and waiting.ended)
    assert loop.stats.kv_full >= 1
    streamed = [item for item in outputs(running) if isinstance(item, str)]
    assert streamed == ["t7 "] * 30  # the running answer was not cut
    assert [item for item in outputs(waiting) if isinstance(item, str)] == ["t8 "] * 5
    first_token_of_waiting = next(i for i, b in enumerate(backend.batches) if b["tokens"][-1:] == [8])
    assert first_token_of_waiting > max(i for i, b in enumerate(backend.batches) if 7 in b["tokens"])


def test_the_newest_stream_ends_with_an_error_when_running_streams_alone_overflow():
    backend = FakeBackend(n_slots=2, n_batch=64, prompt_step=16, kv_cells=30, script=lambda g: [7] * 100)
    loop = StepLoop(backend)
    first, second = sequence([1] * 5, max_tokens=20), sequence([2] * 5)  # 25 cells fit alone
    loop.submit(first)
    loop.step()
    loop.submit(second)
    run_until(loop, lambda: second.ended)
    assert isinstance(outputs(second)[-1], RuntimeError)
    assert not first.ended  # the older stream goes on
    run_until(loop, lambda: first.ended)
    assert outputs(first)[-5:] == ["t7 "] * 4 + [None]


# -- the engine glue, through Engine.stream ------------------------------------------------


class _Capacity(Engine):
    """Hands `parallel` to Engine as its capacity (FakeEngine does not pass one on)."""

    parallel = 1

    def __init__(self, **kwargs):
        super().__init__(capacity=self.parallel, **kwargs)


class FakeSlotsEngine(FakeEngine, _Capacity):
    """FakeEngine's prompts over the real step loop and a scripted backend: wired as
    LlamaEngine wires its llama.cpp backend (capacity = parallel, `_decode` = the loop's
    `generate`, the reuse forecast = the loop's)."""

    def __init__(self, parallel: int = 2, backend: FakeBackend | None = None, **kwargs):
        self.parallel = parallel
        super().__init__(**kwargs)
        self.backend = backend or FakeBackend(n_slots=parallel, decode_delay=0.005, script=lambda g: [7] * 40)
        self.loop: StepLoop | None = None

    def _load(self) -> None:
        self.loop = StepLoop(self.backend, engine_stats=self.stats)
        self.loop.start()

    def _decode(self, generation, cancel):
        assert self.loop is not None
        return self.loop.generate(generation, cancel)

    def expected_reuse(self, prompt: Prompt) -> int:
        return self.loop.forecast_reuse(prompt.tokens) if self.loop is not None else 0

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
        super().close()


async def generation(engine: FakeEngine, text: str, max_tokens: int = 100) -> Generation:
    prompt = await engine.prepare(Chat(messages=[ChatMessage(role="user", content=text)]))
    return Generation(prompt=prompt, max_tokens=max_tokens)


@pytest.mark.asyncio
async def test_streams_decode_together_each_with_its_own_limit_and_stop():
    engine = FakeSlotsEngine(parallel=3)
    await engine.load()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                collect(engine, await generation(engine, "one", max_tokens=5)),
                collect(engine, await generation(engine, "two", max_tokens=40)),
                collect(engine, Generation(prompt=(await generation(engine, "three")).prompt, max_tokens=40, stop=["t7 t7 t7"])),
            ),
            timeout=30,
        )
        assert results[0][0] == "t7 " * 5 and results[0][1].finish_reason == "length"
        assert results[1][0] == "t7 " * 40 and results[1][1].completion_tokens == 40
        assert results[2][0] == "" and results[2][1].stop_sequence == "t7 t7 t7"
        # They shared decodes: some batch held all three slots.
        assert any(len(set(b["slots"])) == 3 for b in engine.backend.batches)
    finally:
        engine.close()


@pytest.mark.asyncio
async def test_one_slot_serves_one_request_at_a_time_in_arrival_order():
    """parallel = 1 runs through the same loop: one request decodes, the others queue."""
    engine = FakeSlotsEngine(parallel=1)
    await engine.load()
    try:
        gens = [await generation(engine, f"r{i}", max_tokens=5 + i) for i in range(3)]
        gens[2] = Generation(prompt=gens[2].prompt, max_tokens=40, stop=["t7 t7"])
        tasks = []
        for gen in gens:
            tasks.append(asyncio.create_task(collect(engine, gen)))
            await asyncio.sleep(0.001)  # arrival order is creation order
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        assert [done.completion_tokens for _, done in results[:2]] == [5, 6]
        assert results[0][0] == "t7 " * 5 and results[2][0] == "" and results[2][1].stop_sequence == "t7 t7"
        assert engine.scheduler.capacity == 1 and {s for b in engine.backend.batches for s in b["slots"]} == {0}
        # One after the other: each prompt was read only once the previous answer had ended.
        # (The prompts are alike: the next one reuses the slot and reads its last token again.)
        prompt_batches = [i for i, b in enumerate(engine.backend.batches) if b["tokens"] != [7]]
        assert len(prompt_batches) == 3
        assert [b - a for a, b in zip(prompt_batches, prompt_batches[1:])] == [5, 6]  # each answer's tokens, then the next prompt
    finally:
        engine.close()


@pytest.mark.asyncio
async def test_an_answer_stops_at_the_end_of_the_context():
    backend = FakeBackend(n_slots=1, n_ctx=16, script=lambda g: [7] * 100)
    engine = FakeSlotsEngine(parallel=1, backend=backend, n_ctx=16)
    await engine.load()
    try:
        gen = await generation(engine, "hi", max_tokens=1000)  # not clamped: the loop stops it
        text, done = await asyncio.wait_for(collect(engine, gen), timeout=30)
        assert done.finish_reason == "length"
        assert done.prompt_tokens + done.completion_tokens == 16 and text == "t7 " * done.completion_tokens
    finally:
        engine.close()


@pytest.mark.asyncio
async def test_a_hang_up_hands_its_slot_to_the_queued_request():
    backend = FakeBackend(n_slots=2, decode_delay=0.005, script=lambda g: [7] * 10_000)
    engine = FakeSlotsEngine(parallel=2, backend=backend)
    await engine.load()
    try:
        leaving = engine.stream(await generation(engine, "leaving", max_tokens=10_000))
        async for event in leaving:
            if isinstance(event, Token):
                break
        staying = asyncio.create_task(collect(engine, await generation(engine, "staying", max_tokens=200)))
        queued = asyncio.create_task(collect(engine, await generation(engine, "queued", max_tokens=5)))
        deadline = time.monotonic() + 10
        while engine.scheduler.queue_depth < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await leaving.aclose()
        text, done = await asyncio.wait_for(queued, timeout=10)
        assert done.completion_tokens == 5
        assert not staying.done()  # the queued request ran while the other still decoded
        text, done = await asyncio.wait_for(staying, timeout=30)
        assert done.completion_tokens == 200 and text == "t7 " * 200
        assert engine.stats.cancelled == 1
    finally:
        engine.close()


@pytest.mark.asyncio
async def test_sigterm_drain_finishes_running_streams_and_refuses_the_queued():
    engine = FakeSlotsEngine(parallel=2)
    await engine.load()
    try:
        running = [asyncio.create_task(collect(engine, await generation(engine, f"r{i}", max_tokens=40))) for i in range(2)]
        queued = asyncio.create_task(collect(engine, await generation(engine, "late")))
        deadline = time.monotonic() + 10
        while engine.scheduler.queue_depth < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        engine.scheduler.close()  # what the SIGTERM handler does
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(queued, timeout=10)
        for task in running:
            text, done = await asyncio.wait_for(task, timeout=30)
            assert done.completion_tokens == 40 and done.finish_reason == "length"
    finally:
        engine.close()
    assert engine.loop._thread is None  # noqa: SLF001 - the step thread has stopped


@pytest.mark.parametrize("n_slots", [1, 3])
def test_the_reuse_forecast_is_what_the_chosen_slot_then_reuses(n_slots):
    """Anthropic's message_start reports the reuse before admission; it must be the prefix
    the slot the loop then picks really holds (message_delta's figure)."""
    backend = FakeBackend(n_slots=n_slots)
    loop = StepLoop(backend)
    conversation_a, conversation_b = list(range(1, 41)), list(range(100, 141))
    for tokens in (conversation_a, conversation_b):
        seq = sequence(tokens)
        loop.submit(seq)
        run_until(loop, lambda: seq.ended)
    turn2 = conversation_b + [9, 9, 9]
    forecast = loop.forecast_reuse(turn2)
    seq = sequence(turn2)
    loop.submit(seq)
    run_until(loop, lambda: seq.ended)
    assert forecast == seq.cached >= 40
    # A prompt sharing nothing is forecast to reuse nothing, and one the slot holds whole
    # still evaluates its last token.
    assert loop.forecast_reuse([500, 501]) == 0
    assert loop.forecast_reuse(turn2) == len(turn2) - 1
    assert loop.forecast_reuse([]) == 0
