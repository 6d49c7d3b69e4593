"""`llamad bench --llama-server PATH --depth N`: decode at agent depth, flash attention on and off.

Agents send 8k-30k tokens of context, and there the attention setting decides the speed.
Five servers on loopback, the same model, threads and batch: llamad with model.flash_attn
= "auto" (its measured choice, llamad.engine.flash_attn), llamad forced "on" and forced
"off", and `llama-server -np 1 -fa on` and `-fa off`; these five columns compare attention
alone, so llamad's requests there ask for no speculation (X-Llamad-Speculative: off). Two
more columns: llamad as configured ("llamad, default": the auto server, no header, so
[speculative] decides, on by default), and `llama-server -np 1 -fa off --spec-type
ngram-mod`, llama-server's own n-gram speculation. One raw prompt of about N tokens
(the same text to every server, through /v1/completions) is read once by each (its time
to first token is the cold read), then answered `--runs` times, each server in turn run
by run, from the cached prompt: the figure is the decode rate after the first token,
(tokens - 1) / (last chunk - first chunk), of a greedy `--tokens`-token answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from llamad.bench.run import Http, _median
from llamad.bench.servers import start_llamad
from llamad.bench.slots import start_llama_server
from llamad.bench.speculation import OFF, complete, decode_rate, metrics_counts
from llamad.config import LoadedConfig, resolve_model

LLAMA_SERVER_COLUMNS = ("llama-server -fa on", "llama-server -fa off")
SPEC_COLUMN = "llama-server -fa off --spec-type ngram-mod"


def _get(client: Http, path: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection(client.host, client.port, timeout=30)
    connection.request("GET", path)
    data = json.loads(connection.getresponse().read())
    connection.close()
    return data


def _token_count(client: Http, text: str) -> int:
    status, data, _ = client.post("/tokenize", {"content": text, "add_special": False})
    if status != 200:
        raise RuntimeError(f"/tokenize answered {status}")
    return len(data["tokens"])


def deep_prompt(client: Http, depth: int) -> tuple[str, int]:
    """Prose-like text of about `depth` tokens in the served model's own tokenizer."""

    def text(sentences: int) -> str:
        return " ".join(
            f"Note {i}: the keeper logged wind from the {('north', 'east', 'south', 'west')[i % 4]} at {i % 37} knots, "
            f"and the lamp burned {i % 11} hours."
            for i in range(sentences)
        )

    sentences = max(1, depth // 25)
    for _ in range(4):  # converges in two steps: tokens per sentence barely vary
        count = _token_count(client, text(sentences))
        if abs(count - depth) <= 16:
            break
        sentences = max(1, int(sentences * depth / count))
    while sentences > 1 and _token_count(client, text(sentences)) > depth:
        sentences -= 1
    prompt = text(sentences)
    return prompt, _token_count(client, prompt)


def run_depth(loaded: LoadedConfig, args: argparse.Namespace) -> int:
    model = resolve_model(loaded).path
    n_ctx = loaded.config.model.n_ctx
    if args.depth + args.tokens + 16 > n_ctx:
        raise SystemExit(f"--depth {args.depth} + --tokens {args.tokens} does not fit model.n_ctx {n_ctx}")
    print(f"llamad bench --depth {args.depth}, beside {args.llama_server}: {model}", flush=True)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        # First, alone: with no stored measurement, the auto server measures at start.
        servers["llamad, auto"] = start_llamad(loaded, {"LLAMAD_MODEL_FLASH_ATTN": "auto"})
        servers["llamad, on"] = start_llamad(loaded, {"LLAMAD_MODEL_FLASH_ATTN": "on"})
        servers["llamad, off"] = start_llamad(loaded, {"LLAMAD_MODEL_FLASH_ATTN": "off"})
        for name, flag in zip(LLAMA_SERVER_COLUMNS, ("on", "off")):
            servers[name] = start_llama_server(args.llama_server, model, 1, loaded, extra=["-fa", flag])
        servers[SPEC_COLUMN] = start_llama_server(args.llama_server, model, 1, loaded, extra=["-fa", "off", "--spec-type", "ngram-mod"])
        clients = {name: Http(url) for name, (_, url) in servers.items()}
        # Columns: (server, headers). llamad's attention columns without speculation; the
        # auto server once more as configured.
        columns: dict[str, tuple[Http, dict[str, str] | None]] = {}
        for name, client in clients.items():
            columns[name] = (client, OFF if name.startswith("llamad") else None)
            if name == "llamad, auto":
                columns["llamad, default"] = (client, None)
        info = _get(clients["llamad, auto"], "/health").get("model_info", {})
        prompt, prompt_tokens = deep_prompt(clients["llamad, auto"], args.depth)
        print(f"prompt: {prompt_tokens} tokens; llamad's auto choice: {info.get('flash_attn')} ({info.get('flash_attn_reason')})", flush=True)
        body = {"model": "bench", "prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
        results: dict[str, dict[str, Any]] = {name: {} for name in columns}
        for name, client in clients.items():  # the cold read, which also caches the prompt
            first = complete(client, {**body, "max_tokens": 2}, OFF)
            results[name]["cold_prompt_s"] = first["first"] - first["started"] if first["first"] else None
        results["llamad, default"]["cold_prompt_s"] = results["llamad, auto"]["cold_prompt_s"]
        rates: dict[str, list[float]] = {name: [] for name in columns}
        before = metrics_counts(clients["llamad, auto"])
        for _ in range(args.runs):
            for name, (client, headers) in columns.items():
                rates[name].append(decode_rate(complete(client, body, headers)))
        after = metrics_counts(clients["llamad, auto"])
        for key, counter in (("drafted", "draft_tokens_total"), ("accepted", "accepted_tokens_total")):
            counter = f"llamad_speculative_{counter}"
            results["llamad, default"][key] = int(after.get(counter, 0) - before.get(counter, 0))
        for name in columns:
            results[name]["decode_tokens_per_s"] = _median(rates[name])
            # On a shared machine a run either has its cores or waits on another job's (2-3x
            # slower, or 10x with llama.cpp's spinning threads): the best run is the rate
            # that setting reaches, the median what it got.
            results[name]["best_decode_tokens_per_s"] = max(rates[name])
            results[name]["runs"] = rates[name]
        results["llamad, auto"]["choice"] = {k: v for k, v in info.items() if k.startswith("flash_attn")}
        results["prompt_tokens"] = prompt_tokens  # type: ignore[assignment]
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    print(render(results))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict[str, Any]) -> str:
    names = [name for name in results if name != "prompt_tokens"]
    best = max(results[name]["decode_tokens_per_s"] for name in LLAMA_SERVER_COLUMNS)
    best_run = max(results[name]["best_decode_tokens_per_s"] for name in LLAMA_SERVER_COLUMNS)
    rows = [["", "decode tok/s (median)", "/ best llama-server", "best run", "/ best llama-server", "cold prompt, s"]]
    for name in names:
        r = results[name]
        label = name
        if name == "llamad, auto":
            label += f" ({r['choice'].get('flash_attn')})"
        if name == "llamad, default":
            label += f" (speculation: {r['drafted']} drafted, {r['accepted']} accepted)"
        cold = r.get("cold_prompt_s")
        rows.append([
            label, f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / best:.2f}",
            f"{r['best_decode_tokens_per_s']:.1f}", f"{r['best_decode_tokens_per_s'] / best_run:.2f}", f"{cold:.1f}" if cold else "?",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)
    return f"{results['prompt_tokens']} tokens of context, decode after the first token (median of runs)\n{table}"
