"""`llamad bench`: the engine's own decode rate against the same model behind HTTP.

All figures come from one run on one machine, so their ratios are meaningful even on a
noisy, shared box. Phases:
  1-2. engine and http, interleaved run by run: llama-cpp-python's low-level generate()
     loop in-process, no HTTP (the ceiling), and its create_chat_completion(stream=True) for
     reference; then a running llamad (started here, or --url): a streamed and a
     non-streamed answer;
  3. concurrency: N parallel streams: aggregate tokens/s and time-to-first-token spread;
  4. prompt cache: a second chat turn sharing a ~1,500-token prefix with the first;
  5. hang-up: a client disconnects while its answer is decoding, and while its long prompt
     is still being evaluated; the time from the disconnect to the first token of the
     request queued behind it;
  6. agent (with --agent FILE, a captured Claude Code request such as
     tests/data/captures/claude_code/01_post_v1_messages.json): that request cold, then its
     next turn (the answer and a new user message appended), time to first token of each.

With --restart FILE (a captured agent request, as for --agent) it runs one case instead:
that request's time to first token cold, again after llamad is stopped and started on the
same disk cache ([cache]), and again warm in memory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import secrets
import signal
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llamad.bench.report import render_table
from llamad.bench.servers import bench_cache_dir, start_llamad
from llamad.config import LoadedConfig, resolve_model

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a long story about a robot that learns to garden."},
]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# -- the engine alone, in this process ---------------------------------------------------------------


class EngineBench:
    """The model loaded in this process, driven by llama-cpp-python's low-level generate()
    loop: the ceiling a server can reach. Its runs are interleaved with the HTTP runs, so a
    machine that gets busier or quieter during the benchmark moves both alike."""

    def __init__(self, loaded: LoadedConfig, tokens: int):
        import os

        import llama_cpp
        import msgspec

        from llamad.config import KV_CACHE_TYPES
        from llamad.engine.chat import Chat, ChatMessage
        from llamad.engine.llama import LlamaEngine

        self.tokens = tokens
        config, model = loaded.config, resolve_model(loaded).path
        # The prompt as the server renders it; that engine (one slot) is closed before
        # llama-cpp-python's own Llama, with a context as large as one slot's, loads.
        engine = LlamaEngine(
            msgspec.structs.replace(  # no disk cache ([cache]): nothing here is worth keeping
                config, server=msgspec.structs.replace(config.server, parallel=1), cache=msgspec.structs.replace(config.cache, max_bytes=0)
            ),
            model,
        )
        engine._load()  # noqa: SLF001 - in-process, no event loop needed
        try:
            self.prompt = engine._prepare(Chat(messages=[ChatMessage(m["role"], m["content"]) for m in PROMPT]))  # noqa: SLF001
            # The server's flash attention ("auto" is its measured choice); llama-cpp-python's
            # Llama has no "auto" of its own, so an unmeasured one runs with it off here.
            flash_attn = engine.flash_attn is not None and engine.flash_attn.effective == "on"
        finally:
            engine.close()
        m = config.model
        threads = m.n_threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(
            model_path=str(model), n_ctx=m.n_ctx, n_batch=m.n_batch, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=m.n_gpu_layers, type_k=KV_CACHE_TYPES[m.type_k], type_v=KV_CACHE_TYPES[m.type_v],
            flash_attn=flash_attn, verbose=False,
        )
        self.is_eog = lambda token: llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token)  # noqa: SLF001
        self.decode_rates: list[float] = []
        self.totals: list[float] = []
        self.counts: list[int] = []
        self.reference_rates: list[float] = []

    def decode_run(self) -> None:
        self.llm.reset()
        started = time.perf_counter()
        first = last = None
        n = 0
        for token in self.llm.generate(self.prompt.tokens, temp=0.0, top_k=1):
            now = time.perf_counter()
            if self.is_eog(token):
                break
            first = first or now
            last = now
            n += 1
            if n >= self.tokens:
                break
        self.counts.append(n)
        self.totals.append(time.perf_counter() - started)
        if n > 1 and first and last:
            self.decode_rates.append((n - 1) / (last - first))

    def reference_run(self) -> None:
        """llama-cpp-python's own streaming chat path, for comparison."""
        self.llm.reset()
        first = last = None
        n = 0
        for chunk in self.llm.create_chat_completion(
            messages=PROMPT, max_tokens=self.tokens, temperature=0.0, top_k=1, stream=True
        ):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        if n > 1 and first and last:
            self.reference_rates.append((n - 1) / (last - first))

    def close(self) -> dict[str, Any]:
        self.llm = None
        return {
            "prompt_tokens": len(self.prompt.tokens),
            "completion_tokens": int(_median(self.counts)),
            "decode_tokens_per_s": _median(self.decode_rates),
            "total_s": _median(self.totals),
            "llama_cpp_python_stream_chunks_per_s": _median(self.reference_rates),
        }


# -- through HTTP -------------------------------------------------------------------


class Http:
    def __init__(self, url: str):
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        started = time.perf_counter()
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read())
        connection.close()
        return response.status, data, time.perf_counter() - started

    def stream(self, path: str, body: dict[str, Any], times: list[float] | None = None) -> dict[str, Any]:
        """Streams one OpenAI answer; returns timings of the content chunks and usage
        (`times`, when given, gets the arrival time of every content chunk)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        started = time.perf_counter()
        connection.request(
            "POST",
            path,
            json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        first = last = None
        chunks = 0
        usage: dict[str, Any] = {}
        status = response.status
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            # Parse as little as possible per chunk: this client shares the machine
            # with the server, and its own work would show up as a slower stream.
            if b'"content":"' in line and b'"content":""' not in line:
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                if times is not None:
                    times.append(now)
            if b'"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
            elif line.startswith(b"data: [DONE]"):
                break
        connection.close()
        end = time.perf_counter()
        return {
            "status": status,
            "ttft_s": (first - started) if first else float("nan"),
            "first": first,
            "last": last,
            "total_s": end - started,
            # A server that sends no usage: one content chunk per token.
            "completion_tokens": usage.get("completion_tokens", chunks),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        }


    def stream_read_late(self, path: str, body: dict[str, Any], wait_s: float) -> float:
        """Streams one answer but reads it only after `wait_s` (the socket buffers it), so
        the client does not wake for every token; returns the time to the end of the stream.
        On a machine where client and server share few cores, this separates the server's
        cost of streaming from the cost of a client reading each token as it comes."""
        payload = json.dumps({**body, "stream": True}).encode()
        started = time.perf_counter()
        with socket.create_connection((self.host, self.port), timeout=600) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
            )
            time.sleep(wait_s)
            received = b""
            while b"data: [DONE]" not in received[-64:]:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                received += chunk
        return time.perf_counter() - started


def bench_http(client: Http, tokens: int, runs: int, engine: EngineBench | None = None) -> dict[str, Any]:
    # ignore_eos: every answer is `tokens` long, whether or not the model would end its turn.
    body = {"model": "bench", "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "top_k": 1, "ignore_eos": True}
    client.post("/v1/chat/completions", {**body, "max_tokens": 4})  # warm-up
    streamed_rates, streamed_totals, ttfts, streamed_tokens = [], [], [], []
    plain_totals, plain_tokens, late_totals = [], [], []
    for _ in range(runs):
        if engine is not None:
            engine.decode_run()
            engine.reference_run()
        result = client.stream("/v1/chat/completions", body)
        n = result["completion_tokens"]
        streamed_tokens.append(n)
        streamed_totals.append(result["total_s"])
        ttfts.append(result["ttft_s"])
        if n > 1 and result["first"] and result["last"]:
            streamed_rates.append((n - 1) / (result["last"] - result["first"]))
        status, data, elapsed = client.post("/v1/chat/completions", body)
        plain_totals.append(elapsed)
        plain_tokens.append(data.get("usage", {}).get("completion_tokens", 0))
        late_totals.append(client.stream_read_late("/v1/chat/completions", body, wait_s=0.8 * elapsed))
    return {
        "streamed_read_late_total_s": _median(late_totals),
        "streamed_read_late_tokens_per_s_end_to_end": _median(streamed_tokens) / _median(late_totals),
        "streamed_decode_tokens_per_s": _median(streamed_rates),
        "streamed_tokens_per_s_end_to_end": _median(streamed_tokens) / _median(streamed_totals),
        "streamed_ttft_s": _median(ttfts),
        "streamed_total_s": _median(streamed_totals),
        "non_streamed_tokens_per_s_end_to_end": _median(plain_tokens) / _median(plain_totals),
        "non_streamed_total_s": _median(plain_totals),
        "completion_tokens": int(_median(streamed_tokens)),
    }


def bench_concurrency(client: Http, streams: int, tokens: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in range(streams)]

    def one(i: int) -> None:
        body = {
            "model": "bench",
            "messages": [{"role": "user", "content": f"Story number {i}: tell me about a lighthouse keeper."}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        results[i] = client.stream("/v1/chat/completions", body)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ttfts = [r["ttft_s"] for r in results if r]
    total_tokens = sum(r.get("completion_tokens", 0) for r in results)
    return {
        "streams": streams,
        "ok": sum(1 for r in results if r.get("status") == 200),
        "aggregate_tokens_per_s": total_tokens / wall,
        "ttft_p50_s": _percentile(ttfts, 0.5),
        "ttft_p90_s": _percentile(ttfts, 0.9),
        "ttft_max_s": max(ttfts) if ttfts else float("nan"),
        "wall_s": wall,
    }


def _manual(prefix_tokens: int) -> str:
    """A system prompt of about `prefix_tokens` tokens (about 1.3 per word for this text
    with common tokenizers); a nonce keeps it out of the prompt cache."""
    words = max(1, int(prefix_tokens / 1.3))
    manual = " ".join(f"rule{i % 97} applies to section {i % 13};" for i in range(words // 5))
    return f"Session {secrets.token_hex(4)}. You are an agent. Operating manual: {manual}"


def bench_cache(client: Http, prefix_tokens: int) -> dict[str, Any]:
    system = _manual(prefix_tokens)
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "What is rule 5?"}]
    first = client.stream("/v1/chat/completions", {"model": "bench", "messages": turn1, "max_tokens": 8, "temperature": 0})
    # Another client's request in between: the cache must survive it.
    client.stream(
        "/v1/chat/completions",
        {"model": "bench", "messages": [{"role": "user", "content": "Unrelated question."}], "max_tokens": 4},
    )
    turn2 = turn1 + [
        {"role": "assistant", "content": "Rule 5 applies to section 5."},
        {"role": "user", "content": "And rule 6?"},
    ]
    second = client.stream("/v1/chat/completions", {"model": "bench", "messages": turn2, "max_tokens": 8, "temperature": 0})
    return {
        "turn1_ttft_s": first["ttft_s"],
        "turn2_ttft_s": second["ttft_s"],
        "turn2_over_turn1": second["ttft_s"] / first["ttft_s"] if first["ttft_s"] else float("nan"),
        "turn2_cached_tokens": second["cached_tokens"],
    }


def _anthropic_stream(client: Http, body: dict[str, Any]) -> dict[str, Any]:
    """Streams one Anthropic message; returns its time to first token, text and final usage."""
    connection = http.client.HTTPConnection(client.host, client.port, timeout=1800)
    started = time.perf_counter()
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    connection.request("POST", "/v1/messages?beta=true", json.dumps({**body, "stream": True}), headers)
    response = connection.getresponse()
    first, text, usage = None, "", {}
    for line in response:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        if event["type"] == "content_block_delta":
            first = first or time.perf_counter()
            text += event["delta"].get("text", "") or event["delta"].get("partial_json", "")
        elif event["type"] == "message_delta":
            usage = event["usage"]
        elif event["type"] in ("message_stop", "error"):
            break
    connection.close()
    return {"status": response.status, "ttft_s": (first - started) if first else float("nan"), "text": text, "usage": usage}


def bench_agent(client: Http, request_file: Path, max_tokens: int) -> dict[str, Any]:
    """A captured agent request cold, then its next turn sharing the prefix."""
    captured = json.loads(request_file.read_text())
    turn1 = {**captured.get("body", captured), "max_tokens": max_tokens}
    # A nonce at the top keeps a repeated run (--url) from finding turn 1 in the cache.
    turn1["system"] = [{"type": "text", "text": f"Session {secrets.token_hex(4)}."}] + list(turn1.get("system") or [])
    first = _anthropic_stream(client, turn1)
    turn2 = {
        **turn1,
        "messages": turn1["messages"]
        + [{"role": "assistant", "content": first["text"] or "OK"}, {"role": "user", "content": "Thanks. Now say DONE."}],
    }
    second = _anthropic_stream(client, turn2)
    if first["status"] != 200 or second["status"] != 200:
        raise RuntimeError(
            f"the agent request was refused (HTTP {first['status']} / {second['status']}): "
            "is model.n_ctx large enough? Claude Code's first request is ~12,000 tokens (etc/llamad.toml: 32768)"
        )
    prompt = second["usage"].get("input_tokens", 0) + second["usage"].get("cache_read_input_tokens", 0)
    return {
        "turn1_prompt_tokens": first["usage"].get("input_tokens", 0) + first["usage"].get("cache_read_input_tokens", 0),
        "turn1_ttft_s": first["ttft_s"],
        "turn2_ttft_s": second["ttft_s"],
        "turn2_prompt_tokens": prompt,
        "turn2_cache_read_tokens": second["usage"].get("cache_read_input_tokens", 0),
    }


# The restart case's context: Claude Code's first request is ~12,000 tokens on the demo model.
RESTART_N_CTX = 16384


def _stop(process: Any) -> float:
    """SIGTERM, as systemctl stop sends it; the seconds until the process has exited (it
    writes its slots to the disk cache first)."""
    started = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    return time.perf_counter() - started


def bench_restart(loaded: LoadedConfig, request_file: Path, max_tokens: int) -> dict[str, Any]:
    """A captured agent request cold, then after a restart (llamad stopped and started again
    on the same disk cache), then warm (the same server, the state in its slot)."""
    captured = json.loads(request_file.read_text())
    body = {**captured.get("body", captured), "max_tokens": max_tokens}
    cache_dir = bench_cache_dir()
    env = {
        "LLAMAD_CACHE_DIR": cache_dir,
        "LLAMAD_MODEL_N_CTX": str(max(loaded.config.model.n_ctx, RESTART_N_CTX)),
    }
    process, url = start_llamad(loaded, env)
    try:
        cold = _anthropic_stream(Http(url), body)
    finally:
        stop_s = _stop(process)
    files = list(Path(cache_dir).glob("*.kv"))
    started = time.perf_counter()
    process, url = start_llamad(loaded, env)
    ready_s = time.perf_counter() - started
    try:
        client = Http(url)
        after = _anthropic_stream(client, body)
        warm = _anthropic_stream(client, body)
    finally:
        _stop(process)
    for name, result in (("cold", cold), ("after_restart", after), ("warm", warm)):
        if result["status"] != 200:
            raise RuntimeError(f"the {name} request was refused (HTTP {result['status']})")

    def prompt(result: dict[str, Any]) -> int:
        return result["usage"].get("input_tokens", 0) + result["usage"].get("cache_read_input_tokens", 0)

    return {
        "prompt_tokens": prompt(cold),
        "cold_ttft_s": cold["ttft_s"],
        "after_restart_ttft_s": after["ttft_s"],
        "after_restart_cached_tokens": after["usage"].get("cache_read_input_tokens", 0),
        "warm_ttft_s": warm["ttft_s"],
        "warm_cached_tokens": warm["usage"].get("cache_read_input_tokens", 0),
        "after_restart_over_cold": after["ttft_s"] / cold["ttft_s"] if cold["ttft_s"] else float("nan"),
        "stop_s": stop_s,
        "start_to_ready_s": ready_s,
        "disk_files": len(files),
        "disk_bytes": sum(f.stat().st_size for f in files),
    }


def bench_hangup(client: Http, prefix_tokens: int) -> dict[str, Any]:
    """Disconnect to the next request's first token, while decoding and during the prompt."""
    results: dict[str, Any] = {}
    for phase in ("decode", "prompt"):
        system = _manual(max(prefix_tokens, 1000)) if phase == "prompt" else "You are a storyteller."
        body = {
            "model": "bench",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 1000,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,  # still decoding when the client leaves
        }
        leaving = http.client.HTTPConnection(client.host, client.port, timeout=600)
        leaving.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = leaving.getresponse()  # the headers come once the engine has taken it
        if phase == "decode":
            seen = 0
            while seen < 10:  # well into the answer
                line = response.readline()
                seen += b'"content":"' in line and b'"content":""' not in line
        next_result: dict[str, Any] = {}
        follower = threading.Thread(
            target=lambda: next_result.update(
                client.stream(
                    "/v1/chat/completions",
                    {"model": "bench", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
                )
            )
        )
        follower.start()
        time.sleep(0.5)  # the follower is queued behind the running request
        hung_up = time.perf_counter()
        leaving.sock.shutdown(socket.SHUT_RDWR)
        leaving.close()
        follower.join()
        first = next_result.get("first")
        results[f"{phase}_to_next_first_token_s"] = (first - hung_up) if first else float("nan")
    return results


# -- orchestration -----------------------------------------------------------------------------


def bench_embeddings(client: Http, inputs: int) -> dict[str, Any]:
    """Inputs/s of /v1/embeddings: `inputs` sentences in one request (batched in the engine)."""
    texts = [f"Sentence {i}: the quick brown fox jumps over the lazy dog." for i in range(inputs)]
    client.post("/v1/embeddings", {"input": texts[:1]})  # warm-up: creates the embedding context
    status, data, elapsed = client.post("/v1/embeddings", {"input": texts})
    if status != 200:
        raise RuntimeError(f"/v1/embeddings answered {status}: {data}")
    return {
        "inputs": inputs,
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "seconds": elapsed,
        "inputs_per_s": inputs / elapsed,
        "width": len(data["data"][0]["embedding"]),
    }


def run_bench(loaded: LoadedConfig, args: argparse.Namespace) -> int:
    if getattr(args, "restart", None):
        results = {"model": str(resolve_model(loaded).path), "restart": bench_restart(loaded, Path(args.restart), 4)}
        print(render_table(results))
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    results: dict[str, Any] = {"model": str(resolve_model(loaded).path) if not args.url else args.url}
    print(f"llamad bench: {results['model']}, {args.tokens} tokens, {args.runs} runs each", flush=True)
    engine = EngineBench(loaded, args.tokens) if not args.url else None
    process = None
    url = args.url
    if not url:
        process, url = start_llamad(loaded)
    try:
        client = Http(url)
        results["http"] = bench_http(client, args.tokens, args.runs, engine)
        results["engine"] = engine.close() if engine else None
        if args.concurrency > 0:
            results["concurrency"] = bench_concurrency(client, args.concurrency, max(16, args.tokens // 2))
        streams = [int(n) for n in args.streams.split(",") if n.strip()] if args.streams else []
        if streams:
            results["parallel"] = [bench_concurrency(client, n, args.tokens) for n in streams]
        if args.prefix_tokens > 0:
            results["prompt_cache"] = bench_cache(client, args.prefix_tokens)
        results["hangup"] = bench_hangup(client, args.prefix_tokens)
        if getattr(args, "embed_inputs", 0) > 0:
            results["embeddings"] = bench_embeddings(client, args.embed_inputs)
        if args.agent:
            results["agent"] = bench_agent(client, Path(args.agent), max(4, min(args.tokens, 16)))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    engine = results["engine"]
    web = results["http"]
    if engine:
        results["streamed_over_engine"] = web["streamed_decode_tokens_per_s"] / engine["decode_tokens_per_s"]
    results["streamed_over_non_streamed_end_to_end"] = (
        web["streamed_tokens_per_s_end_to_end"] / web["non_streamed_tokens_per_s_end_to_end"]
    )
    results["streamed_read_late_over_non_streamed"] = (
        web["streamed_read_late_tokens_per_s_end_to_end"] / web["non_streamed_tokens_per_s_end_to_end"]
    )
    print(render_table(results))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
