"""Configuration: built-in defaults < TOML file < environment, validated once.

Every value remembers where it came from, so `llamad config --sources` can say it and a
validation error can name the key, the source (file and line, or variable) and what was
expected.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import msgspec

from llamad.engine.types import Sampling

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/llamad.toml")


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # Requests allowed to wait for the engine; beyond that the answer is an immediate 429/529.
    max_queue: int = 16
    # Seconds a request may wait for the engine before it gets an overload error.
    queue_timeout: float = 60.0
    max_body_bytes: int = 4 * 1024 * 1024
    # A streamed answer whose client stops reading for this long is cancelled.
    write_timeout: float = 30.0
    # SIGTERM: how long the running generation may go on before it is cut.
    shutdown_grace: float = 10.0
    api_keys: list[str] = []
    api_key_file: str = ""
    metrics_require_key: bool = False
    # Requests decoded together in one llama.cpp context (continuous batching); each slot
    # holds up to model.n_ctx tokens of KV. 1: one request at a time.
    parallel: int = 4


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""
    dir: str = ""
    # The id reported in responses and /v1/models (the seed's MODEL_NAME).
    name: str = "llama-local"
    n_ctx: int = 4096
    # 0 means one thread per CPU core.
    n_threads: int = 0
    n_batch: int = 512
    # -1 offloads every layer (a no-op on a CPU-only build).
    n_gpu_layers: int = -1
    # Empty: the GGUF's own template, or a choice by architecture when it has none.
    chat_format: str = ""
    # Bytes of saved KV state kept for prompt-prefix reuse beyond the live context; 0 disables.
    prompt_cache_bytes: int = 256 * 1024 * 1024
    # KV cache element types (llama.cpp's --cache-type-k / -v): "q8_0" takes about half the
    # memory of "f16"; a quantized type_v needs flash attention (it forces it on).
    type_k: str = "f16"
    type_v: str = "f16"
    # "auto": measured on this machine for this model (llamad.engine.flash_attn); "on", "off".
    # TOML true / false are read as "on" / "off".
    flash_attn: str | bool = "auto"
    # RoPE scaling, to serve a context past the GGUF's trained one (llama.cpp's
    # --rope-scaling / --rope-scale): "" uses the GGUF's own; "linear" or "yarn" with
    # rope_scale N (> 1) stretches the trained context N times, and n_ctx may go that far.
    rope_scaling: str = ""
    rope_scale: float = 0.0
    # The RoPE base frequency; 0: the GGUF's.
    rope_freq_base: float = 0.0
    # Variables every request's chat template is rendered with, under what a request sends
    # (its chat_template_kwargs, reasoning switches): llama-server's --chat-template-kwargs.
    # E.g. {clear_thinking = false} keeps GLM 4.7's earlier reasoning in the prompt.
    chat_template_kwargs: dict[str, Any] = {}


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Saved prompt states (KV) on disk, so a restart or reload finds them
    # (llamad.engine.disk_cache). Empty: $CACHE_DIRECTORY/kv when systemd sets it
    # (CacheDirectory=), else $XDG_CACHE_HOME/llamad/kv, else ~/.cache/llamad/kv.
    dir: str = ""
    # Bytes the directory may hold; the least recently used state goes first. 0 turns it off.
    max_bytes: int = 2 * 1024 * 1024 * 1024


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_tokens_hard_cap: int = 1024
    # Used when a request names no max_tokens (OpenAI makes it optional).
    default_max_tokens: int = 512
    max_messages: int = 1024


class SamplingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # What a request gets for each setting it does not send (llama.cpp's defaults). Clients
    # that never send a temperature (Codex, for one) are sampled with these.
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0


def sampling_defaults(config: "Config") -> Sampling:
    s = config.sampling
    return Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, repeat_penalty=s.repeat_penalty)


class LoggingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: str = "info"
    # auto: JSON when stdout is not a terminal (journald), console when it is.
    format: str = "auto"
    # Log prompts and completions (off: they may be private).
    log_content: bool = False


class EmbeddingsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Empty: embeddings come from the chat model. A GGUF path: a dedicated embedding model,
    # loaded beside the chat model, with its own queue.
    path: str = ""
    # mean | cls | last | model (what the GGUF declares; mean when it declares none)
    pooling: str = "model"
    normalize: bool = True
    # Tokens per batch, and so the longest input (the compute buffer grows with it).
    batch_tokens: int = 512
    n_threads: int = 0


EMBEDDING_POOLINGS = ("model", "mean", "cls", "last")
class ResponsesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Recent /v1/responses answers kept in memory for previous_response_id and GET; the
    # oldest go first when either bound is reached. 0 keeps none.
    store_max: int = 256
    store_max_bytes: int = 64 * 1024 * 1024


class SpeculativeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # N-gram speculative decoding (llamad.engine.speculative): drafts from each request's own
    # prompt and answer, checked by the model in the same step; the answers do not change.
    # On by default: `llamad bench --speculation` measured sampled prose, where drafts are
    # rare and mostly fail, at on / off 0.99-1.01 (docs/benchmark.md); a request turns it off
    # with X-Llamad-Speculative: off.
    enabled: bool = True
    # Tokens looked up: the last `ngram` tokens must have occurred before.
    ngram: int = 12
    # Tokens one draft may hold, and the fewest worth feeding.
    draft_max: int = 32
    draft_min: int = 2
    # A second, smaller GGUF with the same vocabulary that drafts where the lookup finds
    # nothing (llamad.engine.llama_draft); empty: n-gram drafts only.
    draft_model: str = ""
    # Its layers offloaded to the GPU (-1: all), and the least probability its greedy choice
    # must have for a draft to go on (llama.cpp's --draft-p-min).
    draft_n_gpu_layers: int = -1
    draft_p_min: float = 0.75


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Several models (llamad.models): which one a request's `model` name reaches, and which
    # of them are loaded. An unknown name goes to the default model; strict: a 404 instead.
    strict: bool = False
    # Bytes the loaded models may take together (weights + KV cache, estimated before a load,
    # measured after): "auto" is 90% of the memory free at start (RAM, plus free GPU memory
    # where nvidia-smi reports it); a number of bytes, or "12G", "512M".
    memory_budget: Union[int, str] = "auto"
    # Models loaded at once; 0: as many as the budget holds.
    max_loaded: int = 0
    # How long a model other than the default stays loaded after its last request when its
    # table sets no keep_alive (Ollama's meaning: "5m", "1h", seconds; 0 unloads at once; a
    # negative value keeps it loaded).
    keep_alive: Union[int, float, str] = "5m"
    # Seconds a request waits for its model to load before it gets a 503.
    load_timeout: float = 300.0


class ModelTable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One `[models.<name>]` table: a model served under <name>. Keys left out take the
    value of [model], [server] parallel and [sampling]."""

    path: str = ""
    # More names this model answers to; a name with * or ? is a pattern ("claude-*haiku*").
    aliases: list[str] = []
    # "chat" (every generating face) or "embeddings" (/v1/embeddings, /api/embed only).
    role: str = "chat"
    # The model a request reaches when its name matches none (and the one loaded at start);
    # without one, the first table.
    default: bool = False
    # Load at start instead of on the first request.
    preload: bool = False
    # None: router.keep_alive (the default model: stays loaded).
    keep_alive: Union[int, float, str, None] = None
    parallel: Optional[int] = None
    n_ctx: Optional[int] = None
    n_threads: Optional[int] = None
    n_batch: Optional[int] = None
    n_gpu_layers: Optional[int] = None
    chat_format: Optional[str] = None
    prompt_cache_bytes: Optional[int] = None
    type_k: Optional[str] = None
    type_v: Optional[str] = None
    flash_attn: Union[bool, str, None] = None
    rope_scaling: Optional[str] = None
    rope_scale: Optional[float] = None
    rope_freq_base: Optional[float] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    sampling: SamplingConfig = msgspec.field(default_factory=SamplingConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    embeddings: EmbeddingsConfig = msgspec.field(default_factory=EmbeddingsConfig)
    responses: ResponsesConfig = msgspec.field(default_factory=ResponsesConfig)
    speculative: SpeculativeConfig = msgspec.field(default_factory=SpeculativeConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    # [models.<name>] tables (llamad.models.catalog); none: [model] is the one model.
    models: dict[str, ModelTable] = {}


SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": ServerConfig,
    "model": ModelConfig,
    "cache": CacheConfig,
    "limits": LimitsConfig,
    "sampling": SamplingConfig,
    "logging": LoggingConfig,
    "embeddings": EmbeddingsConfig,
    "responses": ResponsesConfig,
    "speculative": SpeculativeConfig,
    "router": RouterConfig,
}

# The seed server's environment names, kept so old deployments keep working.
LEGACY_ENV: dict[str, tuple[str, str]] = {
    "MODEL_PATH": ("model", "path"),
    "MODEL_DIR": ("model", "dir"),
    "MODEL_NAME": ("model", "name"),
    "N_CTX": ("model", "n_ctx"),
    "N_THREADS": ("model", "n_threads"),
    "N_GPU_LAYERS": ("model", "n_gpu_layers"),
    "MAX_TOKENS_HARD_CAP": ("limits", "max_tokens_hard_cap"),
    "PORT": ("server", "port"),
    "HOST": ("server", "host"),
    "LLAMAD_API_KEY": ("server", "api_keys"),
    "PARALLEL": ("server", "parallel"),
}

LOG_LEVELS = ("debug", "info", "warning", "error")
# The KV cache types llama.cpp accepts (common/arg.cpp), each with its GGML type number.
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}
UNQUANTIZED_KV_TYPES = ("f32", "f16", "bf16")
ROPE_SCALINGS = ("", "none", "linear", "yarn")
FLASH_ATTN_SETTINGS = ("auto", "on", "off")
# TOML booleans, and their spellings in the environment, as on / off.
_FLASH_ATTN_ALIASES = {True: "on", False: "off", "true": "on", "false": "off"}
LOG_FORMATS = ("auto", "json", "console")


class ConfigError(Exception):
    """A user mistake in the configuration: one line that says what and where."""


@dataclass
class LoadedConfig:
    config: Config
    # "section.key" -> "default" | "/etc/llamad.toml:12" | "env MODEL_PATH"
    sources: dict[str, str] = field(default_factory=dict)
    file: Path | None = None

    def source(self, dotted: str) -> str:
        return self.sources.get(dotted, "default")


def _field_names(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    return struct.__struct_fields__


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """Best-effort line number of `key` inside `[section]` of a TOML text."""
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", stripped)
        if header:
            current = header.group(1)
            if section is not None and current == section and key == section:
                return number
            continue
        if current == section and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _where(path: Path, text: str, section: str | None, key: str) -> str:
    line = _line_of(text, section, key)
    return f"{path}:{line}" if line else str(path)


def _expected(struct: type[msgspec.Struct], key: str) -> str:
    hint = struct.__annotations__.get(key, "")
    hint = str(hint).replace("list[str]", "a list of strings").replace("str | bool", '"auto", "on" or "off"')
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(
        hint, hint
    )


SECRET_KEYS = frozenset({"server.api_keys"})


def _shown(dotted: str, value: Any) -> str:
    """A value for an error message; API keys are never written to the log."""
    return "<redacted>" if dotted in SECRET_KEYS else repr(value)


def _convert_section(
    section: str, raw: Mapping[str, Any], where: Mapping[str, str], strict: bool
) -> msgspec.Struct:
    struct = SECTIONS[section]
    for key in raw:
        if key not in _field_names(struct):
            known = ", ".join(_field_names(struct))
            raise ConfigError(
                f"unknown key '{section}.{key}' ({where[key]}); known keys in [{section}]: {known}"
            )
    try:
        return msgspec.convert(dict(raw), struct, strict=strict)
    except msgspec.ValidationError as exc:
        match = re.search(r"at `\$\.([A-Za-z0-9_]+)", str(exc))
        key = match.group(1) if match else next(iter(raw), "?")
        value = _shown(f"{section}.{key}", raw.get(key))
        raise ConfigError(
            f"'{section}.{key}' = {value} ({where.get(key, '?')}): expected {_expected(struct, key)}"
        ) from None


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _env_value(section: str, key: str, value: str) -> Any:
    """Environment strings become lists for list keys; msgspec converts the rest."""
    annotation = str(SECTIONS[section].__annotations__.get(key, ""))
    if annotation.startswith("list"):
        return [item.strip() for item in value.split(",") if item.strip()]
    if annotation.startswith("dict"):  # a JSON object: LLAMAD_MODEL_CHAT_TEMPLATE_KWARGS='{"enable_thinking": false}'
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(f"LLAMAD_{section.upper()}_{key.upper()} must be a JSON object, got {value!r}")
        return parsed
    return value


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Builds the effective configuration. `path=None` means LLAMAD_CONFIG or /etc/llamad.toml."""
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("LLAMAD_CONFIG"))
    file = Path(path if path is not None else env.get("LLAMAD_CONFIG") or DEFAULT_CONFIG_PATH)

    raw_sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    where: dict[str, dict[str, str]] = {name: {} for name in SECTIONS}
    sources: dict[str, str] = {}
    file_used: Path | None = None

    models: dict[str, ModelTable] = {}
    if file.exists():
        data, text = _read_file(file)
        file_used = file
        for section, values in data.items():
            if section == "models":
                models = _model_tables(file, text, values, sources)
                continue
            if section not in SECTIONS:
                location = _where(file, text, section, section)
                raise ConfigError(
                    f"unknown section [{section}] ({location}); known sections: {', '.join(SECTIONS)}"
                )
            if not isinstance(values, dict):
                raise ConfigError(f"'{section}' ({_where(file, text, None, section)}) must be a table")
            for key, value in values.items():
                raw_sections[section][key] = value
                where[section][key] = _where(file, text, section, key)
                sources[f"{section}.{key}"] = where[section][key]
    elif explicit:
        raise ConfigError(f"config file {file} does not exist")

    # TOML values are typed already: convert them strictly so `port = "80"` is an error.
    for section in SECTIONS:
        _convert_section(section, raw_sections[section], where[section], strict=True)

    for variable, (section, key) in LEGACY_ENV.items():
        if variable in env and env[variable] != "":
            if variable == "LLAMAD_API_KEY":  # adds a key to those of the file
                listed = raw_sections[section].get(key)
                added = _env_value(section, key, env[variable])  # "k1,k2": two keys
                raw_sections[section][key] = (list(listed) if isinstance(listed, list) else []) + added
                sources[f"{section}.{key}"] = f"{sources.get(f'{section}.{key}', 'default')} + env {variable}"
                where[section][key] = sources[f"{section}.{key}"]
                continue
            raw_sections[section][key] = _env_value(section, key, env[variable])
            where[section][key] = f"env {variable}"
            sources[f"{section}.{key}"] = f"env {variable}"
    for section, struct in SECTIONS.items():
        for key in _field_names(struct):
            variable = f"LLAMAD_{section.upper()}_{key.upper()}"
            if variable in env:
                raw_sections[section][key] = _env_value(section, key, env[variable])
                where[section][key] = f"env {variable}"
                sources[f"{section}.{key}"] = f"env {variable}"

    converted = {
        section: _convert_section(section, raw_sections[section], where[section], strict=False)
        for section in SECTIONS
    }
    config = Config(**converted, models=models)
    loaded = LoadedConfig(config=config, sources=sources, file=file_used)
    validate(loaded)
    return loaded


MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def _model_tables(file: Path, text: str, values: Any, sources: dict[str, str]) -> dict[str, ModelTable]:
    """The [models.<name>] tables, each converted strictly (a typo names its key and line)."""
    where_models = _where(file, text, None, "models")
    if not isinstance(values, dict):
        raise ConfigError(f"'models' ({where_models}) must hold tables: [models.<name>]")
    tables: dict[str, ModelTable] = {}
    for name, table in values.items():
        section = f"models.{name}"
        location = _where(file, text, section, section)
        if not isinstance(table, dict):
            raise ConfigError(f"'models.{name}' ({location}) must be a table: [models.{name}] with a path")
        if not MODEL_NAME_PATTERN.match(name):
            raise ConfigError(f"[models.{name}] ({location}): a model name is letters, digits and . _ : / -")
        for key in table:
            if key not in _field_names(ModelTable):
                raise ConfigError(
                    f"unknown key '{section}.{key}' ({_where(file, text, section, key)}); "
                    f"known keys in [models.<name>]: {', '.join(_field_names(ModelTable))}"
                )
            sources[f"{section}.{key}"] = _where(file, text, section, key)
        try:
            tables[name] = msgspec.convert(table, ModelTable, strict=True)
        except msgspec.ValidationError as exc:
            match = re.search(r"at `\$\.([A-Za-z0-9_]+)", str(exc))
            key = match.group(1) if match else next(iter(table), "?")
            raise ConfigError(
                f"'{section}.{key}' = {table.get(key)!r} ({_where(file, text, section, key)}): "
                f"expected {_expected(ModelTable, key)}"
            ) from None
    return tables


def _check(condition: bool, loaded: LoadedConfig, dotted: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"'{dotted}' = {_shown(dotted, value)} ({loaded.source(dotted)}): expected {expected}")


def validate(loaded: LoadedConfig) -> None:
    c = loaded.config
    _check(1 <= c.server.port <= 65535, loaded, "server.port", c.server.port, "a port from 1 to 65535")
    _check(c.server.host != "", loaded, "server.host", c.server.host, "an address to bind")
    _check(c.server.max_queue >= 0, loaded, "server.max_queue", c.server.max_queue, "0 or more")
    _check(c.server.queue_timeout > 0, loaded, "server.queue_timeout", c.server.queue_timeout, "seconds > 0")
    _check(c.server.max_body_bytes >= 1024, loaded, "server.max_body_bytes", c.server.max_body_bytes, "at least 1024")
    _check(c.server.write_timeout > 0, loaded, "server.write_timeout", c.server.write_timeout, "seconds > 0")
    _check(1 <= c.server.parallel <= 64, loaded, "server.parallel", c.server.parallel, "from 1 to 64 slots")
    _check(c.server.shutdown_grace >= 0, loaded, "server.shutdown_grace", c.server.shutdown_grace, "seconds >= 0")
    _check(c.model.n_ctx >= 64, loaded, "model.n_ctx", c.model.n_ctx, "at least 64")
    _check(c.model.n_threads >= 0, loaded, "model.n_threads", c.model.n_threads, "0 (all cores) or more")
    _check(c.model.n_batch >= 1, loaded, "model.n_batch", c.model.n_batch, "at least 1")
    _check(c.model.n_gpu_layers >= -1, loaded, "model.n_gpu_layers", c.model.n_gpu_layers, "-1 (all) or more")
    _check(c.model.name != "", loaded, "model.name", c.model.name, "a non-empty model id")
    _check(c.model.prompt_cache_bytes >= 0, loaded, "model.prompt_cache_bytes", c.model.prompt_cache_bytes, "0 or more")
    for key in ("type_k", "type_v"):
        value = getattr(c.model, key)
        _check(value in KV_CACHE_TYPES, loaded, f"model.{key}", value, "one of " + ", ".join(KV_CACHE_TYPES))
    flash_attn = c.model.flash_attn
    if isinstance(flash_attn, str):
        flash_attn = flash_attn.strip().lower()
    c.model.flash_attn = _FLASH_ATTN_ALIASES.get(flash_attn, flash_attn)
    _check(
        c.model.flash_attn in FLASH_ATTN_SETTINGS, loaded, "model.flash_attn", c.model.flash_attn,
        '"auto" (measured on this machine), "on" or "off" (true and false mean on and off)',
    )
    if c.model.type_v not in UNQUANTIZED_KV_TYPES and c.model.flash_attn == "off":
        raise ConfigError(
            f"'model.type_v' = {c.model.type_v!r} ({loaded.source('model.type_v')}): a quantized V cache needs "
            'flash attention, and model.flash_attn is "off": set it to "auto" or "on", or type_v = "f16"'
        )
    _check(c.model.rope_scaling in ROPE_SCALINGS, loaded, "model.rope_scaling", c.model.rope_scaling,
           "one of " + ", ".join(repr(v) for v in ROPE_SCALINGS))
    _check(c.model.rope_freq_base >= 0, loaded, "model.rope_freq_base", c.model.rope_freq_base, "0 (the GGUF's) or more")
    if c.model.rope_scaling in ("linear", "yarn"):
        _check(c.model.rope_scale > 1, loaded, "model.rope_scale", c.model.rope_scale,
               f"a factor above 1 with rope_scaling = {c.model.rope_scaling!r} (4: four times the trained context)")
    else:
        _check(c.model.rope_scale == 0, loaded, "model.rope_scale", c.model.rope_scale,
               "0 unless model.rope_scaling is \"linear\" or \"yarn\"")
    _check(c.cache.max_bytes >= 0, loaded, "cache.max_bytes", c.cache.max_bytes, "0 (off) or more")
    _check(c.limits.max_tokens_hard_cap >= 1, loaded, "limits.max_tokens_hard_cap", c.limits.max_tokens_hard_cap, "at least 1")
    _check(c.limits.default_max_tokens >= 1, loaded, "limits.default_max_tokens", c.limits.default_max_tokens, "at least 1")
    _check(c.limits.max_messages >= 1, loaded, "limits.max_messages", c.limits.max_messages, "at least 1")
    _check(0 <= c.sampling.temperature <= 2, loaded, "sampling.temperature", c.sampling.temperature, "between 0 and 2")
    _check(0 <= c.sampling.top_p <= 1, loaded, "sampling.top_p", c.sampling.top_p, "between 0 and 1")
    _check(c.sampling.top_k >= 0, loaded, "sampling.top_k", c.sampling.top_k, "0 (off) or more")
    _check(0 <= c.sampling.min_p <= 1, loaded, "sampling.min_p", c.sampling.min_p, "between 0 and 1")
    _check(0 <= c.sampling.repeat_penalty <= 10, loaded, "sampling.repeat_penalty", c.sampling.repeat_penalty, "between 0 and 10")
    _check(c.logging.level in LOG_LEVELS, loaded, "logging.level", c.logging.level, "one of " + ", ".join(LOG_LEVELS))
    _check(c.logging.format in LOG_FORMATS, loaded, "logging.format", c.logging.format, "one of " + ", ".join(LOG_FORMATS))
    e = c.embeddings
    _check(e.pooling in EMBEDDING_POOLINGS, loaded, "embeddings.pooling", e.pooling, "one of " + ", ".join(EMBEDDING_POOLINGS))
    _check(e.batch_tokens >= 8, loaded, "embeddings.batch_tokens", e.batch_tokens, "at least 8")
    _check(e.n_threads >= 0, loaded, "embeddings.n_threads", e.n_threads, "0 (all cores) or more")
    if e.path:
        _check(Path(e.path).expanduser().is_file(), loaded, "embeddings.path", e.path, "an existing .gguf file")
    _check(c.responses.store_max >= 0, loaded, "responses.store_max", c.responses.store_max, "0 or more")
    _check(c.responses.store_max_bytes >= 0, loaded, "responses.store_max_bytes", c.responses.store_max_bytes, "0 or more")
    p = c.speculative
    _check(1 <= p.ngram <= 64, loaded, "speculative.ngram", p.ngram, "from 1 to 64 tokens")
    _check(1 <= p.draft_max <= 256, loaded, "speculative.draft_max", p.draft_max, "from 1 to 256 tokens")
    _check(1 <= p.draft_min <= p.draft_max, loaded, "speculative.draft_min", p.draft_min, "from 1 to speculative.draft_max")
    if p.draft_model:
        _check(Path(p.draft_model).expanduser().is_file(), loaded, "speculative.draft_model", p.draft_model, "an existing .gguf file")
    _check(p.draft_n_gpu_layers >= -1, loaded, "speculative.draft_n_gpu_layers", p.draft_n_gpu_layers, "-1 (all) or more")
    _check(0.0 <= p.draft_p_min <= 1.0, loaded, "speculative.draft_p_min", p.draft_p_min, "from 0 to 1")
    r = c.router
    _check(r.max_loaded >= 0, loaded, "router.max_loaded", r.max_loaded, "0 (as the budget allows) or more")
    _check(r.load_timeout > 0, loaded, "router.load_timeout", r.load_timeout, "seconds > 0")
    for dotted, value, parse, expected in (
        ("router.memory_budget", r.memory_budget, parse_bytes, '"auto", a number of bytes, or a size such as "12G"'),
        ("router.keep_alive", r.keep_alive, parse_duration, 'a duration such as "5m", "1h", seconds, 0, or -1'),
    ):
        try:
            parse(value)
        except ValueError:
            _check(False, loaded, dotted, value, expected)
    defaults = [name for name, table in c.models.items() if table.default]
    if len(defaults) > 1:
        raise ConfigError(f"[models.{defaults[1]}] ({loaded.source(f'models.{defaults[1]}.default')}): "
                          f"default = true is set on {', '.join(defaults)}; one model may be the default")
    for name, table in c.models.items():
        where = f"models.{name}"
        _check(table.path != "", loaded, f"{where}.path", table.path, "the path of a .gguf file")
        _check(table.role in MODEL_ROLES, loaded, f"{where}.role", table.role, "one of " + ", ".join(MODEL_ROLES))
        if table.keep_alive is not None:
            try:
                parse_duration(table.keep_alive)
            except ValueError:
                _check(False, loaded, f"{where}.keep_alive", table.keep_alive, 'a duration such as "5m", "1h", seconds, 0, or -1')
    if c.server.api_key_file:
        key_file = Path(c.server.api_key_file)
        _check(key_file.is_file(), loaded, "server.api_key_file", c.server.api_key_file, "a readable file of keys")
        try:
            from_file = _keys_in(key_file)
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"'server.api_key_file' = {c.server.api_key_file!r} ({loaded.source('server.api_key_file')}): "
                f"cannot be read ({reason}); the service user needs read access (e.g. chgrp llamad, chmod 0640)"
            ) from None
        # A key file that yields no key would silently turn authentication off.
        _check(bool(from_file), loaded, "server.api_key_file", c.server.api_key_file, "a file holding at least one key")


MODEL_ROLES = ("chat", "embeddings")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_duration(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "300ms",
    "-1m"), or a number in a string. None: forever (any negative value); 0: at once."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"not a duration: {value!r}") from None
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if seconds != seconds:  # NaN
        raise ValueError(f"not a duration: {value!r}")
    return None if seconds < 0 else seconds


def parse_bytes(value: Any) -> int | None:
    """A memory size: bytes, or "12G", "512MiB"; None for "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"not a size: {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _keys_in(path: Path) -> list[str]:
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    return keys


def api_keys(config: Config) -> list[str]:
    """Keys from `api_keys` and `api_key_file` (one per line, # comments allowed)."""
    keys = [k for k in config.server.api_keys if k]
    if config.server.api_key_file:
        keys += _keys_in(Path(config.server.api_key_file))
    return keys


@dataclass
class ModelChoice:
    path: Path
    # Why this file: "model.path" or "model.dir (3 files, chose by name)".
    reason: str
    candidates: list[Path] = field(default_factory=list)


GGUF_MAGIC = b"GGUF"


def resolve_model(loaded: LoadedConfig) -> ModelChoice:
    """Finds the GGUF file to serve and checks it is one; errors name the key and source."""
    c = loaded.config.model
    if c.path:
        path = Path(c.path).expanduser()
        reason = "model.path"
        candidates = [path]
        _check(path.is_file(), loaded, "model.path", c.path, "an existing .gguf file")
    elif c.dir:
        directory = Path(c.dir).expanduser()
        _check(directory.is_dir(), loaded, "model.dir", c.dir, "an existing directory of .gguf files")
        candidates = sorted(p for p in directory.iterdir() if p.suffix == ".gguf" and p.is_file())
        _check(bool(candidates), loaded, "model.dir", c.dir, "a directory holding at least one .gguf file")
        named = [p for p in candidates if c.name in (p.name, p.stem)]
        if named:
            path, reason = named[0], f"model.dir: the file named by model.name ({c.name})"
        else:
            path, reason = candidates[0], "model.dir: first .gguf in sorted order"
    else:
        raise ConfigError(
            "no model configured: set model.path or model.dir in the config file, "
            "or MODEL_PATH / MODEL_DIR in the environment"
        )
    key = "model.path" if c.path else "model.dir"
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConfigError(
            f"'{key}' = {str(path)!r} ({loaded.source(key)}): cannot be read ({exc.strerror}); "
            "the service user needs read access"
        ) from None
    _check(magic == GGUF_MAGIC, loaded, key, str(path), "a GGUF file (it must start with the bytes 'GGUF')")
    return ModelChoice(path=path, reason=reason, candidates=candidates)


def file_identity(path: Path) -> tuple[str, int, int] | None:
    """Which file `path` is now (path, size, mtime), or None if it cannot be read: the engine
    records it at load, and a reload swaps the model when resolve_model's file differs."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns)


def kv_cache_dir(config: Config, env: Mapping[str, str] | None = None) -> Path:
    """Where saved prompt states go on disk: `cache.dir`, else the directory systemd made
    for the unit (CacheDirectory=llamad sets $CACHE_DIRECTORY), else the user's cache."""
    env = os.environ if env is None else env
    if config.cache.dir:
        return Path(config.cache.dir).expanduser()
    systemd = env.get("CACHE_DIRECTORY", "").split(":")[0]
    if systemd:
        return Path(systemd) / "kv"
    xdg = env.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "llamad" / "kv"


def to_toml_data(config: Config) -> dict[str, Any]:
    return msgspec.to_builtins(config)
