"""`llamad bench --llama-server PATH`: llamad's slots beside llama-server, in one run.

llama-server built from the llama.cpp that llamad links is the yardstick for continuous
batching. Three servers run side by side on loopback: llamad (with the configured
`server.parallel`), `llama-server -np 1` and `llama-server -np 4`, the same model, threads
and context per slot. Every phase runs against each server in turn, so a machine that gets
busier or quieter moves all three alike; ratios between them are the figures to read.

First, before any server starts, llama.cpp's batched decode alone (llamad.bench.ceiling): the
ceiling of every server's "4 streams / 1 stream" on this machine. Then the phases: one
stream's decode rate; 1, 2, 4 and 8 parallel streams (aggregate tokens/s, time
to first token p50/p90/max); a cold prompt of about `--prefix-tokens` words (~3,250 Gemma tokens for 2,300) and its time to first token; three
streams decoding while a ~2,000-token prompt arrives (their gaps between tokens during its
evaluation, against the same three streams alone); a second chat turn's time to first
token over the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from llamad.bench.run import (
    Http,
    _manual,
    _median,
    _percentile,
    bench_cache,
    bench_concurrency,
)
from llamad.bench.ceiling import decode_rates
from llamad.bench.servers import dies_with_parent, free_port, start_llamad, wait_healthy
from llamad.config import LoadedConfig, resolve_model

STREAMS = (1, 2, 4, 8)


def start_llama_server(
    binary: str, model: Path, parallel: int, loaded: LoadedConfig, extra: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    m = loaded.config.model
    threads = m.n_threads or os.cpu_count() or 1
    port = free_port()
    args = [
        binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(parallel), "-c", str(parallel * m.n_ctx), "-b", str(m.n_batch),
        "-t", str(threads), "-tb", str(threads), "--no-webui", *(extra or []),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=dies_with_parent)
    return process, wait_healthy(process, port, f"llama-server ({' '.join(args)})")


def single_stream(client: Http, tokens: int) -> float:
    body = {"model": "bench", "messages": [{"role": "user", "content": "Tell me a long story about a robot that learns to garden."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    result = client.stream("/v1/chat/completions", body)
    n = result["completion_tokens"]
    if n > 1 and result["first"] and result["last"] and result["last"] > result["first"]:
        return (n - 1) / (result["last"] - result["first"])
    return float("nan")


def cold_prefill(client: Http, prompt_tokens: int) -> float:
    body = {"model": "bench", "messages": [{"role": "system", "content": _manual(prompt_tokens)},
                                           {"role": "user", "content": "What is rule 5?"}], "max_tokens": 4, "temperature": 0}
    return client.stream("/v1/chat/completions", body)["ttft_s"]


def _gaps(times: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in zip(times, times[1:]) if start <= a and b <= end]


def long_prompt_amid_streams(client: Http, tokens: int, prompt_tokens: int) -> dict[str, float]:
    """Three streams decode; a long prompt arrives. Their gaps between tokens while it is
    evaluated, against their gaps in a run of the same three streams without it."""

    def three_streams(times: list[list[float]]) -> list[threading.Thread]:
        threads = []
        for i in range(3):
            body = {"model": "bench", "messages": [{"role": "user", "content": f"Story {i}: a lighthouse keeper."}],
                    "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            thread = threading.Thread(target=client.stream, args=("/v1/chat/completions", body, times[i]))
            thread.start()
            threads.append(thread)
        return threads

    alone: list[list[float]] = [[], [], []]
    for thread in three_streams(alone):
        thread.join()
    alone_gaps = [gap for times in alone for gap in _gaps(times, times[len(times) // 4], times[-1])] if all(alone) else []

    mixed: list[list[float]] = [[], [], []]
    threads = three_streams(mixed)
    deadline = time.monotonic() + 300
    while not all(len(times) >= 5 for times in mixed) and time.monotonic() < deadline:
        time.sleep(0.01)
    arrived = time.perf_counter()
    long_body = {"model": "bench", "messages": [{"role": "system", "content": _manual(prompt_tokens)},
                                                {"role": "user", "content": "Summarise."}], "max_tokens": 2, "temperature": 0}
    long_result = client.stream("/v1/chat/completions", long_body)
    for thread in threads:
        thread.join()
    evaluated = long_result["first"] or time.perf_counter()
    during = [gap for times in mixed for gap in _gaps(times, arrived, evaluated)]
    return {
        "alone_gap_p50_s": _percentile(alone_gaps, 0.5),
        "alone_gap_p99_s": _percentile(alone_gaps, 0.99),
        "during_gap_p99_s": _percentile(during, 0.99),
        "during_gaps": len(during),
        "long_prompt_ttft_s": evaluated - arrived,
    }


def run_side_by_side(loaded: LoadedConfig, args: argparse.Namespace) -> int:
    model = resolve_model(loaded).path
    print(f"llamad bench, side by side with {args.llama_server}: {model}", flush=True)
    # Before any server starts: llama.cpp's batched decode alone, the ceiling of the ratios.
    ceiling = decode_rates(loaded, model, STREAMS)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        servers["llamad"] = start_llamad(loaded)
        servers["llama-server -np 1"] = start_llama_server(args.llama_server, model, 1, loaded)
        servers["llama-server -np 4"] = start_llama_server(args.llama_server, model, 4, loaded)
        clients = {name: Http(url) for name, (_, url) in servers.items()}
        results: dict[str, dict[str, Any]] = {name: {} for name in servers}
        for client in clients.values():  # warm-up
            client.stream("/v1/chat/completions", {"model": "bench", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.runs):
            for name, client in clients.items():
                rates[name].append(single_stream(client, args.tokens))
        for name in servers:
            results[name]["single_decode_tokens_per_s"] = _median(rates[name])
        for streams in STREAMS:
            for name, client in clients.items():
                results[name][f"streams_{streams}"] = bench_concurrency(client, streams, args.tokens)
        ttfts: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(2):
            for name, client in clients.items():
                ttfts[name].append(cold_prefill(client, args.prefix_tokens))
        for name in servers:
            results[name]["cold_prefill_ttft_s"] = _median(ttfts[name])
        for name, client in clients.items():
            results[name]["long_prompt_amid_3"] = long_prompt_amid_streams(client, max(args.tokens, 160), 2000)
        for name, client in clients.items():
            results[name]["prompt_cache"] = bench_cache(client, args.prefix_tokens)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    print(render_side_by_side(results))
    print(render_ceiling(ceiling))
    document = {**results, "engine alone": ceiling}
    print(json.dumps(document, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    return 0


def render_side_by_side(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    rows: list[list[str]] = [["", *names]]

    def row(label: str, value) -> None:
        rows.append([label, *(value(results[name]) for name in names)])

    row("1 stream decode, tok/s", lambda r: f"{r['single_decode_tokens_per_s']:.1f}")
    for streams in STREAMS:
        row(f"{streams} streams: aggregate tok/s", lambda r, s=streams: f"{r[f'streams_{s}']['aggregate_tokens_per_s']:.1f}")
        row("  TTFT p50 / p90 / max, s", lambda r, s=streams: "{:.2f} / {:.2f} / {:.2f}".format(
            r[f"streams_{s}"]["ttft_p50_s"], r[f"streams_{s}"]["ttft_p90_s"], r[f"streams_{s}"]["ttft_max_s"]))
    row("4 streams aggregate / 1 stream", lambda r: f"{r['streams_4']['aggregate_tokens_per_s'] / r['streams_1']['aggregate_tokens_per_s']:.2f}")
    row("cold prompt TTFT, s", lambda r: f"{r['cold_prefill_ttft_s']:.2f}")
    row("3 streams + 2,000-token prompt: gap p99, ms", lambda r: f"{r['long_prompt_amid_3']['during_gap_p99_s'] * 1000:.0f}")
    row("  the 3 streams alone: gap p50 / p99, ms", lambda r: "{:.0f} / {:.0f}".format(
        r["long_prompt_amid_3"]["alone_gap_p50_s"] * 1000, r["long_prompt_amid_3"]["alone_gap_p99_s"] * 1000))
    row("  gap p99 during / p99 alone", lambda r: f"{r['long_prompt_amid_3']['during_gap_p99_s'] / r['long_prompt_amid_3']['alone_gap_p99_s']:.2f}")
    row("  long prompt's TTFT, s", lambda r: f"{r['long_prompt_amid_3']['long_prompt_ttft_s']:.2f}")
    row("prefix reuse: turn 2 / turn 1 TTFT", lambda r: f"{r['prompt_cache']['turn2_over_turn1']:.3f}")
    first, llama1 = results[names[0]], results.get("llama-server -np 1")
    if llama1:
        rows.append(["llamad / llama-server -np 1: 1 stream decode",
                     f"{first['single_decode_tokens_per_s'] / llama1['single_decode_tokens_per_s']:.2f}", "", ""])
        rows.append(["llamad / llama-server -np 1: cold TTFT",
                     f"{first['cold_prefill_ttft_s'] / llama1['cold_prefill_ttft_s']:.2f}", "", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)


def render_ceiling(ceiling: dict[str, Any]) -> str:
    rates = ceiling["tokens_per_s"]
    line = " / ".join(f"{rates[n]:.1f}" for n in rates)
    ratio = ceiling.get("ratio_4_over_1")
    return (
        f"engine alone (llama_decode + greedy sampling, no server), {' / '.join(rates)} streams: {line} tok/s"
        + (f"; 4 streams / 1 stream: {ratio:.2f}" if ratio else "")
    )
