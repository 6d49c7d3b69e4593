"""`llamad bench --switch`: the plan of requests, the two-model configuration it serves, and
its table (the run itself needs llama-server and two GGUFs: docs/benchmark.md)."""

from __future__ import annotations

import re
from pathlib import Path

import tomli_w

from llamad.bench.switch import llamad_toml, render_switch, switch_plan
from llamad.cli import build_parser, switch_models
from llamad.config import load_config


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 16)  # enough for the configuration's checks
    return path


def empty_toml(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


def test_every_planned_request_goes_to_the_model_not_loaded() -> None:
    plan = switch_plan("a", "b", rounds=3)
    assert plan == ["b", "a", "b", "a", "b", "a"]
    loaded = "a"
    for target in plan:
        assert target != loaded
        loaded = target


def test_the_configuration_holds_one_model_at_a_time_and_no_other_model(tmp_path: Path) -> None:
    a, b = fake_gguf(tmp_path / "a.gguf"), fake_gguf(tmp_path / "b.gguf")
    base = load_config(empty_toml(tmp_path), env={"N_CTX": "2048", "PARALLEL": "2", "N_THREADS": "2"})
    data = llamad_toml(base, (a, b), max_loaded=1, b_keep_alive=0)
    file = tmp_path / "two.toml"
    file.write_text(tomli_w.dumps(data))
    config = load_config(file, env={}).config
    assert config.router.max_loaded == 1
    assert set(config.models) == {"a", "b"} and config.models["a"].default
    assert config.models["b"].keep_alive == 0
    assert (config.model.n_ctx, config.server.parallel, config.model.n_threads) == (2048, 2, 2)
    assert config.model.path == ""


def test_switch_models_wants_two_files(tmp_path: Path) -> None:
    a, b = fake_gguf(tmp_path / "a.gguf"), fake_gguf(tmp_path / "b.gguf")
    loaded = load_config(empty_toml(tmp_path), env={})
    assert switch_models(loaded, f"{a},{b}") == (a, b)
    assert "two GGUF files" in switch_models(loaded, str(a))
    assert "no such file" in switch_models(loaded, f"{a},{tmp_path / 'gone.gguf'}")
    args = build_parser().parse_args(["bench", "--switch", "--llama-server", "x", "--switch-models", f"{a},{b}"])
    assert args.switch and args.switch_models == f"{a},{b}"


def _figures(switch: float, loaded: float, idle: float, during: float) -> dict:
    return {
        "switch_ttft_s": switch, "switch_to_a_ttft_s": switch, "switch_to_b_ttft_s": switch, "loaded_ttft_s": loaded,
    }, {
        "idle_ttft_s": idle, "during_load_ttft_s": during, "during_over_idle": during / idle,
        "b_load_ttft_s": 0.8, "rounds": 3, "a_answered_before_b": 3,
    }


def test_the_table_gives_each_figure_and_llamad_over_llama_server() -> None:
    mine, mine_both = _figures(0.6, 0.03, 0.04, 0.05)
    theirs, theirs_both = _figures(1.2, 0.04, 0.05, 0.25)
    table = render_switch({"llamad": mine, "llama-server router": theirs,
                           "llamad, both fit": mine_both, "llama-server router, both fit": theirs_both})
    lines = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())}
    switch = lines["one model fits: switch to the model not loaded, median"]
    assert switch == ["600", "1,200", "0.50"]
    assert lines["A while B loads / A idle (target <= 1.2)"] == ["1.25", "5.00", "0.25"]
    assert lines["rounds where A's first token came first"] == ["3 of 3", "3 of 3"]


def test_idle_requests_wait_as_long_as_the_one_sent_while_b_loads(monkeypatch) -> None:
    """A first token after a pause is slower than one right after another request, with
    nothing loading; so each idle request gets the pause that the request sent while B loads
    gets, and the pauses go round LOAD_HEAD_STARTS_S so A meets every part of B's load."""
    from llamad.bench import switch

    timeline: list[tuple[str, float | str]] = []
    monkeypatch.setattr(switch.time, "sleep", lambda s: timeline.append(("pause", s)))

    class Client:
        def stream(self, path: str, body: dict) -> dict:
            timeline.append(("request", body["model"]))
            return {"status": 200, "ttft_s": 0.02, "first": 1.0 if body["model"] == "a" else 2.0}

    rounds = len(switch.LOAD_HEAD_STARTS_S) + 1
    result = switch.measure_while_loading(Client(), ["a", "b"], lambda: None, rounds)
    assert result["rounds"] == rounds and result["a_answered_before_b"] == rounds
    steps = timeline[1:]  # after the warm-up request
    for round_ in range(rounds):
        head = switch.LOAD_HEAD_STARTS_S[round_ % len(switch.LOAD_HEAD_STARTS_S)]
        idle, steps = steps[: 2 * switch.IDLE_PER_ROUND], steps[2 * switch.IDLE_PER_ROUND :]
        assert idle == [("pause", head), ("request", "a")] * switch.IDLE_PER_ROUND
        during, steps = steps[:3], steps[3:]
        # B's request runs on a thread of its own, so it may land anywhere among these three
        assert sorted(during, key=str) == sorted([("request", "b"), ("pause", head), ("request", "a")], key=str)
        assert during.index(("pause", head)) < during.index(("request", "a"))
