"""Which models this server offers, each with the configuration its engine is built with.

Three sources, in this order of precedence:
- `[models.<name>]` tables: a path, and per model any [model] key, `parallel`, sampling
  defaults, aliases, a role, keep_alive;
- every .gguf in `model.dir`, served under its file stem unless a table names that file
  (the one model.dir's rule picks is served as `model.name`, as before, its stem an alias);
- `model.path`, served as `model.name` (the one-model set every older configuration is).

Routing a request's `model` name (`Catalog.route`): the exact name, then an exact alias,
then the alias pattern with the most literal characters ("claude-*haiku*" before
"claude-*"), then the default model; with `router.strict`, an unknown name is None.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from llamad.config import (
    GGUF_MAGIC,
    Config,
    ConfigError,
    LoadedConfig,
    ModelConfig,
    ModelTable,
    SamplingConfig,
    parse_duration,
    resolve_model,
    validate,
)

# [model] keys a [models.<name>] table may set for itself, and [sampling] keys.
MODEL_KEYS = ("n_ctx", "n_threads", "n_batch", "n_gpu_layers", "chat_format", "prompt_cache_bytes", "type_k", "type_v", "flash_attn",
              "rope_scaling", "rope_scale", "rope_freq_base", "chat_template_kwargs")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


@dataclass(frozen=True)
class ModelSpec:
    """One servable model: its name, file and the configuration its engine is built with."""

    name: str
    path: Path
    config: Config
    role: str = "chat"
    aliases: tuple[str, ...] = ()
    # Seconds it stays loaded after its last request; None: until evicted or the server stops.
    keep_alive_s: float | None = None
    default: bool = False
    preload: bool = False
    # Where it was declared: "[models.coder]", "model.path", "model.dir".
    source: str = ""

    def settings(self) -> Any:
        """What shapes the loaded engine: a reload reloads the model when this changes."""
        c = self.config
        draft = (c.speculative.draft_model, c.speculative.draft_n_gpu_layers)  # a second model loaded beside it
        return (str(self.path), self.role, msgspec.to_builtins(c.model), c.server.parallel, msgspec.to_builtins(c.cache), draft)

    def runtime(self) -> Any:
        """What a loaded engine takes without a reload (queue, sampling, speculation)."""
        c = self.config
        return (c.server.max_queue, c.server.queue_timeout, msgspec.to_builtins(c.sampling), msgspec.to_builtins(c.speculative))


@dataclass
class Catalog:
    models: dict[str, ModelSpec]
    default_name: str
    strict: bool = False
    _patterns: list[tuple[int, str, str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        patterns = []
        for spec in self.models.values():
            for alias in spec.aliases:
                if _is_pattern(alias):
                    literal = sum(1 for ch in alias if ch not in "*?[]")
                    patterns.append((literal, alias, spec.name))
        # Most literal characters first; ties keep the order of the configuration.
        self._patterns = sorted(patterns, key=lambda item: -item[0])

    @property
    def default(self) -> ModelSpec:
        return self.models[self.default_name]

    def route(self, name: str | None) -> ModelSpec | None:
        """The model a request naming `name` reaches; None only in strict mode."""
        if not name:
            return self.default
        found = self.match(name)
        if found is None and not self.strict:
            found = self.default
        return found

    def match(self, name: str) -> ModelSpec | None:
        """The model `name` names (exactly, by alias or by pattern), or None."""
        found = self._exact(name)
        if found is None and ":" in name:  # Ollama's tags: "coder:latest" is "coder"
            base, tag = name.rsplit(":", 1)
            if tag == "latest":
                found = self._exact(base)
        if found is None:
            for _, pattern, target in self._patterns:
                if fnmatch.fnmatchcase(name, pattern):
                    found = self.models[target]
                    break
        return found

    def _exact(self, name: str) -> ModelSpec | None:
        if name in self.models:
            return self.models[name]
        for spec in self.models.values():
            if name in spec.aliases and not _is_pattern(name):
                return spec
        folded = name.casefold()
        for spec in self.models.values():
            if spec.name.casefold() == folded:
                return spec
        return None


def _is_pattern(alias: str) -> bool:
    return any(ch in alias for ch in "*?[")


def build_catalog(loaded: LoadedConfig) -> Catalog:
    """Every model the configuration offers; ConfigError names the key of anything wrong
    (a missing file, a file that is no GGUF, a bad per-model value)."""
    config = loaded.config
    forever_default = None
    router_keep_alive = parse_duration(config.router.keep_alive)
    specs: dict[str, ModelSpec] = {}
    claimed: set[Path] = set()
    for name, table in config.models.items():
        path = _checked_file(loaded, f"models.{name}.path", table.path)
        specs[name] = ModelSpec(
            name=name,
            path=path,
            config=_effective(loaded, name, table, path),
            role=table.role,
            aliases=tuple(table.aliases),
            keep_alive_s=parse_duration(table.keep_alive) if table.keep_alive is not None else router_keep_alive,
            default=table.default,
            preload=table.preload,
            source=f"[models.{name}]",
        )
        claimed.add(path.resolve())
    default_name = next((name for name, table in config.models.items() if table.default), None)
    single = None
    if config.model.path or config.model.dir or not specs:
        try:
            single = resolve_model(loaded)
        except ConfigError:
            if not specs:
                raise
    if single is not None:
        files = single.candidates if config.model.dir and not config.model.path else [single.path]
        for path in files:
            if path.resolve() in claimed:
                continue
            from_dir = bool(config.model.dir) and not config.model.path
            chosen = path == single.path
            # The file model.dir's rule picks is served as model.name (MODEL_NAME: "the
            # reported model id in responses", as it always was), the others as their stems.
            name = config.model.name if chosen or not from_dir else path.stem
            if name in specs:
                continue  # a table of that name wins
            specs[name] = ModelSpec(
                name=name,
                path=path,
                config=_effective(loaded, name, None, path),
                aliases=(path.stem,) if from_dir and chosen and name != path.stem else (),
                keep_alive_s=router_keep_alive,
                source="model.dir" if from_dir else "model.path",
            )
            claimed.add(path.resolve())
            if default_name is None and chosen and not config.models:
                default_name = name
    if default_name is None:
        chat = [name for name, spec in specs.items() if spec.role == "chat"]
        default_name = chat[0] if chat else next(iter(specs))
    # The default model stays loaded unless its table says otherwise.
    default = specs[default_name]
    table = config.models.get(default_name)
    keep = parse_duration(table.keep_alive) if table is not None and table.keep_alive is not None else forever_default
    specs[default_name] = _replace(default, default=True, keep_alive_s=keep)
    return Catalog(models=specs, default_name=default_name, strict=config.router.strict)


def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def _checked_file(loaded: LoadedConfig, dotted: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"'{dotted}' = {value!r} ({loaded.source(dotted)}): expected an existing .gguf file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConfigError(
            f"'{dotted}' = {value!r} ({loaded.source(dotted)}): cannot be read ({exc.strerror}); the service user needs read access"
        ) from None
    if magic != GGUF_MAGIC:
        raise ConfigError(f"'{dotted}' = {value!r} ({loaded.source(dotted)}): expected a GGUF file (it must start with the bytes 'GGUF')")
    return path


def _effective(loaded: LoadedConfig, name: str, table: ModelTable | None, path: Path) -> Config:
    """The configuration of one model: the server's, with the table's keys in [model],
    [server] parallel and [sampling]; validated like the server's, errors naming the table."""
    base = loaded.config
    model = msgspec.to_builtins(base.model)
    model.update(path=str(path), dir="", name=name)
    sampling = msgspec.to_builtins(base.sampling)
    server = base.server
    sources = dict(loaded.sources)
    if table is not None:
        for key in MODEL_KEYS:
            value = getattr(table, key)
            if value is not None:
                model[key] = value
                sources[f"model.{key}"] = f"[models.{name}] {loaded.source(f'models.{name}.{key}')}"
        for key in SAMPLING_KEYS:
            value = getattr(table, key)
            if value is not None:
                sampling[key] = value
                sources[f"sampling.{key}"] = f"[models.{name}] {loaded.source(f'models.{name}.{key}')}"
        if table.parallel is not None:
            server = msgspec.structs.replace(server, parallel=table.parallel)
            sources["server.parallel"] = f"[models.{name}] {loaded.source(f'models.{name}.parallel')}"
    try:
        effective = msgspec.structs.replace(
            base,
            model=msgspec.convert(model, ModelConfig, strict=False),
            sampling=msgspec.convert(sampling, SamplingConfig, strict=False),
            server=server,
            models={},
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(f"[models.{name}]: {exc}") from None
    try:
        validate(LoadedConfig(config=effective, sources=sources, file=loaded.file))
    except ConfigError as exc:
        raise ConfigError(f"[models.{name}]: {exc}" if table is not None else str(exc)) from None
    return effective


class ModelNotFound(Exception):
    """router.strict: the request names no configured model (a 404 in the family's shape)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"model '{name}' not found; this server has: {', '.join(known)}")
        self.name = name


class WrongRole(Exception):
    """A chat request for an embedding model, or the other way round (a 400)."""

    def __init__(self, name: str, role: str, wanted: str):
        kind = {"embeddings": "an embedding model", "chat": "a chat model"}.get(role, f"a {role} model")
        super().__init__(f"model '{name}' is {kind}: it cannot answer {wanted} requests")
        self.name = name
