"""Servers `llamad bench` starts beside itself on loopback (llamad, and llama-server for the
side-by-side run), each tied to the bench's life, and the wait until they answer /health."""

from __future__ import annotations

import atexit
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from llamad.config import LoadedConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dies_with_parent() -> None:
    """For Popen's preexec_fn: a server started here gets SIGTERM when its parent dies,
    even by SIGKILL (a timeout), instead of living on and holding a port and the CPU."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def bench_cache_dir() -> str:
    """A disk cache directory ([cache]) of the bench's own, removed when it ends: a server the
    bench starts neither finds states of earlier runs nor leaves its states in the user's."""
    path = tempfile.mkdtemp(prefix="llamad-bench-kv-")
    atexit.register(shutil.rmtree, path, True)
    return path


def start_llamad(loaded: LoadedConfig, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`extra_env` (LLAMAD_* settings) goes on top; without LLAMAD_CACHE_DIR there, the server
    gets a fresh disk cache directory (bench_cache_dir)."""
    port = free_port()
    env = {**os.environ, "LLAMAD_SERVER_PORT": str(port), "LLAMAD_SERVER_HOST": "127.0.0.1", "LLAMAD_LOGGING_LEVEL": "warning"}
    env["LLAMAD_CACHE_DIR"] = (extra_env or {}).get("LLAMAD_CACHE_DIR") or bench_cache_dir()
    env.update(extra_env or {})
    if loaded.config.model.path:
        env["LLAMAD_MODEL_PATH"] = loaded.config.model.path
    args = [sys.executable, "-m", "llamad.cli"]
    if loaded.file:
        args += ["--config", str(loaded.file)]
    process = subprocess.Popen(
        args + ["serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=dies_with_parent
    )
    return process, wait_healthy(process, port, "llamad serve")


def wait_healthy(process: subprocess.Popen, port: int, what: str, timeout_s: float = 300) -> str:
    """The server's base URL once GET /health answers 200; raises if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{what} did not become healthy")
