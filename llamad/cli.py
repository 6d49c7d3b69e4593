"""`llamad serve | config | check | bench`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from llamad.service import log as logsetup
from llamad.config import SECTIONS, ConfigError, LoadedConfig, ModelChoice, file_identity, load_config, parse_bytes, to_toml_data

log = structlog.get_logger("llamad")

EXIT_CONFIG = 2
EXIT_MODEL = 3


def _load(args: argparse.Namespace) -> LoadedConfig:
    return load_config(args.config)


def _fail(message: str, code: int, **fields: Any) -> int:
    log.error(message, **fields)
    return code


def cmd_config(args: argparse.Namespace) -> int:
    import tomli_w

    loaded = _load(args)
    data = to_toml_data(loaded.config)
    lines = [f"# effective configuration (file: {loaded.file or 'none, built-in defaults'})"]
    for section in SECTIONS:
        lines.append("")
        for line in tomli_w.dumps({section: data[section]}).rstrip("\n").splitlines():
            key = line.split("=", 1)[0].strip()
            if args.sources and "=" in line and not line.startswith("["):
                line = f"{line}  # {loaded.source(f'{section}.{key}')}"
            lines.append(line)
    for name, table in data.get("models", {}).items():  # keys a table leaves out are [model]'s
        section = f"models.{name}"
        set_keys = {key: value for key, value in table.items() if value is not None}
        lines.append("")
        for line in tomli_w.dumps({"models": {name: set_keys}}).rstrip("\n").splitlines():
            key = line.split("=", 1)[0].strip()
            if args.sources and "=" in line and not line.startswith("["):
                line = f"{line}  # {loaded.source(f'{section}.{key}')}"
            lines.append(line)
    print("\n".join(lines))
    return 0


def detected_model(engine) -> dict[str, object]:
    """What `llamad check` reports about the GGUF's own template and limits: whether it has
    a template (and its size), the tool-call format and reasoning markers llamad.tools.formats
    detects, and the trained context (with the cap, when model.n_ctx was past it)."""
    from llamad.tools import formats

    template = str(engine.describe().get("chat_template") or "")
    fmt = getattr(engine, "tool_format", None)
    if fmt is None:  # an engine that does not detect it at load
        fmt = formats.detect(template)
    out: dict[str, object] = {
        "gguf_template": f"{len(template)} characters" if template else "none (llamad's fallback format)",
        "tool_format": fmt.name,
        "reasoning_markers": list(fmt.reasoning) if fmt.reasoning else None,
        "n_ctx_train": engine.info.get("n_ctx_train"),
    }
    if engine.info.get("n_ctx_capped"):
        out["n_ctx_capped"] = engine.info["n_ctx_capped"]
    return out


def cmd_check(args: argparse.Namespace) -> int:
    from llamad.serve.answer import answer_events, fold
    from llamad.engine.chat import Chat, ChatMessage
    from llamad.engine import Generation
    from llamad.engine.llama import LlamaEngine

    from llamad.models.catalog import build_catalog
    from llamad.models.memory import budget_bytes, estimate_bytes

    loaded = _load(args)
    logsetup.configure(loaded.config.logging.level, loaded.config.logging.format)
    catalog = build_catalog(loaded)
    # Every model of the set: its file (path, size, mtime: what a reload compares) and what
    # it is estimated to take once loaded; the default one is then opened and decoded.
    for name, spec in catalog.models.items():
        identity = file_identity(spec.path)
        log.info(
            "check_model",
            model=name,
            default=spec.default,
            role=spec.role,
            declared_in=spec.source,
            path=str(spec.path),
            size_bytes=identity[1] if identity else None,
            mtime_ns=identity[2] if identity else None,
            aliases=list(spec.aliases),
            keep_alive_s=spec.keep_alive_s,
            estimated_bytes=estimate_bytes(spec.path, spec.config),
        )
    log.info("check_memory_budget", budget_bytes=budget_bytes(parse_bytes(loaded.config.router.memory_budget)),
             max_loaded=loaded.config.router.max_loaded or None)
    default = catalog.default
    choice = ModelChoice(path=default.path, reason=f"the default model '{default.name}' ({default.source})")
    # model.flash_attn = "auto": the stored measurement, or a probe with no time limit (the
    # daemon's own is bounded); --measure runs it again whatever is stored.
    engine = LlamaEngine(default.config, default.path, remeasure=getattr(args, "measure", False), probe_budget_s=None)

    async def run() -> int:
        started = time.monotonic()
        try:
            await engine.load()
        except Exception as exc:
            return _fail("check_failed", EXIT_MODEL, reason=str(exc))
        loaded_s = time.monotonic() - started
        try:
            prompt = await engine.prepare(Chat(messages=[ChatMessage(role="user", content="Hello")]))
            # A few tokens prove the decode path (and, on a GPU build, the offloaded layers).
            answer = await fold(answer_events(engine, Generation(prompt=prompt, max_tokens=4), keep_reasoning=True))
        except Exception as exc:
            engine.close()
            return _fail("check_failed", EXIT_MODEL, reason=str(exc))
        finish = answer.finish
        detected = detected_model(engine)
        log.info(
            "check_ok",
            model=str(choice.path),
            chosen_by=choice.reason,
            chat_template=engine.info.get("chat_template"),
            # What llamad detected in the GGUF: the template's family traits (tool_format is
            # llamad.tools.formats' name for it), and the context it was trained on.
            **detected,
            gpu_layers_offloaded=engine.info.get("gpu_layers_offloaded"),
            n_ctx=engine.info.get("n_ctx"),
            # What the configured context costs in memory, as llama.cpp allocated it.
            kv_cache_mib=engine.info.get("kv_cache_mib"),
            kv_cache_type=engine.info.get("kv_cache_type"),
            # "on" or "off" in effect, why (model.flash_attn, or the measurement's date and
            # file), and for "auto" the decode rates measured with each setting.
            **{key: value for key, value in engine.info.items() if key.startswith("flash_attn")},
            # [speculative] in effect: "ngram 12, draft 2..32 tokens", "off", or why unavailable.
            speculative=engine.info.get("speculative"),
            prompt_tokens=len(prompt.tokens),
            generated_tokens=finish.usage.completion_tokens if finish else 0,
            load_s=round(loaded_s, 3),
        )
        engine.close()
        return 0

    return asyncio.run(run())


def make_engine(spec: Any) -> Any:
    """The engine of one model of the set (llamad.models.pool's factory): the llama.cpp
    engine, or a dedicated embedding engine for role = "embeddings"."""
    if spec.role == "embeddings":
        import msgspec

        from llamad.engine.llama_embed import EmbeddingEngine

        config = msgspec.structs.replace(spec.config, embeddings=msgspec.structs.replace(spec.config.embeddings, path=str(spec.path)))
        engine = EmbeddingEngine(config)
        engine.model_id = spec.name
        return engine
    from llamad.engine.llama import LlamaEngine

    return LlamaEngine(spec.config, spec.path)


def model_pool(loaded: LoadedConfig) -> Any:
    """The server's models (llamad.models): the catalog from the configuration, loaded on
    demand under the memory budget."""
    from llamad.models.catalog import build_catalog
    from llamad.models.memory import budget_bytes
    from llamad.models.pool import ModelPool

    config = loaded.config
    catalog = build_catalog(loaded)
    budget = budget_bytes(parse_bytes(config.router.memory_budget))
    log.info(
        "models_configured",
        models={name: {"path": str(spec.path), "role": spec.role, "from": spec.source, "aliases": list(spec.aliases)}
                for name, spec in catalog.models.items()},
        default=catalog.default_name,
        memory_budget_bytes=budget,
        max_loaded=config.router.max_loaded or None,
        strict=config.router.strict,
    )
    return ModelPool(catalog, make_engine, budget=budget, max_loaded=config.router.max_loaded, load_timeout=config.router.load_timeout)


class Server:
    """uvicorn.Server run by hand, so start-up, readiness and shutdown are ours to see."""

    def __init__(self, loaded: LoadedConfig):
        import uvicorn

        from llamad.app import create_app

        self.loaded = loaded
        config = loaded.config
        # The one place that names the engine factory: the start, loads on demand and every
        # reload build with it.
        self.pool = model_pool(loaded)
        self.app = create_app(config, pool=self.pool)
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=config.server.host,
                port=config.server.port,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=config.server.shutdown_grace,
                timeout_keep_alive=30,
            )
        )
        original_handle_exit = self.uvicorn.handle_exit

        def handle_exit(sig: int, frame: Any) -> None:
            # Queued requests get a retryable error now; the running one may finish
            # within the grace period (uvicorn's graceful shutdown).
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self.pool.stop_admitting)
            log.info("shutdown_requested", signal=signal.Signals(sig).name)
            original_handle_exit(sig, frame)
            # uvicorn re-raises the signal after a graceful shutdown, which would make the
            # exit status "killed by SIGTERM"; a clean stop exits 0 instead.
            self.uvicorn._captured_signals.clear()  # noqa: SLF001

        self.uvicorn.handle_exit = handle_exit  # type: ignore[method-assign]
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self) -> None:
        from llamad.service.reload import reload_service
        from llamad.service.systemd import supervise

        self._loop = asyncio.get_running_loop()

        def reload() -> Any:
            return reload_service(self.app.state, self.loaded.file, set_log_level=logsetup.set_level)

        # sd_notify READY/STATUS/WATCHDOG/STOPPING and SIGHUP reload (no-ops outside systemd
        # apart from the reload).
        hooks = asyncio.ensure_future(supervise(self.uvicorn, self.app.state, reload=reload))
        try:
            await self.uvicorn.serve()
        finally:
            hooks.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    loaded = _load(args)
    logsetup.configure(loaded.config.logging.level, loaded.config.logging.format)
    log.info("starting", config_file=str(loaded.file) if loaded.file else "none (built-in defaults)")
    server = Server(loaded)
    asyncio.run(server.serve())
    if server.pool.catalog.default_name in server.pool.failures:
        return EXIT_MODEL
    log.info("stopped")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    loaded = _load(args)
    logsetup.configure("warning", loaded.config.logging.format)
    if args.switch:  # changing models, beside llama-server's router (llamad.bench.switch)
        if not args.llama_server:
            return _fail("bench_needs_llama_server", EXIT_CONFIG, hint="--switch compares with llama-server's router: add --llama-server PATH")
        paths = switch_models(loaded, args.switch_models)
        if isinstance(paths, str):
            return _fail("bench_needs_two_models", EXIT_CONFIG, hint=paths)
        from llamad.bench.switch import run_switch

        return run_switch(loaded, args, paths)
    if args.speculation:  # n-gram speculation beside llama-server's (llamad.bench.speculation)
        from llamad.bench.speculation import run_speculation

        if not args.llama_server:
            return _fail("bench_needs_llama_server", EXIT_CONFIG, hint="--speculation compares with llama-server: add --llama-server PATH")

        return run_speculation(loaded, args)
    if args.depth:  # decode at agent depth, flash attention on and off (llamad.bench.depth)
        from llamad.bench.depth import run_depth

        if not args.llama_server:
            return _fail("bench_needs_llama_server", EXIT_CONFIG, hint="--depth compares with llama-server: add --llama-server PATH")
        return run_depth(loaded, args)
    if args.llama_server:  # llamad beside llama-server in one run (llamad.bench.slots)
        from llamad.bench.slots import run_side_by_side

        return run_side_by_side(loaded, args)
    from llamad.bench.run import run_bench

    return run_bench(loaded, args)


def switch_models(loaded: LoadedConfig, listed: str | None) -> tuple[Path, Path] | str:
    """The two GGUFs `bench --switch` changes between: --switch-models, else the first two
    chat models the configuration offers; a hint (str) when there are not two."""
    wanted = "--switch needs two GGUF files: --switch-models A.gguf,B.gguf, or two [models.*] tables in the configuration"
    if listed:
        paths = [Path(p).expanduser() for p in listed.split(",") if p]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            return f"--switch-models: no such file: {', '.join(missing)}"
        if len(paths) != 2:
            return wanted
    else:
        from llamad.models.catalog import build_catalog

        try:
            paths = [spec.path for spec in build_catalog(loaded).models.values() if spec.role == "chat"]
        except ConfigError as exc:
            return f"{exc}; {wanted}"
        if len(paths) < 2:
            return wanted
    return paths[0], paths[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamad", description="Local LLM inference daemon")
    parser.add_argument("--config", help="config file (default: $LLAMAD_CONFIG or /etc/llamad.toml)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the configured model (the default command)")
    cfg = sub.add_parser("config", help="print the effective configuration as TOML")
    cfg.add_argument("--sources", action="store_true", help="say where each value came from")
    check = sub.add_parser("check", help="validate the configuration and open the model")
    check.add_argument(
        "--measure", action="store_true",
        help='model.flash_attn = "auto": measure flash attention on and off again, even when a measurement is stored',
    )
    bench = sub.add_parser("bench", help="engine vs. HTTP decode rate, concurrency and prompt-cache benchmark")
    bench.add_argument("--url", help="benchmark this running server instead of starting one")
    bench.add_argument("--tokens", type=int, default=128, help="tokens per answer (default 128)")
    bench.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    bench.add_argument("--concurrency", type=int, default=4, help="parallel streams (default 4; 0 skips)")
    bench.add_argument("--prefix-tokens", type=int, default=1500, help="shared prefix for the cache case (0 skips)")
    bench.add_argument("--embed-inputs", type=int, default=32, help="inputs in the embeddings case (default 32; 0 skips)")
    bench.add_argument("--agent", help="a captured agent request (JSON) to time cold and on its next turn")
    bench.add_argument("--restart", help="instead: time this captured agent request (JSON) cold, after a restart (disk cache) and warm")
    bench.add_argument("--streams", default="1,2,4,8", help="parallel-stream counts for the batching table (default 1,2,4,8; empty skips)")
    bench.add_argument("--llama-server", help="run llamad side by side with this llama-server binary (-np 1 and -np 4) instead")
    bench.add_argument("--speculation", action="store_true", help="with --llama-server: only the n-gram speculation phases (edit and prose workloads)")
    bench.add_argument("--switch", action="store_true", help="with --llama-server: only the model-switch phases (time to first token of a model not loaded, beside llama-server's router; a loaded model's while another loads)")
    bench.add_argument("--switch-models", help="the two GGUFs for --switch, A.gguf,B.gguf (default: the configuration's first two chat models)")
    bench.add_argument(
        "--depth", type=int, default=0,
        help="with --llama-server: only the deep-context phase, decode after a prompt of about this many tokens, "
        "llamad's flash attention auto / on / off beside llama-server -fa on / off (e.g. 7900 with N_CTX=8192)",
    )
    bench.add_argument("--spec-types", help="llama-server --spec-type values to compare (default ngram-simple,ngram-map-k,ngram-mod)")
    bench.add_argument("--edit-tokens", type=int, default=2000, help="most tokens of an edit answer (default 2000: the whole file)")
    bench.add_argument("--prose-pairs", type=int, default=12, help="sampled prose seeds answered with speculation on and off back to back (default 12; 0 skips)")
    bench.add_argument("--parallel-tokens", type=int, default=256, help="tokens per answer of the 4-stream speculation phase (default 256)")
    bench.add_argument("--parallel-pairs", type=int, default=4, help="4-stream speculation phase: measurements on and off back to back per workload (default 4)")
    bench.add_argument("--json", help="also write the results as JSON to this file")
    for name in ("config", "check", "bench", "serve"):
        sub.choices[name].add_argument("--config", dest="config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


COMMANDS = {"serve": cmd_serve, "config": cmd_config, "check": cmd_check, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command or "serve"]
    if not hasattr(args, "sources"):
        args.sources = False
    try:
        return command(args)
    except ConfigError as exc:
        # One clear line, no traceback: this is a user's mistake to fix.
        logsetup.configure("info", "auto")
        log.error("config_error", error=str(exc))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
