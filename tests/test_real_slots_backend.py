"""Real tier: the step loop's llama.cpp backend over the real engine, without a server around it.

Greedy requests take their token straight from the logits row instead of through
llama.cpp's sampler chain; that shortcut must pick exactly what the chain picks. The
engine-alone phase of `llamad bench --llama-server` runs on the same backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TEST_MODEL, config_for_tests
from llamad.config import LoadedConfig
from llamad.engine.types import Generation, Prompt, Sampling

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from llamad.engine.llama import LlamaEngine

    config = config_for_tests(tmp_path_factory.mktemp("backend"), MODEL_PATH=TEST_MODEL, PARALLEL="2", N_CTX="1024", N_THREADS="2")
    engine = LlamaEngine(config, Path(TEST_MODEL))
    engine._load()
    yield engine
    engine.close()


def generation(**sampling) -> Generation:
    return Generation(prompt=Prompt(text="", tokens=[2, 818, 5279, 529, 7001, 563]), max_tokens=32, sampling=Sampling(**sampling))


def test_greedy_takes_the_argmax_that_llama_cpps_greedy_sampler_takes(engine):
    import llama_cpp

    backend = engine.backend
    fast = backend.new_sampler(generation(temperature=0.0, repeat_penalty=1.0))
    assert fast.argmax
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        tokens = list(generation().prompt.tokens)
        backend.forget(0, 0)
        assert backend.decode(tokens, list(range(len(tokens))), [0] * len(tokens), [False] * (len(tokens) - 1) + [True]) == 0
        index, picked = len(tokens) - 1, []
        for _ in range(24):
            token = backend.sample(fast, index)
            assert token == llama_cpp.llama_sampler_sample(chain, backend.ctx, index)
            picked.append(token)
            assert backend.decode([token], [len(tokens)], [0], [True]) == 0
            tokens.append(token)
            index = 0
        # Not one token repeated to the end: the comparison ran over changing logits.
        assert len(set(picked)) > 1, picked
    finally:
        llama_cpp.llama_sampler_free(chain)
        backend.free_sampler(fast)
        backend.forget(0, 0)


def test_sampled_or_penalised_requests_keep_the_chain(engine):
    backend = engine.backend
    for sampling in ({"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.0},
                     {"temperature": 0.0, "repeat_penalty": 1.1},
                     {"temperature": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.5}):
        sampler = backend.new_sampler(generation(**sampling))
        try:
            assert not sampler.argmax, sampling
        finally:
            backend.free_sampler(sampler)


def test_a_prefix_is_reusable_only_while_the_sliding_window_layers_hold_what_it_needs(engine):
    """Gemma 3's window layers (n_swa 512) drop a long sequence's start when llama.cpp writes
    over cells that left the window. Simulated by removing the first positions, the way
    llama.cpp removes them: a prefix that needs them is not reused, a longer one is."""
    import llama_cpp

    backend = engine.backend
    assert backend.n_swa == 512
    tokens = [2] + [1000 + i % 500 for i in range(699)]
    backend.forget(1, 0)
    for start in range(0, len(tokens), backend.n_batch):
        chunk = tokens[start : start + backend.n_batch]
        assert backend.decode(chunk, list(range(start, start + len(chunk))), [1] * len(chunk), [False] * len(chunk)) == 0
    try:
        assert backend.reusable(1, 1) == 1 and backend.reusable(1, 650) == 650  # all held
        assert llama_cpp.llama_memory_seq_rm(backend.memory, 1, 0, 3)  # positions 0-2 gone
        assert backend.reusable(1, 1) == 0  # the first new token would look back at them
        assert backend.reusable(1, 100) == 0
        assert backend.reusable(1, 650) == 650  # it looks back 512 positions: 139 on, all held
        assert llama_cpp.llama_memory_seq_rm(backend.memory, 1, 3, 201)  # now 0-200 are gone
        assert backend.reusable(1, 650) == 0  # its window lacks 139-200: more than WINDOW_SLACK
        assert backend.reusable(1, 690) == 690  # lacks 179-200: the slack a restored turn needs
    finally:
        backend.forget(1, 0)


def test_engine_alone_phase_times_each_width(tmp_path):
    from llamad.bench.ceiling import decode_rates

    config = config_for_tests(tmp_path, MODEL_PATH=TEST_MODEL, N_CTX="512", N_THREADS="2")
    result = decode_rates(LoadedConfig(config=config), Path(TEST_MODEL), streams=(1, 4), steps=8)
    rates = result["tokens_per_s"]
    assert set(rates) == {"1", "4"} and all(rate > 0 for rate in rates.values()), result
    assert result["ratio_4_over_1"] == pytest.approx(rates["4"] / rates["1"])
