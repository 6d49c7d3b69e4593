"""model.flash_attn: the setting in the config, and what "auto" does with a probe (a fake
one here: no model), its stored measurements and their keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamad.config import ConfigError, load_config
from llamad.engine.flash_attn import Measurement, MeasurementStore, ProbeSkipped, choose, measurement_key, store_path

from conftest import TEST_MODEL


def setting(tmp_path: Path, toml: str, **env: str) -> str:
    path = tmp_path / "llamad.toml"
    path.write_text(toml)
    return load_config(path, env=env).config.model.flash_attn


def test_auto_is_the_default_and_on_off_true_false_are_read(tmp_path):
    assert setting(tmp_path, "") == "auto"
    assert setting(tmp_path, '[model]\nflash_attn = "on"\n') == "on"
    assert setting(tmp_path, '[model]\nflash_attn = "off"\n') == "off"
    assert setting(tmp_path, '[model]\nflash_attn = "auto"\n') == "auto"
    # The TOML booleans of earlier configurations: true is on, false is off.
    assert setting(tmp_path, "[model]\nflash_attn = true\n") == "on"
    assert setting(tmp_path, "[model]\nflash_attn = false\n") == "off"


def test_the_environment_overrides_the_file(tmp_path):
    assert setting(tmp_path, "[model]\nflash_attn = true\n", LLAMAD_MODEL_FLASH_ATTN="off") == "off"
    assert setting(tmp_path, "", LLAMAD_MODEL_FLASH_ATTN="true") == "on"
    assert setting(tmp_path, "", LLAMAD_MODEL_FLASH_ATTN="auto") == "auto"


def test_another_value_is_refused_with_the_key_and_the_choices(tmp_path):
    for toml in ('[model]\nflash_attn = "fast"\n', "[model]\nflash_attn = 1\n"):
        with pytest.raises(ConfigError) as info:
            setting(tmp_path, toml)
        assert "model.flash_attn" in str(info.value) and "auto" in str(info.value)


def test_a_quantized_v_cache_is_refused_only_with_flash_attention_off(tmp_path):
    with pytest.raises(ConfigError) as info:
        setting(tmp_path, '[model]\ntype_v = "q8_0"\nflash_attn = "off"\n')
    assert "model.type_v" in str(info.value) and '"on"' in str(info.value)
    assert setting(tmp_path, '[model]\ntype_v = "q8_0"\n') == "auto"


# -- the choice ----------------------------------------------------------------------------------

KEY = measurement_key(("/models/a.gguf", 1000, 1), 2, -1, "f16", "f16", build="0.3.36", gpu_offload=False)


class FakeProbe:
    def __init__(self, on: float = 30.0, off: float = 10.0, fails: Exception | None = None):
        self.calls = 0
        self.on, self.off, self.fails = on, off, fails

    def __call__(self) -> Measurement:
        self.calls += 1
        if self.fails is not None:
            raise self.fails
        return Measurement(depth=2048, on_tok_s=self.on, off_tok_s=self.off, measured_at="2026-12-07T16:00:00+00:00")


def test_auto_measures_once_and_then_uses_the_stored_choice(tmp_path):
    store = MeasurementStore(tmp_path / "flash_attn.json")
    probe = FakeProbe(on=6.9, off=25.9)
    first = choose("auto", "f16", KEY, store, probe)
    assert (first.effective, probe.calls) == ("off", 1)
    assert first.describe()["flash_attn_measured"]["off_tok_s"] == 25.9
    again = choose("auto", "f16", KEY, MeasurementStore(tmp_path / "flash_attn.json"), probe)
    assert (again.effective, probe.calls) == ("off", 1)
    assert "stored" in again.reason
    # --measure: measured again, and the new figures replace the old.
    remeasured = choose("auto", "f16", KEY, store, FakeProbe(on=40.0, off=20.0), remeasure=True)
    assert remeasured.effective == "on"
    assert choose("auto", "f16", KEY, store, probe).effective == "on"


def test_on_wins_a_tie_and_off_any_lead_beyond_noise(tmp_path):
    store = MeasurementStore(tmp_path / "flash_attn.json")
    assert choose("auto", "f16", KEY, store, FakeProbe(on=50.0, off=50.4)).effective == "on"
    # The quiet machine's probe of SmolLM2 at 2,048 tokens: off 3.7% ahead (12% at 7,881).
    assert choose("auto", "f16", KEY, store, FakeProbe(on=70.8, off=73.4), remeasure=True).effective == "off"
    assert choose("auto", "f16", KEY, store, FakeProbe(on=50.0, off=60.0), remeasure=True).effective == "off"
    # A setting the backend refused counts zero.
    assert choose("auto", "f16", KEY, store, FakeProbe(on=0.0, off=20.0), remeasure=True).effective == "off"


def test_a_changed_model_thread_count_or_build_measures_again(tmp_path):
    store = MeasurementStore(tmp_path / "flash_attn.json")
    choose("auto", "f16", KEY, store, FakeProbe())
    for changed in (
        measurement_key(("/models/a.gguf", 1000, 2), 2, -1, "f16", "f16", build="0.3.36", gpu_offload=False),  # mtime
        measurement_key(("/models/b.gguf", 1000, 1), 2, -1, "f16", "f16", build="0.3.36", gpu_offload=False),
        measurement_key(("/models/a.gguf", 1000, 1), 4, -1, "f16", "f16", build="0.3.36", gpu_offload=False),
        measurement_key(("/models/a.gguf", 1000, 1), 2, 0, "f16", "f16", build="0.3.36", gpu_offload=False),
        measurement_key(("/models/a.gguf", 1000, 1), 2, -1, "f16", "f16", build="0.3.37", gpu_offload=False),
    ):
        probe = FakeProbe(on=10.0, off=30.0)
        assert choose("auto", "f16", changed, store, probe).effective == "off"
        assert probe.calls == 1
    # The first model's measurement is still there beside the others.
    probe = FakeProbe()
    choose("auto", "f16", KEY, store, probe)
    assert probe.calls == 0


# A file of another version, even one holding this key, is not read: its fields may mean something else.
OTHER_VERSION = json.dumps({"version": 99, "entries": [{"key": KEY, "measurement": {"depth": 2048, "on_tok_s": 50.0, "off_tok_s": 10.0}}]})


@pytest.mark.parametrize("content", ["{not json", OTHER_VERSION, '["a list"]', '{"version": 1, "entries": [{"key": {}, "measurement": 3}]}'])
def test_a_corrupt_store_is_ignored_and_replaced(tmp_path, content):
    path = tmp_path / "flash_attn.json"
    path.write_text(content)
    probe = FakeProbe(on=10.0, off=30.0)
    assert choose("auto", "f16", KEY, MeasurementStore(path), probe).effective == "off"
    assert probe.calls == 1
    # The new measurement is stored, and found by the next start.
    assert choose("auto", "f16", KEY, MeasurementStore(path), probe).effective == "off"
    assert probe.calls == 1


def test_a_malformed_entry_for_this_key_measures_again(tmp_path):
    path = tmp_path / "flash_attn.json"
    path.write_text(json.dumps({"version": 1, "entries": [{"key": KEY, "measurement": {"depth": "deep"}}]}))
    probe = FakeProbe()
    assert choose("auto", "f16", KEY, MeasurementStore(path), probe).effective == "on"
    assert probe.calls == 1


def test_an_unwritable_store_still_uses_the_measurement(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = MeasurementStore(blocker / "flash_attn.json")  # its directory is a file
    choice = choose("auto", "f16", KEY, store, FakeProbe(on=10.0, off=30.0))
    assert choice.effective == "off" and "not stored" in choice.reason


def test_a_probe_that_does_not_finish_leaves_llama_cpps_choice_and_says_how_to_measure(tmp_path):
    store = MeasurementStore(tmp_path / "flash_attn.json")
    choice = choose("auto", "f16", KEY, store, FakeProbe(fails=ProbeSkipped("the fill went past the budget")))
    assert choice.effective == "auto"
    assert "budget" in choice.reason and "llamad check" in choice.reason
    assert not (tmp_path / "flash_attn.json").exists()


def test_configured_settings_and_a_quantized_v_cache_never_probe(tmp_path):
    store = MeasurementStore(tmp_path / "flash_attn.json")
    probe = FakeProbe(on=10.0, off=30.0)
    assert choose("on", "f16", KEY, store, probe).effective == "on"
    assert choose("off", "f16", KEY, store, probe).effective == "off"
    quantized = choose("auto", "q8_0", KEY, store, probe)
    assert quantized.effective == "on" and "type_v" in quantized.reason
    assert probe.calls == 0


def test_the_store_lives_in_llamads_cache_directory_whatever_cache_dir_says():
    assert store_path({"CACHE_DIRECTORY": "/var/cache/llamad"}) == Path("/var/cache/llamad/flash_attn.json")
    assert store_path({"XDG_CACHE_HOME": "/x"}) == Path("/x/llamad/flash_attn.json")
    assert store_path({"HOME": "/home/u"}) == Path("/home/u/.cache/llamad/flash_attn.json")


@pytest.mark.real
@pytest.mark.timeout(300)
def test_the_probe_measures_both_settings_on_the_demo_model():
    import llama_cpp

    from llamad.engine.flash_probe import measure

    llm = llama_cpp.Llama(model_path=TEST_MODEL, n_ctx=32, n_threads=2, verbose=False)
    try:
        m = measure(llm, threads=2, depth=256, steps=6)
    finally:
        llm.close()
    assert m.depth == 256
    assert m.on_tok_s > 0 and m.off_tok_s > 0
    assert m.on_prompt_tok_s > 0 and m.off_prompt_tok_s > 0
    assert m.faster() in ("on", "off")
