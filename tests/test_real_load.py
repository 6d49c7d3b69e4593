"""Serving under load, with the real engine: hang-ups, overload, cache reuse, SIGTERM.

Assertions are on behaviour (who got what answer, what the server reports afterwards),
not on timings: the machine is shared and slow.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import threading
import time

import httpx
import pytest

from conftest import start_server

pytestmark = pytest.mark.real

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def wait_idle(base: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(base + "/health", timeout=5).json()
        if not health["generating"] and health["queue_depth"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


def read_first_token_then_hang_up(base: str, path: str, body: dict) -> bool:
    """Opens a stream, reads until the first content arrives, then closes the connection."""
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", base + path, json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line or "text_delta" in line:
                    return True
    return False


def test_hundred_streams_that_hang_up_leave_the_server_healthy(real_server):
    cancelled_before = metric(real_server, "llamad_generations_cancelled_total")
    body = {"model": "x", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 500, "stream": True}
    anthropic_body = {"model": "x", "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "Tell a long story."}]}

    def one(i: int) -> bool:
        if i % 2:
            return read_first_token_then_hang_up(real_server, MESSAGES, anthropic_body)
        return read_first_token_then_hang_up(real_server, CHAT, body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        got_tokens = list(pool.map(one, range(100)))
    assert sum(got_tokens) == 100
    health = wait_idle(real_server)
    assert health["status"] == "ok"
    cancelled = metric(real_server, "llamad_generations_cancelled_total") - cancelled_before
    assert cancelled >= 95  # a few may have reached their end before the hang-up landed
    # The engine is free: a normal request is answered in full.
    answer = httpx.post(
        real_server + CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}, timeout=60
    )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] > 0


def test_a_hang_up_frees_the_engine_for_the_next_request(real_server):
    """A 1,000-token answer whose client hangs up stops: the tokens generated in total stay
    far below what running it to the end would have cost."""
    wait_idle(real_server)
    tokens_before = metric(real_server, "llamad_completion_tokens_total")
    long_body = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 1000,
                 "temperature": 1.0, "stream": True}
    assert read_first_token_then_hang_up(real_server, CHAT, long_body)
    hung_up = time.monotonic()
    with httpx.stream(
        "POST",
        real_server + CHAT,
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    next_first_token_s = time.monotonic() - hung_up
    print(f"\nhang-up to next request's first token: {next_first_token_s * 1000:.0f} ms")
    wait_idle(real_server)
    generated = metric(real_server, "llamad_completion_tokens_total") - tokens_before
    assert generated < 200, f"{generated} tokens generated: the hung-up answer kept running"


def test_more_requests_than_the_queue_get_fast_overload_errors(tmp_path):
    with start_server(tmp_path, "[server]\nmax_queue = 2\n") as server:
        base = server.url
        first_done = threading.Event()
        long_results: list[httpx.Response] = []
        # One long request per slot (server.parallel) holds the whole engine.
        slots = httpx.get(base + "/health").json()["slots"]["total"]

        def long_request() -> None:
            r = httpx.post(
                base + CHAT,
                json={"messages": [{"role": "user", "content": "Write an essay."}], "max_tokens": 120, "temperature": 0},
                timeout=600,
            )
            long_results.append(r)
            first_done.set()

        threads = [threading.Thread(target=long_request) for _ in range(slots)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while httpx.get(base + "/health").json()["slots"]["busy"] < slots:
            assert time.monotonic() < deadline
            time.sleep(0.02)

        def short(i: int) -> httpx.Response:
            if i % 2:
                return httpx.post(
                    base + MESSAGES,
                    json={"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": f"Hi {i}"}]},
                    timeout=300,
                )
            return httpx.post(
                base + CHAT, json={"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 4}, timeout=300
            )

        results: dict[int, httpx.Response] = {}
        overload_seen_while_busy = []
        # The first two wait in the queue; send them, then the rest, which must bounce.
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            queued = {i: pool.submit(short, i) for i in (0, 1)}
            while httpx.get(base + "/health").json()["queue_depth"] < 2:
                time.sleep(0.02)
            for i in range(2, 8):
                results[i] = short(i)
                overload_seen_while_busy.append(not first_done.is_set())
            for i, future in queued.items():
                results[i] = future.result()
        for thread in threads:
            thread.join()
        assert [r.status_code for r in long_results] == [200] * slots
        for i in (0, 1):
            assert results[i].status_code == 200, results[i].text
        for i in range(2, 8):
            response = results[i]
            if i % 2:
                assert response.status_code == 529
                assert response.json()["error"]["type"] == "overloaded_error"
            else:
                assert response.status_code == 429
                assert response.json()["error"]["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
        assert all(overload_seen_while_busy), "overload answers should come back while the engine is busy"
        wait_idle(base)


def test_second_turn_reuses_the_prompt_cache(real_server):
    system = "You are a support agent. " + " ".join(f"Policy {i}: be kind to customer {i}." for i in range(60))
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}]
    first = httpx.post(real_server + CHAT, json={"messages": turn1, "max_tokens": 8, "temperature": 0}, timeout=120)
    # Another client in between, so the live context is overwritten.
    httpx.post(real_server + CHAT, json={"messages": [{"role": "user", "content": "Unrelated"}], "max_tokens": 4}, timeout=60)
    hits_before = metric(real_server, "llamad_prompt_cache_hits_total")
    turn2 = turn1 + [
        {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Thanks. And now?"},
    ]
    second = httpx.post(real_server + CHAT, json={"messages": turn2, "max_tokens": 8, "temperature": 0}, timeout=120)
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"] - 8
    assert metric(real_server, "llamad_prompt_cache_hits_total") == hits_before + 1
    assert metric(real_server, "llamad_prompt_cache_hit_ratio") > 0


def test_sigterm_during_generation_finishes_it_and_exits_cleanly(tmp_path):
    with start_server(tmp_path, "[server]\nshutdown_grace = 60\n") as server:
        base = server.url
        # One running stream per slot (server.parallel), so the next request queues.
        slots = httpx.get(base + "/health").json()["slots"]["total"]
        streams: list[list[str]] = [[] for _ in range(slots)]

        def stream(lines: list[str]) -> None:
            with httpx.stream(
                "POST",
                base + CHAT,
                json={"messages": [{"role": "user", "content": "Story"}], "max_tokens": 120, "stream": True},
                timeout=120,
            ) as response:
                for line in response.iter_lines():
                    lines.append(line)

        threads = [threading.Thread(target=stream, args=(lines,)) for lines in streams]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        for lines in streams:
            while not any('"content":"' in l and '"content":""' not in l for l in list(lines)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        queued = {}

        def queued_request() -> None:
            queued["r"] = httpx.post(
                base + CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=60
            )

        waiter = threading.Thread(target=queued_request)
        waiter.start()
        while httpx.get(base + "/health").json()["queue_depth"] < 1:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        waiter.join(timeout=60)
        code = server.process.wait(timeout=60)
        assert code == 0, server.log()
        for lines in streams:
            assert [l for l in lines if l][-1] == "data: [DONE]"  # the running answers were finished, not cut
        assert queued["r"].status_code == 503  # the waiting one got a retryable error
        assert "retry-after" in queued["r"].headers
        assert "Traceback" not in server.log()
