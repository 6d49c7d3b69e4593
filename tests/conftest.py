"""Shared fixtures.

Fast tier: `make_client(engine)` runs the real Litestar app through the ASGI stack with a
fake engine. Real tier: `real_server` is a real `llamad serve` process (real llama.cpp,
the demo GGUF) on a loopback port, shared by the whole session; `start_server(...)` starts
a private one with other settings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from hypothesis import settings
from litestar.testing import AsyncTestClient

from llamad.app import create_app
from llamad.bench.servers import dies_with_parent
from llamad.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from fake_engine import FakeEngine  # noqa: E402

TEST_MODEL = os.environ.get("LLAMAD_TEST_MODEL", "")

# Saved prompt states go to disk ([cache]); an engine a test builds in this process writes
# them under this session's own directory (the default is $CACHE_DIRECTORY/kv), never to
# the user's cache, and a server start_server starts gets a directory of its own.
_SESSION_CACHE = tempfile.mkdtemp(prefix="llamad-test-cache-")
os.environ["CACHE_DIRECTORY"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, True)

# Under CI the property tests draw the same examples every run: a red CI run then points at
# a change, not at an unlucky draw (a new counter-example is found by running them locally).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_MODEL and Path(TEST_MODEL).is_file():
        return
    skip = pytest.mark.skip(reason="LLAMAD_TEST_MODEL is not set to the demo GGUF (make test sets it)")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


def config_for_tests(tmp_path: Path, **env: str):
    """A config with built-in defaults (no /etc/llamad.toml), plus environment overrides."""
    empty = tmp_path / "llamad.toml"
    empty.write_text("")
    return load_config(empty, env=env).config


@pytest.fixture
def make_client(tmp_path: Path):
    """make_client(engine=None, **env) -> async context manager yielding an AsyncTestClient."""

    @contextlib.asynccontextmanager
    async def factory(engine: FakeEngine | None = None, **env: str):
        engine = engine or FakeEngine()
        config = config_for_tests(tmp_path, **env)
        app = create_app(config, engine)
        async with AsyncTestClient(app=app) as client:
            client.engine = engine  # type: ignore[attr-defined]
            yield client

    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def start_server(tmp_dir: Path, toml: str = "", **env: str) -> Iterator[RunningServer]:
    port = free_port()
    config = tmp_dir / f"llamad-{port}.toml"
    config.write_text(toml)
    log_path = tmp_dir / f"llamad-{port}.log"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LLAMAD_", "MODEL_", "N_", "PORT", "HOST"))},
        "MODEL_PATH": TEST_MODEL,
        "PORT": str(port),
        "LLAMAD_LOGGING_FORMAT": "json",
        "LLAMAD_CACHE_DIR": str(tmp_dir / f"kv-{port}"),
        **env,
    }
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamad.cli", "--config", str(config), "serve"],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=dies_with_parent,  # a killed test run leaves no server behind
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llamad exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llamad did not become healthy:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield RunningServer(url=url, process=process, log_path=log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def real_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("real")) as server:
        yield server


@pytest.fixture(scope="session")
def real_server(real_server_process: RunningServer) -> str:
    """Base URL (no /v1) of the shared real server."""
    return real_server_process.url
