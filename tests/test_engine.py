"""The engine base: lock and FIFO queue, overload, cancellation, stop sequences, limits.

These run the real Engine code (worker thread included) with a scripted fake model.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from fake_engine import FakeEngine
from llamad.engine.chat import Chat, ChatMessage
from llamad.engine import Done, Generation, Overloaded, QueueTimeout, Token

pytestmark = pytest.mark.asyncio


async def ready(engine: FakeEngine) -> FakeEngine:
    await engine.load()
    return engine


async def generation(engine: FakeEngine, text: str = "hi", **kwargs) -> Generation:
    prompt = await engine.prepare(Chat(messages=[ChatMessage(role="user", content=text)]))
    return Generation(prompt=prompt, max_tokens=kwargs.pop("max_tokens", 100), **kwargs)


async def collect(engine: FakeEngine, gen: Generation) -> tuple[str, Done]:
    text, done = "", None
    async with aclosing(engine.stream(gen)) as events:
        async for event in events:
            if isinstance(event, Token):
                text += event.text
            elif isinstance(event, Done):
                done = event
    assert done is not None
    return text, done


async def test_stop_sequence_split_across_tokens_is_cut_and_reported():
    engine = await ready(FakeEngine(script=lambda g: ["Hello", " wor", "ld", " ST", "OP", " never"]))
    text, done = await collect(engine, await generation(engine, stop=["STOP"]))
    assert text == "Hello world "
    assert (done.finish_reason, done.stop_sequence, done.completion_tokens) == ("stop", "STOP", 5)


async def test_template_stop_ends_the_turn_but_is_not_reported():
    engine = await ready(FakeEngine(script=lambda g: ["Yes", "<en", "d>", "extra"]))
    text, done = await collect(engine, await generation(engine))
    assert text == "Yes" and done.finish_reason == "stop" and done.stop_sequence is None


async def test_max_tokens_gives_length():
    engine = await ready(FakeEngine(script=lambda g: ["a"] * 50))
    text, done = await collect(engine, await generation(engine, max_tokens=7))
    assert text == "a" * 7 and done.finish_reason == "length" and done.completion_tokens == 7


async def test_requests_are_served_one_at_a_time_in_arrival_order():
    order: list[str] = []
    active = 0
    peak = 0

    def script(g: Generation) -> list[str]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        order.append(g.prompt.text.split(">")[1].split("\n")[0])
        import time

        time.sleep(0.02)
        active -= 1
        return ["x"]

    engine = await ready(FakeEngine(script=script))
    gens = [await generation(engine, f"r{i}") for i in range(6)]
    tasks = []
    for gen in gens:
        tasks.append(asyncio.create_task(collect(engine, gen)))
        await asyncio.sleep(0.001)  # arrival order is creation order
    await asyncio.gather(*tasks)
    assert order == [f"r{i}" for i in range(6)]
    assert peak == 1


async def test_full_queue_is_refused_at_once():
    engine = await ready(FakeEngine(script=lambda g: ["x"] * 1000, token_delay=0.01, max_queue=1))
    first = engine.stream(await generation(engine))
    await first.__anext__()  # admitted: holds the engine
    second = engine.stream(await generation(engine))
    await second.__anext__()  # queued (position 1)
    third = engine.stream(await generation(engine))
    with pytest.raises(Overloaded):
        await third.__anext__()
    await second.aclose()
    await first.aclose()
    assert engine.scheduler.queue_depth == 0 and not engine.generating


async def test_queue_timeout_leaves_the_queue():
    engine = await ready(FakeEngine(script=lambda g: ["x"] * 1000, token_delay=0.01, queue_timeout=0.2))
    first = engine.stream(await generation(engine))
    await first.__anext__()
    with pytest.raises(QueueTimeout):
        await collect(engine, await generation(engine))
    assert engine.scheduler.queue_depth == 0
    await first.aclose()
    assert not engine.generating


async def test_closing_a_stream_stops_generation_and_frees_the_engine():
    engine = await ready(FakeEngine(script=lambda g: ["tok"] * 10_000, token_delay=0.005))
    stream = engine.stream(await generation(engine, max_tokens=10_000))
    async for event in stream:
        if isinstance(event, Token):
            break
    await stream.aclose()
    decoded = engine.decoded_tokens
    assert not engine.generating
    await asyncio.sleep(0.05)
    assert engine.decoded_tokens - decoded <= 1  # stopped within one decode step
    assert engine.stats.cancelled == 1
    text, done = await collect(engine, await generation(engine, max_tokens=3))
    assert done.completion_tokens == 3


async def test_prompt_longer_than_context_is_refused_before_queueing():
    from llamad.engine import ContextOverflow

    engine = await ready(FakeEngine(n_ctx=8))
    with pytest.raises(ContextOverflow) as info:
        await generation(engine, "one two three four five six seven eight nine ten")
    assert info.value.n_ctx == 8


async def test_keepalives_while_the_prompt_is_evaluated_and_none_between_tokens(monkeypatch):
    monkeypatch.setattr("llamad.engine.base.KEEPALIVE_S", 0.05)
    engine = await ready(FakeEngine(script=lambda g: ["x"] * 20, token_delay=0.01, prompt_delay=0.4))
    kinds = []
    async with aclosing(engine.stream(await generation(engine))) as events:
        async for event in events:
            kinds.append(type(event).__name__)
    first_token = kinds.index("Token")
    # One Waiting on admission, then several while the "prompt" is evaluated...
    assert kinds[:first_token].count("Waiting") >= 4
    # ...and none once tokens flow faster than the keep-alive interval.
    assert "Waiting" not in kinds[first_token:]
    assert kinds.count("Token") == 20 and kinds[-1] == "Done"
