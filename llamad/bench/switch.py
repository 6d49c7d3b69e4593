"""`llamad bench --llama-server PATH --switch`: changing models, llamad beside llama-server's router.

Two GGUFs, A and B. Two servers that can hold only one of them at a time: llamad with both in
[models.*] tables and `router.max_loaded = 1`, and llama-server in router mode
(`--models-dir` over symlinks to the same two files, `--models-max 1`). Requests alternate
A, B, A, B, ..., each going to the model not loaded, so every one waits for a switch: the
other model unloaded, this one loaded, its prompt read. The figure is the time to first
token of a streamed chat request (a short prompt, a few tokens), each switch measured on
llamad, then on llama-server, so a machine that gets busier or quieter moves both alike.
The loaded model's own time to first token, idle, is measured beside it.

Then a third server, llamad with room for both (`max_loaded = 2`): B's first request is
sent, and shortly after, while B loads, one to A, which is loaded. A's time to first token
then, over A's when nothing loads, is the cost a load puts on the models that serve
(target: at most 1.2). B has keep_alive 0, so it is unloaded after each round and every
round loads it again.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import tomli_w

from llamad.bench.run import Http, _median
from llamad.bench.servers import dies_with_parent, free_port, start_llamad, wait_healthy
from llamad.config import LoadedConfig, load_config

PROMPT = [{"role": "user", "content": "Say hello to the new gardener."}]
ANSWER_TOKENS = 4
# Between B's request and A's, round by round in turn: from just after the load has started
# to near its end (half a second to a second for these models on 2 cores), so A's requests
# meet every part of it (reading the file, building the context, clearing the KV cache).
LOAD_HEAD_STARTS_S = (0.05, 0.15, 0.25, 0.35, 0.45)
IDLE_PER_ROUND = 3


def switch_plan(first_loaded: str, other: str, rounds: int) -> list[str]:
    """The model each measured request asks for: always the one not loaded, starting with
    `other` (the server holds `first_loaded`), so each round is one switch each way."""
    return [other, first_loaded] * rounds


def chat_body(model: str) -> dict[str, Any]:
    # ignore_eos: a base model may end its answer at once; every request must give a token.
    return {"model": model, "messages": PROMPT, "max_tokens": ANSWER_TOKENS, "temperature": 0, "ignore_eos": True}


def llamad_toml(loaded: LoadedConfig, paths: tuple[Path, Path], max_loaded: int, b_keep_alive: Any) -> dict[str, Any]:
    """A configuration serving the two files as models `a` (the default, loaded at start)
    and `b`, with the bench's context, threads, batch and slots."""
    m, server = loaded.config.model, loaded.config.server
    model = {"n_ctx": m.n_ctx, "n_batch": m.n_batch, "n_threads": m.n_threads, "n_gpu_layers": m.n_gpu_layers}
    return {
        "server": {"parallel": server.parallel},
        "model": model,
        "router": {"max_loaded": max_loaded, "keep_alive": -1},
        "models": {
            "a": {"path": str(paths[0]), "default": True},
            "b": {"path": str(paths[1]), "keep_alive": b_keep_alive},
        },
    }


def start_two_model_llamad(loaded: LoadedConfig, data: dict[str, Any]) -> tuple[subprocess.Popen, str]:
    handle = tempfile.NamedTemporaryFile("w", prefix="llamad-bench-switch-", suffix=".toml", delete=False)
    with handle:
        handle.write(tomli_w.dumps(data))
    atexit.register(os.unlink, handle.name)
    # The environment's model (MODEL_PATH, a model.dir) would be a third model: none here.
    two = load_config(handle.name, env={})
    return start_llamad(two, extra_env={"LLAMAD_MODEL_PATH": "", "LLAMAD_MODEL_DIR": ""})


def start_router(
    binary: str, paths: tuple[Path, Path], loaded: LoadedConfig, models_max: int = 1
) -> tuple[subprocess.Popen, str, list[str]]:
    """llama-server in router mode over a directory of symlinks to the two files, at most
    `models_max` loaded; the names it serves them under (its ids: the file stems), in
    `paths` order."""
    folder = Path(tempfile.mkdtemp(prefix="llamad-bench-router-"))
    atexit.register(shutil.rmtree, folder, True)
    for path in paths:
        (folder / path.name).symlink_to(path.resolve())
    m, parallel = loaded.config.model, loaded.config.server.parallel
    threads = m.n_threads or os.cpu_count() or 1
    port = free_port()
    args = [
        binary, "--models-dir", str(folder), "--models-max", str(models_max), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(parallel), "-c", str(parallel * m.n_ctx), "-b", str(m.n_batch),
        "-t", str(threads), "-tb", str(threads), "--no-webui",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=dies_with_parent)
    url = wait_healthy(process, port, f"llama-server router ({' '.join(args)})")
    return process, url, [path.stem for path in paths]


def llamad_states(client: Http) -> dict[str, str]:
    return {entry["model"]: entry["state"] for entry in _get(client, "/health").get("models", [])}


def router_states(client: Http) -> dict[str, str]:
    return {entry["id"]: entry["status"]["value"] for entry in _get(client, "/models").get("data", [])}


def _get(client: Http, path: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection(client.host, client.port, timeout=30)
    connection.request("GET", path)
    body = json.loads(connection.getresponse().read())
    connection.close()
    return body


def _post(client: Http, path: str, body: dict[str, Any]) -> None:
    connection = http.client.HTTPConnection(client.host, client.port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    connection.getresponse().read()
    connection.close()


def wait_unloaded(states: Callable[[], dict[str, str]], model: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while states().get(model) != "unloaded":
        if time.monotonic() > deadline:
            raise RuntimeError(f"model {model} was not unloaded within {timeout_s:.0f} s")
        time.sleep(0.05)


def ttft(client: Http, model: str) -> float:
    result = client.stream("/v1/chat/completions", chat_body(model))
    if result["status"] != 200:
        raise RuntimeError(f"{model}: HTTP {result['status']}")
    return result["ttft_s"]


def measure_switches(servers: dict[str, tuple[Http, list[str]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Each server holds its first model; the plan alternates, each step on every server."""
    times: dict[str, dict[str, list[float]]] = {name: {"switch": [], "loaded": []} for name in servers}
    by_target: dict[str, dict[str, list[float]]] = {name: {} for name in servers}
    for name, (client, models) in servers.items():  # warm-up: A loaded (and its prompt read once)
        ttft(client, models[0])
    for step in switch_plan("a", "b", rounds):
        for name, (client, models) in servers.items():
            target = models[0] if step == "a" else models[1]
            took = ttft(client, target)
            times[name]["switch"].append(took)
            by_target[name].setdefault(step, []).append(took)
            times[name]["loaded"].append(ttft(client, target))  # the same model, now loaded
    return {
        name: {
            "switch_ttft_s": _median(t["switch"]),
            "switch_ttft_all_s": t["switch"],
            "switch_to_a_ttft_s": _median(by_target[name].get("a", [])),
            "switch_to_b_ttft_s": _median(by_target[name].get("b", [])),
            "loaded_ttft_s": _median(t["loaded"]),
        }
        for name, t in times.items()
    }


def measure_while_loading(client: Http, models: list[str], unload_b: Callable[[], None], rounds: int) -> dict[str, Any]:
    """A's time to first token alone, then with B's load under way, round by round; B is
    unloaded (and its unload finished) before each round."""
    a, b = models
    idle, during, loads, overlapped = [], [], [], 0
    ttft(client, a)  # warm-up: A's prompt read once, as in every later round
    for round_ in range(rounds):
        head_start = LOAD_HEAD_STARTS_S[round_ % len(LOAD_HEAD_STARTS_S)]
        unload_b()
        # Three idle requests a round (on a shared machine one can meet a stall of its own),
        # each after the same pause as the one sent while B loads: after 0.1 s with nothing
        # to do, a first token takes longer than one right after another request (24 against
        # 20 ms here, with nothing loading), and that is not the load's cost.
        for _ in range(IDLE_PER_ROUND):
            time.sleep(head_start)
            idle.append(ttft(client, a))
        b_result: dict[str, Any] = {}
        loader = threading.Thread(target=lambda: b_result.update(client.stream("/v1/chat/completions", chat_body(b))))
        loader.start()
        time.sleep(head_start)
        a_result = client.stream("/v1/chat/completions", chat_body(a))
        loader.join()
        during.append(a_result["ttft_s"])
        loads.append(b_result["ttft_s"])
        # A served while B loaded only where A's first token came before B's.
        overlapped += int(bool(a_result["first"] and b_result.get("first") and a_result["first"] < b_result["first"]))
    idle_s, during_s = _median(idle), _median(during)
    return {
        "idle_ttft_s": idle_s,
        "during_load_ttft_s": during_s,
        "during_over_idle": during_s / idle_s if idle_s else float("nan"),
        "b_load_ttft_s": _median(loads),
        "rounds": rounds,
        "a_answered_before_b": overlapped,
        "idle_all_s": idle,
        "during_all_s": during,
    }


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def run_switch(loaded: LoadedConfig, args: argparse.Namespace, paths: tuple[Path, Path]) -> int:
    print(f"llamad bench --switch, beside {args.llama_server}: A = {paths[0]}, B = {paths[1]}", flush=True)
    processes: list[subprocess.Popen] = []
    try:
        process, url = start_two_model_llamad(loaded, llamad_toml(loaded, paths, max_loaded=1, b_keep_alive=-1))
        processes.append(process)
        router, router_url, router_models = start_router(args.llama_server, paths, loaded)
        processes.append(router)
        servers = {"llamad": (Http(url), ["a", "b"]), "llama-server router": (Http(router_url), router_models)}
        results: dict[str, Any] = measure_switches(servers, args.runs)
        stop(processes)
        processes.clear()
        # Room for both: B (keep_alive 0 on llamad; unloaded by hand on llama-server) loads
        # again every round while A serves.
        process, url = start_two_model_llamad(loaded, llamad_toml(loaded, paths, max_loaded=2, b_keep_alive=0))
        processes.append(process)
        router, router_url, router_models = start_router(args.llama_server, paths, loaded, models_max=2)
        processes.append(router)
        rounds = 3 * max(args.runs, 1)  # A meets each part of the load in turn (LOAD_HEAD_STARTS_S), 3 times at --runs 5
        mine, theirs = Http(url), Http(router_url)
        results["llamad, both fit"] = measure_while_loading(
            mine, ["a", "b"], lambda: wait_unloaded(lambda: llamad_states(mine), "b"), rounds)

        def unload_router_b() -> None:
            if router_states(theirs).get(router_models[1]) != "unloaded":
                _post(theirs, "/models/unload", {"model": router_models[1]})
            wait_unloaded(lambda: router_states(theirs), router_models[1])

        results["llama-server router, both fit"] = measure_while_loading(theirs, router_models, unload_router_b, rounds)
    finally:
        stop(processes)
    print(render_switch(results))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def render_switch(results: dict[str, Any]) -> str:
    """The table: each figure for llamad and llama-server's router, and their ratio."""

    def ms(value: float) -> str:
        return f"{value * 1000:,.0f}"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b and a == a and b == b else "n/a"

    rows = [["time to first token, ms", "llamad", "llama-server router", "llamad / llama-server"]]

    def row(label: str, mine: float, theirs: float, shown: Callable[[float], str] = ms) -> None:
        rows.append([label, shown(mine), shown(theirs), ratio(mine, theirs)])

    one, other = results["llamad"], results["llama-server router"]
    row("one model fits: switch to the model not loaded, median", one["switch_ttft_s"], other["switch_ttft_s"])
    row("  switch to A", one["switch_to_a_ttft_s"], other["switch_to_a_ttft_s"])
    row("  switch to B", one["switch_to_b_ttft_s"], other["switch_to_b_ttft_s"])
    row("  the same model, loaded", one["loaded_ttft_s"], other["loaded_ttft_s"])
    mine, theirs = results.get("llamad, both fit"), results.get("llama-server router, both fit")
    if mine and theirs:
        row("both fit: A idle", mine["idle_ttft_s"], theirs["idle_ttft_s"])
        row("  A while B loads", mine["during_load_ttft_s"], theirs["during_load_ttft_s"])
        row("  A while B loads / A idle (target <= 1.2)", mine["during_over_idle"], theirs["during_over_idle"], lambda v: f"{v:.2f}")
        row("  B's first request (its load)", mine["b_load_ttft_s"], theirs["b_load_ttft_s"])
        rows.append(["  rounds where A's first token came first", f"{mine['a_answered_before_b']} of {mine['rounds']}",
                     f"{theirs['a_answered_before_b']} of {theirs['rounds']}", ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)
