"""A log call below the configured level costs next to nothing: a model's load makes some
3,000 of them (llama.cpp's debug lines), and each one that ran the whole processor chain held
the GIL that the models serving meanwhile need (llamad.service.log)."""

from __future__ import annotations

import logging

import pytest
import structlog

from llamad.engine import llama as llama_engine
from llamad.service import log as service_log


@pytest.fixture
def configured():
    saved = dict(structlog.get_config())
    saved["processors"] = list(saved["processors"])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def _count_timestamps() -> list[str]:
    """Replaces the chain's timestamper with one that records each event it sees."""
    processors = structlog.get_config()["processors"]
    seen: list[str] = []
    for i, processor in enumerate(processors):
        if isinstance(processor, structlog.processors.TimeStamper):
            def counting(logger, method, event_dict, _inner=processor):
                seen.append(method)
                return _inner(logger, method, event_dict)

            processors[i] = counting
    structlog.configure(processors=processors)
    return seen


@pytest.mark.timeout(30)
def test_calls_below_the_level_stop_before_the_processors(configured):
    service_log.configure("info", "json")
    seen = _count_timestamps()
    logger = structlog.get_logger("llama.cpp")
    for _ in range(100):
        logger.debug("load_tensors: layer 1 assigned to device CPU")
    assert seen == []
    logger.info("model_loaded")
    assert seen == ["info"]
    # The level is read at each call: a reload's new level takes effect at once.
    service_log.set_level("debug")
    logger.debug("now shown")
    assert seen == ["info", "debug"]


@pytest.mark.timeout(30)
def test_a_loads_captured_llama_cpp_lines_are_not_replayed_below_debug(configured, monkeypatch):
    service_log.configure("info", "json")
    replayed: list[str] = []
    monkeypatch.setattr(llama_engine, "native_log", type("L", (), {"debug": lambda self, line: replayed.append(line)})())
    capture = llama_engine.NativeLog()
    capture.capture()
    capture.captured.extend(["print_info: arch = llama", "load_tensors: CPU model buffer size = 93 MiB"])
    assert capture.release() == ["print_info: arch = llama", "load_tensors: CPU model buffer size = 93 MiB"]
    assert replayed == []
    service_log.set_level("debug")
    capture.capture()
    capture.captured.append("llama_context: n_ctx = 4096")
    capture.release()
    assert replayed == ["llama_context: n_ctx = 4096"]
