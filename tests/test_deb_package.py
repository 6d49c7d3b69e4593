"""The .deb, end to end: built, checked by lintian, installed into a minimal Debian booted
with systemd-nspawn, and driven the way a user drives it (systemctl, journalctl, HTTP).

Slow (a few minutes; the first run also debootstraps a bookworm chroot, cached under
~/.cache/llamad/chroot). Every part that cannot run here says why and skips only itself:
- no root, no dpkg-buildpackage/dh-virtualenv: the build (and so everything) skips;
- no lintian: only the lintian test skips;
- no debootstrap/systemd-nspawn, no mirror, or the container does not boot: only the boot
  test skips.
With CI=true each of these is a failure instead (tests/must_run.py): a green CI run means
the package was built, checked and run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from must_run import require_tools, skip_or_fail

# Building the .deb (~1 min), lintian and a first debootstrap (minutes) run in this
# module's fixtures, so its tests get a longer bound than the default.
pytestmark = [pytest.mark.real, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "packaging" / "out"
CHROOT_CACHE = Path(os.environ.get("LLAMAD_CHROOT_CACHE", Path.home() / ".cache/llamad/chroot"))
# Everything the package depends on is in the base image, so `dpkg -i` needs no network.
BASE_PACKAGES = "systemd,systemd-sysv,dbus,python3,libgomp1,libssl3,zlib1g,adduser,procps,ca-certificates,curl"
# Bump the suffix when BASE_PACKAGES changes, so a stale cached chroot is not reused.
BASE_NAME = "bookworm-base-v2"
MIRROR = os.environ.get("LLAMAD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
MODEL_IN_CONTAINER = "/srv/models/demo.gguf"


def _run(cmd, timeout=600, check=True, **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def deb() -> Path:
    if os.geteuid() != 0:
        skip_or_fail("building and installing the .deb needs root")
    require_tools("dpkg-buildpackage", "dh", "dh_virtualenv")
    started = time.monotonic()
    # gzip -1: the test needs a package, not a small one.
    env = dict(os.environ, DEB_COMPRESS="-Zgzip -z1")
    env.pop("CMAKE_ARGS", None)
    result = _run([str(ROOT / "packaging/build-deb.sh")], timeout=1500, check=False, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    debs = sorted(OUT.glob("llamad_*.deb"), key=lambda p: p.stat().st_mtime)
    assert debs, "build-deb.sh did not write a .deb"
    print(f"deb built in {time.monotonic() - started:.0f}s: {debs[-1].name}")
    return debs[-1]


def test_deb_contents(deb):
    info = _run(["dpkg-deb", "-I", str(deb)]).stdout
    assert "python3 (>= 3." in info and "adduser" in info and "procps" in info
    listing = _run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in (
        "./usr/bin/llamad -> /opt/venvs/llamad/bin/llamad",
        "./opt/venvs/llamad/bin/python3 -> /usr/bin/python3",
        "./lib/systemd/system/llamad.service",
        "./etc/llamad.toml",
        "./usr/share/doc/llamad/README-service.md",  # the unit's Documentation= (uncompressed)
    ):
        assert path in listing
    with tempfile.TemporaryDirectory() as control:
        _run(["dpkg-deb", "-e", str(deb), control])
        assert (Path(control) / "conffiles").read_text().split() == ["/etc/llamad.toml"]


def test_lintian_finds_no_errors(deb):
    require_tools("lintian")
    result = _run(["lintian", "--fail-on", "error", "--tag-display-limit", "0", str(deb)], timeout=900, check=False)
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout[-4000:] + result.stderr[-2000:]


# -- the booted container -----------------------------------------------------------------


def _base_chroot() -> Path:
    base = CHROOT_CACHE / BASE_NAME
    if (base / ".llamad-base-complete").exists():
        return base
    require_tools("debootstrap", hint="`make test-deps` installs it; it builds the test system")
    CHROOT_CACHE.mkdir(parents=True, exist_ok=True)
    partial = CHROOT_CACHE / (BASE_NAME + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = _run(
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(partial), MIRROR],
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        skip_or_fail(f"debootstrap failed (no mirror reachable?): {result.stdout[-800:]}{result.stderr[-800:]}")
    (partial / ".llamad-base-complete").write_text(BASE_PACKAGES + "\n")
    shutil.rmtree(base, ignore_errors=True)
    partial.rename(base)
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Container:
    """A booted systemd in a throw-away copy of the base chroot; commands run via nsenter."""

    def __init__(self, base: Path, model: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="llamad-nspawn-"))
        self.root = self.dir / "root"
        _run(["cp", "-a", "--reflink=auto", str(base), str(self.root)])
        self.log = (self.dir / "console.log").open("w")
        self.name = f"llamadtest{os.getpid()}"
        # No machined/host systemd here: --register=no --keep-unit avoid both.
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
                f"--machine={self.name}", f"--directory={self.root}",
                f"--bind-ro={model}:{MODEL_IN_CONTAINER}", "--console=pipe",
            ],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.pid = None

    def wait_booted(self, timeout: float = 240) -> str | None:
        """None once systemd runs; otherwise why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"systemd-nspawn exited {self.proc.returncode}: {self.console()[-1500:]}"
            if self.pid is not None and not Path(f"/proc/{self.pid}").exists():
                self.pid = None  # a short-lived helper of nspawn's, not the container's init
            if self.pid is None:
                # The container's init is nspawn's child named systemd (nspawn may briefly
                # fork helpers first).
                children = _run(["ps", "-o", "pid=,comm=", "--ppid", str(self.proc.pid)], check=False).stdout.splitlines()
                inits = [int(line.split()[0]) for line in children if line.split()[1:] == ["systemd"]]
                self.pid = inits[0] if inits else None
            if self.pid is not None:
                state = self.sh("systemctl is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return None
            time.sleep(1)
        return f"the container's systemd did not finish booting in {timeout:.0f}s: {self.console()[-1500:]}"

    def console(self) -> str:
        self.log.flush()
        return (self.dir / "console.log").read_text(errors="replace")

    def sh(self, command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(
            ["nsenter", f"--target={self.pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
             "/bin/sh", "-c", command],
            check=check,
            timeout=timeout,
        )

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.write_text(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _http(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 120):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _config(port: int, name: str, extra: str = "") -> str:
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n{extra}'
        f'[model]\npath = "{MODEL_IN_CONTAINER}"\nname = "{name}"\nn_ctx = 1024\n'
        '[limits]\nmax_tokens_hard_cap = 16\n'
    )


def _chat(port: int, headers: dict | None = None):
    body = {"model": "any", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}
    return _http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", body, headers)


def _message(port: int, headers: dict | None = None):
    body = {"model": "any", "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi."}]}
    return _http("POST", f"http://127.0.0.1:{port}/v1/messages", body, {"anthropic-version": "2023-06-01", **(headers or {})})


def test_installed_service_in_a_booted_debian(deb):
    model = os.environ.get("LLAMAD_TEST_MODEL")
    if not model or not Path(model).is_file():
        skip_or_fail("LLAMAD_TEST_MODEL is not set to the demo GGUF (`make test` sets it)")
    require_tools("systemd-nspawn", "nsenter", hint="`make test-deps` installs systemd-container")
    base = _base_chroot()
    started = time.monotonic()
    box = Container(base, Path(model).resolve())
    try:
        why = box.wait_booted()
        if why is not None:
            skip_or_fail(f"systemd-nspawn cannot boot a container on this machine: {why}")
        shutil.copy(deb, box.root / "root/llamad.deb")

        # Install: enabled, not started, since no model is configured yet.
        install = box.sh("dpkg -i /root/llamad.deb 2>&1")
        assert "no model configured yet" in install.stdout
        assert box.sh("systemctl is-enabled llamad").stdout.strip() == "enabled"
        assert box.sh("systemctl is-active llamad", check=False).stdout.strip() == "inactive"
        assert box.sh("stat -c '%a %U %G' /etc/llamad.toml").stdout.split() == ["640", "root", "llamad"]
        assert box.sh("stat -c '%U' /var/lib/llamad/models").stdout.strip() == "llamad"
        assert box.sh("command -v llamad").stdout.strip() == "/usr/bin/llamad"
        # Started anyway without a model: a clear failure, and no restart loop.
        assert box.sh("systemctl start llamad", check=False, timeout=120).returncode != 0
        journal = box.sh("journalctl -u llamad -o cat --no-pager").stdout
        assert "config_error" in journal and "at least one .gguf file" in journal, journal[-2000:]
        time.sleep(6)  # longer than RestartSec
        show = box.sh("systemctl show -p NRestarts -p ActiveState llamad").stdout
        assert "NRestarts=0" in show and "ActiveState=failed" in show, show
        box.sh("systemctl reset-failed llamad")

        # Configure and start: `systemctl start` returns once READY=1 arrived.
        port = _free_port()
        box.write("/etc/llamad.toml", _config(port, "demo-one"))
        box.sh("systemctl start llamad", timeout=600)
        assert box.sh("systemctl is-active llamad").stdout.strip() == "active"
        show = box.sh("systemctl show -p StatusText -p User llamad").stdout
        assert "User=llamad" in show and "StatusText=ready" in show, show

        status, health = _http("GET", f"http://127.0.0.1:{port}/health")
        assert status == 200 and health["model"] == "demo-one"
        # Under the unit's syscall filter a load's thread may lower its priority, and with
        # LimitNICE=+10 come back from SCHED_IDLE (llamad.engine.background). systemd clamps
        # the limit to what it may set: where its own hard limit is lower (a container in a
        # container that has none), the service gets less and says nice +10 only.
        priority = box.sh("journalctl -u llamad -o cat --no-pager | grep model_load_priority").stdout
        assert box.sh("systemctl show -p LimitNICE --value llamad").stdout.strip() == "10"
        pid = box.sh("systemctl show -p MainPID --value llamad").stdout.strip()
        limit = int(box.sh(f"grep 'Max nice priority' /proc/{pid}/limits").stdout.split()[-2])  # soft: the one the kernel reads
        if limit >= 10:
            assert "SCHED_IDLE, back to nice +10 if starved" in priority, priority
        else:
            assert "RLIMIT_NICE below 10" in priority, priority  # setpriority and SCHED_IDLE were let through
        status, chat = _chat(port)
        assert status == 200 and chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
        status, message = _message(port)
        assert status == 200 and message["type"] == "message" and message["content"][0]["type"] == "text"

        # journald holds JSON lines with the request's structured fields.
        journal = box.sh("journalctl -u llamad -o json --no-pager").stdout
        records = []
        for line in journal.splitlines():
            try:
                records.append(json.loads(json.loads(line)["MESSAGE"]))
            except (ValueError, KeyError, TypeError):
                continue
        with_request = [r for r in records if isinstance(r, dict) and r.get("request_id") not in (None, "-")]
        assert with_request, journal[-3000:]
        assert all("event" in r and "level" in r for r in with_request)

        # A prompt of 256+ tokens: its state goes to the disk prompt cache when the service
        # stops, in the unit's CacheDirectory (writable under ProtectSystem=strict).
        # (about 450 tokens: within the box's n_ctx of 1024)
        manual = " ".join(f"Rule {i} applies to section {i % 13}." for i in range(40))
        long_chat = {"model": "any", "max_tokens": 4, "messages": [
            {"role": "system", "content": manual}, {"role": "user", "content": "Say hi."}]}  # fmt: skip
        assert _http("POST", f"http://127.0.0.1:{port}/v1/chat/completions", long_chat)[0] == 200

        # An edited TOML takes effect on restart...
        box.write("/etc/llamad.toml", _config(port, "demo-two"))
        box.sh("systemctl restart llamad", timeout=600)
        assert _http("GET", f"http://127.0.0.1:{port}/health")[1]["model"] == "demo-two"
        cache = box.sh("stat -c %U /var/cache/llamad/kv && ls /var/cache/llamad/kv").stdout.split()
        assert cache[0] == "llamad" and any(name.endswith(".kv") for name in cache[1:]), cache

        # ...and on reload: a new model name (a model swap) and an API key, live.
        box.write("/etc/llamad.toml", _config(port, "demo-three", 'api_keys = ["sk-test-key"]\n'))
        box.sh("systemctl reload llamad", timeout=600)
        assert _wait_for(lambda: _http("GET", f"http://127.0.0.1:{port}/health")[1]["model"] == "demo-three")
        assert _chat(port)[0] == 401
        assert _chat(port, {"authorization": "Bearer sk-test-key"})[0] == 200
        assert _message(port, {"x-api-key": "sk-test-key"})[0] == 200

        # A broken TOML on reload is refused; the service keeps serving the old configuration.
        box.write("/etc/llamad.toml", _config(port, "demo-four") + "[limits\n")
        box.sh("systemctl reload llamad", timeout=120)
        assert _wait_for(lambda: "reload_refused" in box.sh("journalctl -u llamad -o cat --no-pager").stdout)
        assert box.sh("systemctl is-active llamad").stdout.strip() == "active"
        assert _chat(port, {"x-api-key": "sk-test-key"})[0] == 200
        assert _http("GET", f"http://127.0.0.1:{port}/health")[1]["model"] == "demo-three"

        # The watchdog: a healthy service keeps pinging; a blocked one is killed and restarted.
        box.write("/etc/llamad.toml", _config(port, "demo-three", 'api_keys = ["sk-test-key"]\n'))
        box.sh(
            "mkdir -p /etc/systemd/system/llamad.service.d && printf '[Service]\\nWatchdogSec=3s\\nTimeoutAbortSec=2s\\n'"
            " > /etc/systemd/system/llamad.service.d/watchdog.conf && systemctl daemon-reload"
            " && systemctl restart llamad",
            timeout=600,
        )
        time.sleep(7)  # more than two watchdog periods of normal serving
        first_pid = box.sh("systemctl show -p MainPID --value llamad").stdout.strip()
        assert box.sh("systemctl is-active llamad").stdout.strip() == "active"
        box.sh(f"kill -STOP {first_pid}")  # the event loop stops: no more WATCHDOG=1
        assert _wait_for(
            lambda: box.sh("systemctl show -p NRestarts --value llamad").stdout.strip() == "1"
            and box.sh("systemctl is-active llamad", check=False).stdout.strip() == "active",
            timeout=90,
        ), box.sh("systemctl status llamad --no-pager", check=False).stdout
        assert box.sh("systemctl show -p MainPID --value llamad").stdout.strip() != first_pid
        assert "watchdog timeout" in box.sh("journalctl -u llamad -o cat --no-pager").stdout.lower()
        assert _chat(port, {"x-api-key": "sk-test-key"})[0] == 200
        box.sh("rm /etc/systemd/system/llamad.service.d/watchdog.conf && systemctl daemon-reload")

        # An upgrade (here: the same package again) restarts a running service.
        before = box.sh("systemctl show -p MainPID --value llamad").stdout.strip()
        box.sh("dpkg -i /root/llamad.deb", timeout=600)
        assert box.sh("systemctl is-active llamad", check=False).stdout.strip() == "active"
        assert box.sh("systemctl show -p MainPID --value llamad").stdout.strip() not in (before, "0")
        assert _wait_for(lambda: _http("GET", f"http://127.0.0.1:{port}/health")[0] == 200)

        # Stop exits cleanly (no SIGKILL, no failure result).
        box.sh("systemctl stop llamad", timeout=120)
        show = box.sh("systemctl show -p Result -p ExecMainStatus -p ActiveState llamad").stdout
        assert "Result=success" in show and "ActiveState=inactive" in show, show

        # Removing the package stops a running service first (it must not keep serving
        # from deleted files); purge then removes what the package made, but keeps models.
        box.sh("systemctl start llamad", timeout=600)
        box.sh("touch /var/lib/llamad/models/keep.gguf /var/lib/llamad/scratch")
        box.sh("dpkg -r llamad", timeout=300)
        assert box.sh("systemctl is-active llamad", check=False).stdout.strip() != "active"
        assert box.sh("pgrep -u llamad", check=False).returncode != 0, "llamad still runs after removal"
        box.sh("dpkg --purge llamad")
        assert box.sh("getent group llamad", check=False).returncode != 0
        assert box.sh("test -e /etc/llamad.toml", check=False).returncode != 0
        assert box.sh("test -e /opt/venvs/llamad", check=False).returncode != 0
        assert box.sh("test -e /var/lib/llamad/scratch", check=False).returncode != 0
        assert box.sh("test -e /var/lib/llamad/models/keep.gguf", check=False).returncode == 0
        assert box.sh("getent passwd llamad", check=False).returncode != 0
        print(f"container test took {time.monotonic() - started:.0f}s")
    except BaseException:
        try:
            print(box.sh("journalctl -u llamad --no-pager -n 80", check=False).stdout)
        except Exception:
            pass
        raise
    finally:
        box.stop()


def _wait_for(condition, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    return False
