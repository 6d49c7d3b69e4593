"""`llamad bench --llama-server PATH --speculation`: n-gram speculation, llamad beside llama-server.

Two workloads, greedy, OpenAI streaming, each server in turn run by run (so a machine that
gets busier or quieter moves them alike):

- edit: the model is given a source file of ~1,500 tokens (llamad.bench.edit_source) and
  returns it with one change; the demo model copies well, so most of the answer is in
  the prompt;
- prose: a story continuation (`ignore_eos`, so every answer has the same length).

The servers, on the same model, threads, batch and context: llamad with its [speculative]
sizes, asked for speculation with `X-Llamad-Speculative: on` (the same server with `off` is
the "llamad, speculation off" column, so the figures do not depend on `enabled`), `llama-server -np 1` without speculation, and `llama-server -np 1
--spec-type T` for each n-gram type T asked for (its own defaults: ngram-simple and
ngram-map-k look up 12 tokens and draft up to 48, ngram-mod 24 and 48..64). The figure is
the decode rate after the first token, (tokens - 1) / (last chunk - first chunk).
Then four parallel streams of each workload on llamad, speculation on against off
(aggregate tokens/s), `--parallel-pairs` times back to back, the order alternating.

Before any server starts, the engine alone (llamad.bench.ceiling.verify_rates) times steps
that check a draft at the edit prompt's depth, by width: the rate one stream would reach if
every drafted token were kept, the ceiling that the edit figures are read against.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from llamad.bench.ceiling import verify_rates
from llamad.bench.edit_source import PROMPT as EDIT_PROMPT
from llamad.bench.run import Http, _median
from llamad.bench.servers import start_llamad
from llamad.bench.slots import start_llama_server
from llamad.config import LoadedConfig, resolve_model

SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-mod")
ON, OFF = {"X-Llamad-Speculative": "on"}, {"X-Llamad-Speculative": "off"}
PROSE = (
    "The lighthouse on Carrow Point had been dark for eleven years when Mara Quill rowed out to it "
    "with a lantern, a sack of tools and a letter she had not yet dared to open. The keeper's cottage "
    "leaned against the tower like a tired dog. Inside, the table was still laid for two, and a clock "
    "that nobody had wound in a decade stood with its hands at a quarter to four. Mara set the letter "
    "beside the plates, lit the lantern, and began to climb the spiral stairs."
)


# Raw prompts through /v1/completions: the same text reaches every server (the demo model is
# a base model with no chat template of its own, and llama-server's fallback template is not
# llamad's).
def edit_body(tokens: int, i: int = 0) -> dict[str, Any]:
    prefix = f"# Request {i}.\n" if i else ""
    return {"model": "bench", "prompt": prefix + EDIT_PROMPT, "max_tokens": tokens, "temperature": 0, "stop": ["```"]}


def prose_body(tokens: int, i: int = 0, sampled: bool = False) -> dict[str, Any]:
    """Greedy, the demo model soon repeats one paragraph (which drafts well); sampled (seeded,
    llama.cpp's default settings) it writes prose that never repeats a 12-token run: the
    case where speculation can only cost."""
    prefix = f"Chapter {i + 1}.\n\n" if i else ""
    body = {"model": "bench", "prompt": prefix + PROSE, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if sampled:
        body.update(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=42 + i)
    return body


WORKLOADS = ("edit", "prose", "prose_sampled")
# Steps of these widths check a draft in the engine-alone phase: on either side of the CPU
# kernels' groups of 4 rows, up to llama-server's longest n-gram drafts (64).
VERIFY_WIDTHS = (1, 8, 9, 16, 17, 32, 33, 48, 49, 64, 65)


def complete(client: Http, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Streams one /v1/completions answer: the arrival of its first and last text chunks and
    its token count (usage; llama-server's timings.predicted_n when it sends no usage)."""
    connection = http.client.HTTPConnection(client.host, client.port, timeout=900)
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/completions", json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
        {"Content-Type": "application/json", **(headers or {})},
    )
    response = connection.getresponse()
    first = last = None
    tokens = 0
    text = []
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            if line.startswith(b"data: [DONE]"):
                break
            continue
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        piece = "".join(choice.get("text") or "" for choice in chunk.get("choices") or [])
        if piece:
            first = first or now
            last = now
            text.append(piece)
        usage = chunk.get("usage") or {}
        timings = chunk.get("timings") or {}
        tokens = usage.get("completion_tokens") or timings.get("predicted_n") or tokens
    connection.close()
    return {
        "status": response.status, "started": started, "first": first, "last": last, "completion_tokens": tokens,
        "text": "".join(text),
    }


def decode_rate(result: dict[str, Any]) -> float:
    n = result["completion_tokens"]
    if n > 1 and result["first"] and result["last"] and result["last"] > result["first"]:
        return (n - 1) / (result["last"] - result["first"])
    return float("nan")


def parallel(client: Http, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in bodies]

    def one(i: int) -> None:
        results[i] = complete(client, bodies[i], headers)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = sum(r.get("completion_tokens", 0) for r in results)
    return {"aggregate_tokens_per_s": tokens / wall, "tokens": tokens, "wall_s": wall,
            "ok": sum(1 for r in results if r.get("status") == 200)}


def metrics_counts(client: Http) -> dict[str, float]:
    connection = http.client.HTTPConnection(client.host, client.port, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    counts = {}
    for line in text.splitlines():
        if line.startswith("llamad_speculative_"):
            name, value = line.split()
            counts[name] = float(value)
    return counts


def prose_pairs(client: Http, tokens: int, pairs: int) -> dict[str, Any]:
    """What speculation costs where it can only cost: sampled prose, each seed answered with
    speculation on and off back to back (the order alternates), so a machine that gets busier
    moves both alike. The same seed gives the same tokens either way (the check samples as
    if there had been no draft), so each pair's ratio is the speed alone. `enabled`'s
    default rests on this figure (the issue's rule: on by default only if prose costs no
    more than noise)."""
    ratios: list[float] = []
    before = metrics_counts(client)
    for i in range(pairs):
        body = prose_body(tokens, i, sampled=True)
        order = (ON, OFF) if i % 2 == 0 else (OFF, ON)
        rate = {id(headers): decode_rate(complete(client, body, headers)) for headers in order}
        ratios.append(rate[id(ON)] / rate[id(OFF)])
    after = metrics_counts(client)
    ratios = [r for r in ratios if r == r]  # a NaN (no second chunk) says nothing
    return {
        "ratios": ratios,
        "geometric_mean": statistics.geometric_mean(ratios) if ratios else float("nan"),
        "median": _median(ratios) if ratios else float("nan"),
        "drafted": int(after.get("llamad_speculative_draft_tokens_total", 0) - before.get("llamad_speculative_draft_tokens_total", 0)),
        "accepted": int(after.get("llamad_speculative_accepted_tokens_total", 0) - before.get("llamad_speculative_accepted_tokens_total", 0)),
    }


def run_speculation(loaded: LoadedConfig, args: argparse.Namespace) -> int:
    model = resolve_model(loaded).path
    spec_types = [t for t in (args.spec_types or ",".join(SPEC_TYPES)).split(",") if t]
    print(f"llamad bench --speculation, beside {args.llama_server}: {model}", flush=True)
    # Before any server starts: what checking a draft costs, the engine alone (the ceiling).
    verification = verify_rates(loaded, model, EDIT_PROMPT, VERIFY_WIDTHS)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        servers["llamad"] = start_llamad(loaded)
        servers["llama-server -np 1"] = start_llama_server(args.llama_server, model, 1, loaded)
        for spec_type in spec_types:
            servers[f"llama-server -np 1 --spec-type {spec_type}"] = start_llama_server(
                args.llama_server, model, 1, loaded, extra=["--spec-type", spec_type]
            )
        clients = {name: Http(url) for name, (_, url) in servers.items()}
        # Columns: llamad twice (speculation on, then off, by header: whatever [speculative]
        # says, with its sizes), then the others.
        columns: dict[str, tuple[Http, dict[str, str] | None]] = {
            "llamad": (clients["llamad"], ON),
            "llamad, speculation off": (clients["llamad"], OFF),
            **{name: (client, None) for name, client in clients.items() if name != "llamad"},
        }
        for client in clients.values():  # warm-up
            complete(client, {"model": "bench", "prompt": "Hello", "max_tokens": 4})
        rates: dict[str, dict[str, list[float]]] = {name: {w: [] for w in WORKLOADS} for name in columns}
        tokens: dict[str, dict[str, list[int]]] = {name: {w: [] for w in WORKLOADS} for name in columns}
        before = metrics_counts(clients["llamad"])
        for _ in range(args.runs):
            for workload, body in (
                ("edit", edit_body(args.edit_tokens)),
                ("prose", prose_body(args.tokens)),
                ("prose_sampled", prose_body(args.tokens, sampled=True)),
            ):
                for name, (client, headers) in columns.items():
                    result = complete(client, body, headers)
                    rates[name][workload].append(decode_rate(result))
                    tokens[name][workload].append(result["completion_tokens"])
        after = metrics_counts(clients["llamad"])
        results: dict[str, Any] = {
            name: {
                f"{workload}_decode_tokens_per_s": _median(rates[name][workload]) for workload in WORKLOADS
            } | {f"{workload}_tokens": int(_median(tokens[name][workload])) for workload in WORKLOADS}
            for name in columns
        }
        drafted = after.get("llamad_speculative_draft_tokens_total", 0) - before.get("llamad_speculative_draft_tokens_total", 0)
        accepted = after.get("llamad_speculative_accepted_tokens_total", 0) - before.get("llamad_speculative_accepted_tokens_total", 0)
        results["llamad"]["drafted"] = int(drafted)
        results["llamad"]["accepted"] = int(accepted)
        llamad = clients["llamad"]
        four: dict[str, Any] = {}
        for workload in WORKLOADS:
            # Four different requests, each its own prompt.
            bodies = [
                edit_body(args.parallel_tokens, i) if workload == "edit"
                else prose_body(args.parallel_tokens, i, sampled=workload == "prose_sampled")
                for i in range(4)
            ]
            parallel(llamad, bodies)  # warm-up: each prompt read once, into a slot of its own
            # On and off back to back, the order alternating: each pair's ratio is read alone,
            # so a machine that gets busier between pairs moves both of a pair alike.
            on, off, ratios = [], [], []
            for i in range(max(1, args.parallel_pairs)):
                rate = {}
                for headers in ((ON, OFF) if i % 2 == 0 else (OFF, ON)):
                    rate[id(headers)] = parallel(llamad, bodies, headers)["aggregate_tokens_per_s"]
                on.append(rate[id(ON)])
                off.append(rate[id(OFF)])
                ratios.append(rate[id(ON)] / rate[id(OFF)])
            four[workload] = {
                "on_tokens_per_s": _median(on), "off_tokens_per_s": _median(off),
                "ratios": ratios, "geometric_mean": statistics.geometric_mean(ratios),
            }
        results["llamad 4 streams"] = four
        results["llamad prose pairs"] = prose_pairs(llamad, args.tokens, args.prose_pairs)
        results["verification"] = verification
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _ in servers.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    print(render(results, spec_types))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict[str, Any], spec_types: list[str]) -> str:
    names = [name for name in results if name not in ("llamad 4 streams", "llamad prose pairs", "verification")]
    rows: list[list[str]] = [["", *names]]
    for workload in WORKLOADS:
        rows.append([f"{workload}: decode tok/s", *(f"{results[n][f'{workload}_decode_tokens_per_s']:.1f}" for n in names)])
        rows.append([f"  {workload}: answer tokens", *(str(results[n][f"{workload}_tokens"]) for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)
    base = results["llama-server -np 1"]
    best = {w: max((results[f"llama-server -np 1 --spec-type {t}"][f"{w}_decode_tokens_per_s"] for t in spec_types), default=float("nan"))
            for w in WORKLOADS}
    mine = results["llamad"]
    lines = [
        table,
        "",
        f"edit:  llamad / llama-server -np 1 = {mine['edit_decode_tokens_per_s'] / base['edit_decode_tokens_per_s']:.2f}"
        f" (target >= 1.5); llamad / best llama-server n-gram = {mine['edit_decode_tokens_per_s'] / best['edit']:.2f} (target >= 1)",
        f"prose: llamad / llama-server -np 1 = {mine['prose_decode_tokens_per_s'] / base['prose_decode_tokens_per_s']:.2f} greedy, "
        f"{mine['prose_sampled_decode_tokens_per_s'] / base['prose_sampled_decode_tokens_per_s']:.2f} sampled (target >= 0.97)",
        f"llamad drafted {mine['drafted']} tokens, accepted {mine['accepted']}",
    ]
    for workload, four in results["llamad 4 streams"].items():
        pairs = four.get("ratios") or []
        lines.append(
            f"4 parallel {workload} streams on llamad: speculation on {four['on_tokens_per_s']:.1f} tok/s, "
            f"off {four['off_tokens_per_s']:.1f} (medians); on / off in {len(pairs)} pairs back to back: geometric mean "
            f"{four.get('geometric_mean', float('nan')):.3f}, pairs " + ", ".join(f"{r:.2f}" for r in pairs)
        )
    pairs = results.get("llamad prose pairs")
    if pairs and pairs["ratios"]:
        lines.append(
            f"sampled prose, {len(pairs['ratios'])} seeds, each on and off back to back: on / off geometric mean "
            f"{pairs['geometric_mean']:.3f}, median {pairs['median']:.3f}, pairs {min(pairs['ratios']):.2f}..{max(pairs['ratios']):.2f}; "
            f"drafted {pairs['drafted']}, accepted {pairs['accepted']}"
        )
    verification = results.get("verification")
    if verification:
        rates, ms = verification["tokens_per_s"], verification["step_ms"]
        lines.append(
            f"checking a draft, the engine alone at {verification['context_tokens']} tokens of context "
            "(entries a step: ms, tok/s if every drafted token is kept): "
            + ", ".join(f"{w}: {ms[w]:.0f} ms, {rates[w]:.0f}" for w in rates)
        )
        widest = max((int(w) for w in rates if int(w) <= 32), default=None)  # llamad's one stream: 1 + 31
        if widest:
            lines.append(
                f"edit: llamad = {mine['edit_decode_tokens_per_s'] / rates[str(widest)]:.2f} x the engine's rate at {widest} "
                f"entries a step with every drafted token kept ({rates[str(widest)]:.0f} tok/s); "
                f"best llama-server n-gram = {best['edit'] / rates[str(widest)]:.2f} x"
            )
    return "\n".join(lines)
