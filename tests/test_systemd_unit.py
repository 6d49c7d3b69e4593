"""The systemd unit and the daemon's side of the systemd protocols (notify, watchdog, reload)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamad.serve.auth import ApiKeys
from llamad.config import load_config
from llamad.engine import Done, Generation, Prompt
from llamad.models.catalog import build_catalog
from llamad.models.pool import ModelPool
from llamad.service.reload import reload_service
from llamad.service.systemd import Notifier, notify_reload, status_line, supervise, watchdog_loop
from fake_engine import FakeEngine
from must_run import require_tools

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "etc" / "llamad.service"
DROPIN = ROOT / "etc" / "llamad-devices.conf"
MAX_EXPOSURE = 2.0


def needs_analyze() -> None:
    require_tools("systemd-analyze", hint="`make test-deps` installs systemd")


def _verify_root(tmp_path: Path, *units: Path) -> Path:
    """A root holding the unit, the stock systemd units and a stub /usr/bin/llamad, so that
    `systemd-analyze verify` checks the unit itself, not whether llamad is installed here."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc/systemd/system/llamad.service.d").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    stub = root / "usr/bin/llamad"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    shutil.copy("/bin/kill", root / "bin/kill")
    for system_dir in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(system_dir).is_dir():
            shutil.copytree(system_dir, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
            break
    shutil.copy(UNIT, root / "etc/systemd/system/llamad.service")
    for unit in units:
        shutil.copy(unit, root / "etc/systemd/system/llamad.service.d" / unit.name)
    return root


def _analyze_verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", str(root / "etc/systemd/system/llamad.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unit_verifies_without_any_warning(tmp_path):
    needs_analyze()
    result = _analyze_verify(_verify_root(tmp_path))
    # verify exits 0 on unknown keys and typos, so any output at all is a failure.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_verify_catches_a_typo(tmp_path):
    """Guards the check above: it would notice a misspelt key."""
    needs_analyze()
    root = _verify_root(tmp_path)
    unit = root / "etc/systemd/system/llamad.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    result = _analyze_verify(root)
    assert "ProtectHomes" in result.stdout + result.stderr


def test_devices_dropin_verifies(tmp_path):
    needs_analyze()
    result = _analyze_verify(_verify_root(tmp_path, DROPIN))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def _exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_hardening_exposure_is_at_most_2(tmp_path):
    needs_analyze()
    score = _exposure(UNIT)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}: hardening was weakened"


def _settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_promises_what_the_docs_say():
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["User"] == ["llamad"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStart"][0].startswith("/usr/bin/llamad serve")
    assert "WatchdogSec" in s and "TimeoutStartSec" in s
    assert "llamad" in s["StateDirectory"][0] and "CacheDirectory" in s
    # Jetson's CUDA needs /dev/nvmap, /dev/nvhost-*, /dev/nvgpu/*: no blanket device ban.
    assert "PrivateDevices" not in s and "DevicePolicy" not in s


def test_devices_dropin_keeps_the_jetson_nodes():
    s = _settings(DROPIN.read_text())
    allowed = " ".join(s["DeviceAllow"])
    for node in ("/dev/nvmap", "/dev/nvhost-", "/dev/nvgpu/"):
        assert node in allowed
    assert s["DevicePolicy"] == ["closed"]


# -- sd_notify ----------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def test_notifier_sends_ready_and_status_in_one_datagram(notify_socket):
    address, sock = notify_socket
    assert Notifier({"NOTIFY_SOCKET": address}).ready("ready, model gemma")
    assert sock.recv(4096).decode().split("\n") == ["READY=1", "STATUS=ready, model gemma"]


def test_notifier_reaches_abstract_sockets():
    name = f"llamad-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notifier_outside_systemd_is_silent():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False


async def test_watchdog_pings_from_the_event_loop(notify_socket):
    address, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "300000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_s == pytest.approx(0.3)
    task = asyncio.create_task(watchdog_loop(notifier))
    await asyncio.sleep(0.35)
    task.cancel()
    sock.setblocking(False)
    pings = []
    while True:
        try:
            pings.append(sock.recv(64))
        except BlockingIOError:
            break
    assert pings.count(b"WATCHDOG=1") >= 2


def test_watchdog_meant_for_another_pid_is_ignored():
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s is None


async def test_loading_extends_the_start_timeout_until_ready(notify_socket, monkeypatch):
    """supervise() keeps asking for more start time while the server is not up yet (a big
    model loading), then sends READY=1 once it is."""
    address, sock = notify_socket
    monkeypatch.setattr("llamad.service.systemd.EXTEND_TIMEOUT_S", 0.05)
    engine = FakeEngine()
    await engine.load()
    state = SimpleNamespace(engine=engine, api_keys=ApiKeys())
    server = SimpleNamespace(started=False, should_exit=False)
    task = asyncio.create_task(supervise(server, state, notifier=Notifier({"NOTIFY_SOCKET": address})))
    await asyncio.sleep(0.4)  # "loading"
    server.started = True
    await asyncio.sleep(0.3)
    server.should_exit = True
    await asyncio.sleep(1.2)
    task.cancel()
    messages = []
    sock.settimeout(0.2)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except socket.timeout:
        pass
    assert messages[0] == "STATUS=loading model"
    ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert sum(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[:ready]) >= 4
    assert not any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in messages[ready:])
    assert any(m.startswith("STOPPING=1") for m in messages[ready:])
    engine.close()


# -- reload -------------------------------------------------------------------------------


def _gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return path


def _write_config(path: Path, model: Path, extra: str = "") -> Path:
    path.write_text(f'[model]\npath = "{model}"\nname = "{model.stem}"\n{extra}')
    return path


async def _state(config_path: Path) -> SimpleNamespace:
    loaded = load_config(config_path, env={})
    catalog = build_catalog(loaded)
    engine = FakeEngine(model_id=catalog.default_name)
    engine.model_path = catalog.default.path
    await engine.load()
    pool = ModelPool(catalog, lambda spec: FakeEngine(model_id=spec.name))
    pool.install(catalog.default, engine)
    return SimpleNamespace(loaded=loaded, config=loaded.config, engine=engine, models=pool, api_keys=ApiKeys())


def _factory(created: list):
    def make(config, model_path):
        engine = FakeEngine(model_id=config.model.name, token_delay=0.0)
        engine.model_path = model_path
        created.append(engine)
        return engine

    return make


async def _retired(engine, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if engine.scheduler._closed:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the swapped-out engine was never closed")


async def test_reload_applies_limits_queue_keys_and_log_level(tmp_path):
    model = _gguf(tmp_path / "a.gguf")
    path = _write_config(tmp_path / "llamad.toml", model)
    state = await _state(path)
    levels = []
    _write_config(
        path,
        model,
        '[server]\nmax_queue = 3\nqueue_timeout = 7.5\napi_keys = ["k1"]\n'
        '[limits]\nmax_tokens_hard_cap = 77\n[logging]\nlevel = "debug"\n',
    )
    result = await reload_service(state, path, engine_factory=_factory([]), set_log_level=levels.append, env={})
    assert result.ok and not result.model_swapped
    assert state.config.limits.max_tokens_hard_cap == 77
    assert (state.engine.scheduler.max_queue, state.engine.scheduler.queue_timeout) == (3, 7.5)
    assert state.api_keys.accepts("k1") and not state.api_keys.accepts("other")
    assert levels == ["debug"]
    state.engine.close()


async def test_reload_refuses_a_broken_config_and_keeps_running(tmp_path, notify_socket):
    address, sock = notify_socket
    model = _gguf(tmp_path / "a.gguf")
    path = _write_config(tmp_path / "llamad.toml", model, "[limits]\nmax_tokens_hard_cap = 50\n")
    state = await _state(path)
    engine = state.engine
    path.write_text(path.read_text() + "[limits]\nmax_tokens_hard_cap = 'lots'\n")  # invalid TOML
    result = await notify_reload(
        Notifier({"NOTIFY_SOCKET": address}), state, lambda: reload_service(state, path, engine_factory=_factory([]))
    )
    assert not result.ok and "not valid TOML" in result.message
    assert state.config.limits.max_tokens_hard_cap == 50 and state.engine is engine
    # systemd is told the reload finished either way, or `systemctl reload` would hang.
    messages = [sock.recv(256).decode() for _ in range(3)]
    assert messages[0].startswith("RELOADING=1") and messages[1] == "READY=1"
    engine.close()


async def test_reload_refuses_a_missing_model(tmp_path):
    model = _gguf(tmp_path / "a.gguf")
    path = _write_config(tmp_path / "llamad.toml", model)
    state = await _state(path)
    _write_config(path, tmp_path / "gone.gguf")
    result = await reload_service(state, path, engine_factory=_factory([]), env={})
    assert not result.ok and "model.path" in result.message
    assert state.engine.model_id == "a"
    state.engine.close()


async def test_reload_swaps_the_model_without_dropping_a_running_request(tmp_path):
    model_a = _gguf(tmp_path / "a.gguf")
    model_b = _gguf(tmp_path / "b.gguf")
    path = _write_config(tmp_path / "llamad.toml", model_a)
    state = await _state(path)
    old = state.engine
    old.token_delay = 0.05
    old.script = lambda g: [f" w{i}" for i in range(10)]

    async def request():
        prompt = Prompt(text="hi", tokens=[1, 2])
        return [event async for event in old.stream(Generation(prompt=prompt, max_tokens=50))]

    running = asyncio.create_task(request())
    await asyncio.sleep(0.1)  # the request is generating on the old model
    created = []
    _write_config(path, model_b)
    result = await reload_service(state, path, engine_factory=_factory(created), env={})
    assert result.ok and result.model_swapped
    assert state.engine is created[0] and state.engine.model_id == "b" and state.engine.state == "ready"
    events = await running
    done = events[-1]
    assert isinstance(done, Done) and done.completion_tokens == 10 and done.finish_reason == "stop"
    await _retired(old)  # the old engine is closed once it is idle
    state.engine.close()


async def test_a_swapped_engine_waits_for_requests_that_hold_it_but_have_not_queued(tmp_path):
    """A request takes the engine, then reads its body and renders its prompt before it
    reaches the queue; a reload in that window must not close the engine under it."""
    model_a = _gguf(tmp_path / "a.gguf")
    path = _write_config(tmp_path / "llamad.toml", model_a)
    state = await _state(path)
    old = state.engine
    old.holders += 1  # what llamad.serve.observe.engine_of does for a request in flight
    _write_config(path, _gguf(tmp_path / "b.gguf"))
    result = await reload_service(state, path, engine_factory=_factory([]), env={})
    assert result.ok and result.model_swapped
    await asyncio.sleep(0.6)
    assert not old.scheduler._closed  # still held
    events = [e async for e in old.stream(Generation(prompt=Prompt(text="hi", tokens=[1]), max_tokens=5))]
    assert isinstance(events[-1], Done)
    old.holders -= 1  # the request is over
    await _retired(old)
    state.engine.close()


async def test_reload_swaps_in_a_new_file_in_the_model_dir(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    _gguf(models / "b.gguf")
    path = tmp_path / "llamad.toml"
    path.write_text(f'[model]\ndir = "{models}"\n')
    state = await _state(path)
    from llamad.config import file_identity

    state.engine.model_identity = file_identity(models / "b.gguf")  # as LlamaEngine records at load
    created = []
    unchanged = await reload_service(state, path, engine_factory=_factory(created), env={})
    assert unchanged.ok and not unchanged.model_swapped and not created
    _gguf(models / "a.gguf")  # sorts first: the directory now resolves to another file
    result = await reload_service(state, path, engine_factory=_factory(created), env={})
    assert result.ok and result.model_swapped and "model file" in result.changed
    assert created and created[0].model_path == models / "a.gguf"
    state.engine.close()


def test_status_line_reports_requests_served():
    engine = FakeEngine(model_id="gemma")
    engine.state = "ready"
    engine.stats.requests = 3
    assert status_line(engine).startswith("ready, idle; served 3 requests; 0 queued")
    assert "model.path" in status_line(None)
    engine.close()


# -- supervise: what the serve loop runs beside uvicorn ------------------------------------


def _drain(sock) -> list[str]:
    sock.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def test_ready_only_once_the_socket_is_bound_then_reload_on_sighup(tmp_path, notify_socket):
    from llamad.service.systemd import supervise

    address, sock = notify_socket
    model = _gguf(tmp_path / "a.gguf")
    path = _write_config(tmp_path / "llamad.toml", model)
    state = await _state(path)
    server = SimpleNamespace(started=False, should_exit=False)
    reload = lambda: reload_service(state, path, engine_factory=_factory([]), env={})  # noqa: E731
    task = asyncio.create_task(supervise(server, state, reload=reload, notifier=Notifier({"NOTIFY_SOCKET": address})))
    await asyncio.sleep(0.3)
    assert not any("READY=1" in m for m in _drain(sock))  # model loaded, socket not yet bound
    server.started = True
    await asyncio.sleep(0.3)
    assert any(m.startswith("READY=1\nSTATUS=ready") for m in _drain(sock))

    _write_config(path, model, "[limits]\nmax_tokens_hard_cap = 9\n")
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(50):
        if state.config.limits.max_tokens_hard_cap == 9:
            break
        await asyncio.sleep(0.05)
    assert state.config.limits.max_tokens_hard_cap == 9
    messages: list[str] = []
    deadline = asyncio.get_running_loop().time() + 5
    while "READY=1" not in messages and asyncio.get_running_loop().time() < deadline:
        messages += _drain(sock)
        await asyncio.sleep(0.05)
    # The reload is wrapped in sd_notify's reload protocol, or `systemctl reload` would hang.
    reloading = [i for i, m in enumerate(messages) if m.startswith("RELOADING=1\nMONOTONIC_USEC=")]
    assert reloading and "READY=1" in messages[reloading[0] :], messages

    server.should_exit = True
    await asyncio.sleep(1.2)
    assert "STOPPING=1\nSTATUS=stopping" in _drain(sock)
    task.cancel()
    state.engine.close()


async def test_a_model_that_failed_to_load_is_a_failed_start_under_systemd(notify_socket):
    from llamad.service.systemd import supervise

    address, sock = notify_socket
    engine = FakeEngine()
    engine.state, engine.error = "failed", "llama.cpp could not load /x.gguf"
    server = SimpleNamespace(started=True, should_exit=False)
    task = asyncio.create_task(
        supervise(server, SimpleNamespace(engine=engine), notifier=Notifier({"NOTIFY_SOCKET": address}))
    )
    await asyncio.sleep(0.2)
    assert server.should_exit  # the process exits non-zero; Restart=on-failure retries
    messages = _drain(sock)
    assert not any("READY=1" in m for m in messages)
    assert "STATUS=model failed to load: llama.cpp could not load /x.gguf" in messages
    task.cancel()
    engine.close()


def test_packaged_config_loads_and_stays_local():
    """/etc/llamad.toml as shipped: valid, loopback only, models from the state directory."""
    loaded = load_config(ROOT / "packaging" / "llamad.toml", env={})
    assert loaded.config.server.host == "127.0.0.1"
    assert loaded.config.model.dir == "/var/lib/llamad/models"
    assert loaded.config.model.n_gpu_layers == -1


async def test_reload_hands_a_changed_speculative_table_to_the_running_engine(tmp_path):
    model = _gguf(tmp_path / "a.gguf")
    path = _write_config(tmp_path / "llamad.toml", model)
    state = await _state(path)
    handed = []
    state.engine.configure_speculation = lambda config: handed.append(config.speculative)
    _write_config(path, model, "[speculative]\nenabled = true\nngram = 8\n")
    result = await reload_service(state, path, engine_factory=_factory([]), env={})
    assert result.ok and not result.model_swapped and "speculative.ngram" in result.changed
    assert [(s.enabled, s.ngram) for s in handed] == [(True, 8)]
    state.engine.close()
