"""Several boards behind one endpoint: the shipped HAProxy config (packaging/haproxy/llamad.cfg)
in front of three real llamad instances on loopback.

What a lab with several boards relies on: every request of a mixed load is answered; a
board killed mid-run costs no request that had not started (HAProxy retries it on another
board) and a cut stream ends instead of hanging; a drained board (SIGTERM) finishes its
running requests; and the turns of one conversation stay on the board that holds their
prompt in cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import RunningServer, free_port, start_server
from must_run import require_tools

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "packaging/haproxy/llamad.cfg"
BOARDS = 3
CHECK_INTERVAL_S = 1.0  # `inter` in the shipped config
FALL = 2  # `fall` in the shipped config


def balancer_config(template: str, port: int, boards: list[str], stats_socket: Path) -> str:
    """The shipped config with loopback addresses: only the bind, the board addresses and a
    stats socket for the test change."""
    text = template.replace("bind :8000", f"bind 127.0.0.1:{port}")
    text = text.replace(
        "    log /dev/log local0\n",
        f"    log stdout format raw local0\n    stats socket {stats_socket} mode 600 level admin\n",
    )
    for n, url in enumerate(boards, start=1):
        address = url.removeprefix("http://")
        text = re.sub(rf"(server board{n}) \S+", rf"\1 {address}", text)
    # Boards beyond `boards` are left out; no example address may survive (the test talks
    # to loopback only).
    text = re.sub(r"\n *server board\d+ 192\.0\.2\.\d+:\d+[^\n]*", "", text)
    servers = re.findall(r"^ *server board\d+ (\S+)", text, flags=re.M)
    assert len(servers) == 2 * len(boards) and all(s.startswith("127.0.0.1:") for s in servers), servers
    return text


class Balancer:
    def __init__(self, url: str, process: subprocess.Popen, stats_socket: Path):
        self.url = url
        self.process = process
        self.stats_socket = stats_socket

    def _stats(self, backend: str = "llamad_spread") -> list[dict[str, str]]:
        """HAProxy's `show stat` rows for a backend's boards (by default llamad_spread's,
        whose checks also see connection errors at once)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
        return [r for r in rows if r.get("pxname") == backend and r.get("svname", "").startswith("board")]

    def server_states(self) -> dict[str, str]:
        """board name -> UP / DOWN / ..."""
        return {row["svname"]: row["status"] for row in self._stats()}

    def down_since_kill(self, board: str, killed_at: float) -> float:
        """Seconds from `killed_at` until HAProxy took `board` out (from `lastchg`, the
        seconds since its state last changed)."""
        row = next(r for r in self._stats() if r["svname"] == board)
        return (time.monotonic() - killed_at) - int(row["lastchg"])

    def wait_state(self, board: str, wanted: str, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.server_states().get(board, "").startswith(wanted):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{board} not {wanted} after {timeout} s: {self.server_states()}")


@contextlib.contextmanager
def boards_behind_balancer(tmp_path: Path, n: int = BOARDS, **env: str) -> Iterator[tuple[Balancer, list[RunningServer]]]:
    require_tools("haproxy")
    haproxy = shutil.which("haproxy")
    tmp_path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(start_server(tmp_path, **{"N_THREADS": "1", "N_CTX": "2048", **env})) for _ in range(n)
        ]
        port = free_port()
        stats_socket = tmp_path / "haproxy.sock"
        config = tmp_path / "haproxy.cfg"
        config.write_text(balancer_config(SHIPPED.read_text(), port, [s.url for s in servers], stats_socket))
        log = (tmp_path / "haproxy.log").open("w")
        process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        stack.callback(_stop, process)
        balancer = Balancer(f"http://127.0.0.1:{port}", process, stats_socket)
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                states = balancer.server_states()
                if len(states) == n and all(s.startswith("UP") for s in states.values()):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"boards not UP behind HAProxy: {(tmp_path / 'haproxy.log').read_text()}"
            time.sleep(0.2)
        yield balancer, servers


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- requests of both families, streamed and not -----------------------------------------------


def openai_body(text: str, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    return {
        "model": "any",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
        "temperature": 0,
    }


def anthropic_body(text: str, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    return {"model": "any", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": stream}


def request_of(family: str, stream: bool, text: str, max_tokens: int = 8) -> tuple[str, dict[str, Any]]:
    if family == "openai":
        return "/v1/chat/completions", openai_body(text, stream, max_tokens)
    return "/v1/messages", anthropic_body(text, stream, max_tokens)


def ask(url: str, family: str, stream: bool, text: str, headers: dict[str, str] | None = None, max_tokens: int = 8):
    """One request; returns (status, board, complete) where complete means the answer was
    whole: a body with choices/content, or a stream that reached its last frame."""
    path, body = request_of(family, stream, text, max_tokens)
    headers = {"anthropic-version": "2023-06-01", **(headers or {})}
    with httpx.Client(timeout=httpx.Timeout(120, connect=5)) as client:
        if not stream:
            response = client.post(url + path, json=body, headers=headers)
            if response.status_code != 200:  # HAProxy's own error pages are not JSON
                return response.status_code, response.headers.get("x-llamad-board"), False
            data = response.json()
            complete = "choices" in data or "content" in data
            return response.status_code, response.headers.get("x-llamad-board"), complete
        with client.stream("POST", url + path, json=body, headers=headers) as response:
            text_seen = "".join(response.iter_text())
        last = "data: [DONE]" if family == "openai" else "event: message_stop"
        return response.status_code, response.headers.get("x-llamad-board"), last in text_seen


def test_mixed_load_is_answered_and_spread(tmp_path: Path):
    with boards_behind_balancer(tmp_path) as (balancer, _):
        jobs = [(family, stream, f"Count to {i}.") for i in range(3) for family in ("openai", "anthropic") for stream in (False, True)]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: ask(balancer.url, *job), jobs))
    assert all(status == 200 and complete for status, _, complete in results), results
    # No conversation key: the least busy board takes each request.
    assert len({board for _, board, _ in results}) == BOARDS, results


def test_conversation_stays_on_its_board_and_reuses_its_prompt(tmp_path: Path):
    """8 concurrent two-turn conversations, each keyed as a real agent keys it: the second
    turn lands on the first turn's board and reuses its prefix from that board's cache."""

    def conversation(i: int) -> tuple[str | None, str | None, int, int]:
        # The keys real clients send: Claude Code's header, Codex's header, and a Responses
        # client's prompt_cache_key in the body.
        headers, extra = [
            ({"x-claude-code-session-id": f"session-{i}"}, {}),
            ({"session-id": f"session-{i}"}, {}),
            ({}, {"prompt_cache_key": f"session-{i}"}),
        ][i % 3]
        # A long, conversation-specific system prompt (well past the cache's 64-token floor).
        system = f"Conversation {i}. " + " ".join(f"Fact {i}.{k}: the value is {i * 100 + k}." for k in range(12))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello."}]
        with httpx.Client(timeout=120) as client:
            first = client.post(
                balancer.url + "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 4, "temperature": 0, **extra},
                headers=headers,
            )
            assert first.status_code == 200, first.text
            answer = first.json()["choices"][0]["message"]["content"] or ""
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And goodbye."}]
            second = client.post(
                balancer.url + "/v1/chat/completions",
                json={"messages": messages, "max_tokens": 4, "temperature": 0, **extra},
                headers=headers,
            )
            assert second.status_code == 200, second.text
        usage = second.json()["usage"]
        return (
            first.headers.get("x-llamad-board"),
            second.headers.get("x-llamad-board"),
            first.json()["usage"]["prompt_tokens"],
            usage["prompt_tokens_details"]["cached_tokens"],
        )

    with boards_behind_balancer(tmp_path) as (balancer, _):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(conversation, range(8)))
    for first_board, second_board, first_prompt, cached in results:
        assert first_board and first_board == second_board, results
        # The whole first prompt but its last token (re-evaluated for fresh logits) is reused.
        assert cached >= first_prompt - 2, results
    assert len({first for first, *_ in results}) >= 2, f"all conversations hashed to one board: {results}"


def test_killed_board_loses_no_request_that_had_not_started(tmp_path: Path, capsys):
    with boards_behind_balancer(tmp_path) as (balancer, servers):
        victim = servers[1]
        jobs = [("openai", False, f"Tell a story number {i}.") for i in range(6)]
        jobs += [("anthropic", True, "Tell a long story."), ("openai", True, "Tell a long story.")]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(ask, balancer.url, *job, max_tokens=48) for job in jobs]
            # Kill board2 once it is busy (its /health says it is generating).
            deadline = time.monotonic() + 60
            while not httpx.get(victim.url + "/health", timeout=5).json().get("generating"):
                assert time.monotonic() < deadline, "board2 never got a request"
                time.sleep(0.05)
            killed_at = time.monotonic()
            victim.process.send_signal(signal.SIGKILL)
            results = []
            for future in futures:
                try:
                    results.append(future.result(timeout=180))
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    results.append(("cut", type(exc).__name__, False))
        balancer.wait_state("board2", "DOWN", timeout=FALL * CHECK_INTERVAL_S + 5)
        down_after = balancer.down_since_kill("board2", killed_at)
        after = [ask(balancer.url, "openai", False, f"Again {i}.") for i in range(4)]
    non_streamed = results[:6]
    # Non-streamed answers had sent no byte when board2 died: HAProxy re-sent them elsewhere.
    assert all(status == 200 and complete for status, _, complete in non_streamed), results
    assert all(board != "board2" for _, board, _ in non_streamed), results
    # A stream that was running on board2 is cut (no final frame): it ends, it does not hang.
    for outcome in results[6:]:
        assert outcome[0] in (200, "cut"), results
    with capsys.disabled():
        print(f"\nfailover: board2 out of rotation within {max(down_after, 0) + 1:.0f} s of kill -9 (HAProxy counts whole seconds)")
    assert down_after <= FALL * CHECK_INTERVAL_S + 1
    assert all(status == 200 and complete and board != "board2" for status, board, complete in after), after


def test_drained_board_finishes_its_requests_and_gets_no_new_ones(tmp_path: Path):
    with boards_behind_balancer(tmp_path, LLAMAD_SERVER_SHUTDOWN_GRACE="60") as (balancer, servers):
        victim = servers[0]
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(ask, balancer.url, "openai", i % 2 == 0, f"Story {i}.", max_tokens=32) for i in range(6)]
            deadline = time.monotonic() + 60
            while not httpx.get(victim.url + "/health", timeout=5).json().get("generating"):
                assert time.monotonic() < deadline, "board1 never got a request"
                time.sleep(0.05)
            victim.process.send_signal(signal.SIGTERM)
            later = [pool.submit(ask, balancer.url, "openai", False, f"Later {i}.") for i in range(3)]
            results = [f.result(timeout=180) for f in futures + later]
        balancer.wait_state("board1", "DOWN", timeout=FALL * CHECK_INTERVAL_S + 5)
        assert victim.process.wait(timeout=90) == 0
    assert all(status == 200 and complete for status, _, complete in results), results
    assert all(board != "board1" for _, board, _ in results[6:]), results


# -- overload refusals, retried on another board --------------------------------------------------

# Boards that refuse at once while busy: one slot, no queue of their own. Room for a long
# stream that keeps a board busy for the whole test.
REFUSING = {"PARALLEL": "1", "LLAMAD_SERVER_MAX_QUEUE": "0", "N_CTX": "4096", "MAX_TOKENS_HARD_CAP": "4000"}


class BusyBoard:
    """A long stream sent straight to one board, not through the balancer, holding the
    board's one slot until the `with` block ends."""

    def __init__(self, url: str):
        self.url = url
        self.ended_early = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        body = {**openai_body("Tell a very long story.", True, 4000), "ignore_eos": True}
        try:
            with httpx.Client(timeout=httpx.Timeout(60, connect=5)) as client:
                with client.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
                    for _ in response.iter_lines():
                        if self._stop.is_set():
                            return  # closing the stream frees the slot
        except httpx.HTTPError:
            pass
        self.ended_early = not self._stop.is_set()

    def __enter__(self) -> "BusyBoard":
        self._thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health", timeout=5).json()["slots"]["busy"] < 1:
            assert not self.ended_early and time.monotonic() < deadline, f"{self.url} never got busy"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def refusal(url: str, family: str, stream: bool, headers: dict[str, str] | None = None) -> httpx.Response:
    path, body = request_of(family, stream, "Say hi.")
    with httpx.Client(timeout=httpx.Timeout(120, connect=5)) as client:
        return client.post(url + path, json=body, headers={"anthropic-version": "2023-06-01", **(headers or {})})


def redispatched(balancer: Balancer) -> dict[str, dict[str, int]]:
    """backend -> board -> requests HAProxy took off that board and sent to another."""
    return {
        backend: {row["svname"]: int(row["wredis"] or 0) for row in balancer._stats(backend)}
        for backend in ("llamad_affinity", "llamad_spread")
    }


def test_a_busy_board_refuses_and_another_answers_until_every_board_is_busy(tmp_path: Path):
    """llamad's overload refusals (429, Anthropic's 529) are 503s for HAProxy, which retries
    them on another board; when every board refuses, the client gets the board's own 429/529."""
    key = "a-conversation"
    with boards_behind_balancer(tmp_path, **REFUSING) as (balancer, servers):
        boards = {f"board{n}": server for n, server in enumerate(servers, start=1)}
        # The board the key hashes to: every key kind (header or body) hashes its value.
        status, home, _ = ask(balancer.url, "anthropic", False, "Hi.", {"x-claude-code-session-id": key}, max_tokens=1)
        assert status == 200 and home in boards, (status, home)
        with BusyBoard(boards[home].url) as busy:
            # Straight to the busy board, a client is refused with Anthropic's 529.
            direct = refusal(boards[home].url, "anthropic", False)
            assert direct.status_code == 529 and "x-llamad-refused" not in direct.headers, direct.text
            keyed = [
                (family, stream, headers)
                for family, headers in (("anthropic", {"x-claude-code-session-id": key}), ("openai", {"session-id": key}))
                for stream in (False, True)
            ]
            keyless = [(family, i % 2 == 1, None) for i in range(3) for family in ("openai", "anthropic")]
            answered = [ask(balancer.url, family, stream, "Say hi.", headers) for family, stream, headers in keyed + keyless]
            assert not busy.ended_early
            retried = redispatched(balancer)

            others = [boards[name] for name in boards if name != home]
            with BusyBoard(others[0].url), BusyBoard(others[1].url):
                everyone_busy = [
                    ("openai", refusal(balancer.url, "openai", False)),
                    ("openai", refusal(balancer.url, "openai", True, {"session-id": key})),
                    ("anthropic", refusal(balancer.url, "anthropic", False, {"x-claude-code-session-id": key})),
                    ("anthropic", refusal(balancer.url, "anthropic", True)),
                ]
            assert not busy.ended_early
            retried_when_all_busy = redispatched(balancer)
        states = balancer.server_states()

    # Each request the busy board refused was answered, whole, by another board.
    for (family, stream, headers), (status, board, complete) in zip(keyed + keyless, answered):
        assert status == 200 and complete and board != home, (family, stream, headers, status, board, home)
    # ...and that is HAProxy's retry at work: every keyed request was taken off its board,
    # and least-connections sent some keyless ones to the busy board too.
    assert retried["llamad_affinity"][home] == len(keyed), retried
    assert retried["llamad_spread"][home] >= 1, retried
    # With every board busy, each board refused in turn (two retries a request), and the
    # client got what one board sends a direct client: 429 or 529, its body and Retry-After.
    tries = sum(sum(counts.values()) for counts in retried_when_all_busy.values()) - sum(
        sum(counts.values()) for counts in retried.values()
    )
    assert tries == 2 * len(everyone_busy), (retried, retried_when_all_busy)
    for family, response in everyone_busy:
        assert response.status_code == (429 if family == "openai" else 529), response.text
        assert response.headers["retry-after"] == "1"
        assert "x-llamad-refused" not in response.headers
        body = response.json()
        if family == "openai":
            assert body["error"]["type"] == "rate_limit_error", body
        else:
            assert body["type"] == "error" and body["error"]["type"] == "overloaded_error", body
    # A refusal is not a failure: no board was taken out.
    assert all(state.startswith("UP") for state in states.values()), states


def test_shipped_config_is_valid():
    require_tools("haproxy")
    haproxy = shutil.which("haproxy")
    result = subprocess.run([haproxy, "-c", "-f", str(SHIPPED)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scale_out_figures(tmp_path: Path, capsys):
    """Aggregate decode rate through the balancer with 1, 2 and 3 boards (each llamad with one
    thread), 6 concurrent 32-token answers. Printed for the README (`-s` shows them); the
    assertion is only that every request is answered: on a shared 2-core box the rate says
    little about boards that each have their own cores."""
    figures = {}
    for n in (1, 2, 3):
        with boards_behind_balancer(tmp_path / f"n{n}", n=n) as (balancer, _):
            def one(i: int) -> int:
                with httpx.Client(timeout=180) as client:
                    response = client.post(
                        balancer.url + "/v1/chat/completions",
                        json={**openai_body(f"Write about the number {i}.", False, 32), "temperature": 0.8},
                    )
                assert response.status_code == 200, response.text
                return response.json()["usage"]["completion_tokens"]

            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                tokens = sum(pool.map(one, range(6)))
            figures[n] = tokens / (time.monotonic() - started)
    with capsys.disabled():
        print("\nscale-out, aggregate tok/s: " + ", ".join(f"{n} board(s) {rate:.1f}" for n, rate in figures.items()))
    assert all(rate > 0 for rate in figures.values())
