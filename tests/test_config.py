"""Configuration: precedence, the seed's environment names, and every validation error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamad.config import ConfigError, file_identity, load_config, resolve_model


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llamad.toml"
    path.write_text(text)
    return path


def gguf(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"GGUF" + b"\0" * 16)
    return path


def test_defaults_when_the_default_file_is_missing(tmp_path):
    loaded = load_config(env={"LLAMAD_CONFIG": ""}) if not Path("/etc/llamad.toml").exists() else None
    if loaded is None:
        pytest.skip("/etc/llamad.toml exists on this machine")
    c = loaded.config
    assert (c.server.host, c.server.port, c.model.name, c.model.n_ctx, c.limits.max_tokens_hard_cap) == (
        "127.0.0.1",
        8000,
        "llama-local",
        4096,
        1024,
    )
    assert loaded.file is None


def test_precedence_defaults_then_toml_then_environment(tmp_path):
    path = write(tmp_path, "[model]\nn_ctx = 2048\nname = 'from-toml'\n[server]\nport = 9000\n")
    loaded = load_config(path, env={"N_CTX": "1024", "LLAMAD_SERVER_PORT": "9100"})
    assert loaded.config.model.n_ctx == 1024
    assert loaded.config.model.name == "from-toml"
    assert loaded.config.server.port == 9100
    assert loaded.source("model.n_ctx") == "env N_CTX"
    assert loaded.source("model.name") == f"{path}:3"
    assert loaded.source("server.max_queue") == "default"


@pytest.mark.parametrize(
    "variable,value,section,key,expected",
    [
        ("MODEL_PATH", "/m.gguf", "model", "path", "/m.gguf"),
        ("MODEL_DIR", "/models", "model", "dir", "/models"),
        ("MODEL_NAME", "mine", "model", "name", "mine"),
        ("N_CTX", "8192", "model", "n_ctx", 8192),
        ("N_THREADS", "6", "model", "n_threads", 6),
        ("N_GPU_LAYERS", "40", "model", "n_gpu_layers", 40),
        ("MAX_TOKENS_HARD_CAP", "256", "limits", "max_tokens_hard_cap", 256),
        ("PORT", "8123", "server", "port", 8123),
        ("HOST", "0.0.0.0", "server", "host", "0.0.0.0"),
        ("LLAMAD_API_KEY", "k1,k2", "server", "api_keys", ["k1", "k2"]),
        ("LLAMAD_LIMITS_MAX_MESSAGES", "12", "limits", "max_messages", 12),
        ("LLAMAD_LOGGING_LOG_CONTENT", "true", "logging", "log_content", True),
    ],
)
def test_environment_names(tmp_path, variable, value, section, key, expected):
    loaded = load_config(write(tmp_path, ""), env={variable: value})
    assert getattr(getattr(loaded.config, section), key) == expected


def test_systematic_name_wins_over_the_seed_name(tmp_path):
    loaded = load_config(write(tmp_path, ""), env={"PORT": "8001", "LLAMAD_SERVER_PORT": "8002"})
    assert loaded.config.server.port == 8002


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, "[server]\nhost = '127.0.0.1'\nprot = 80\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'server.prot' \({path}:3\).*known keys"):
        load_config(path, env={})


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[serverr]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[serverr\]"):
        load_config(path, env={})


def test_wrong_type_in_toml(tmp_path):
    path = write(tmp_path, "[server]\nport = '8000'\n")
    with pytest.raises(ConfigError, match=rf"'server.port' = '8000' \({path}:2\): expected an integer"):
        load_config(path, env={})


def test_wrong_type_in_environment_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.n_ctx' = 'lots' \(env N_CTX\): expected an integer"):
        load_config(write(tmp_path, ""), env={"N_CTX": "lots"})


@pytest.mark.parametrize(
    "toml,message",
    [
        ("[server]\nport = 70000\n", "'server.port' = 70000"),
        ("[model]\nn_ctx = 8\n", "'model.n_ctx' = 8"),
        ("[model]\nn_gpu_layers = -5\n", "'model.n_gpu_layers' = -5"),
        ("[limits]\nmax_tokens_hard_cap = 0\n", "'limits.max_tokens_hard_cap' = 0"),
        ("[logging]\nlevel = 'loud'\n", "'logging.level' = 'loud'"),
        ("[server]\nqueue_timeout = 0\n", "'server.queue_timeout' = 0"),
    ],
)
def test_out_of_range_values(tmp_path, toml, message):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[server\n"), env={})


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"LLAMAD_CONFIG": str(tmp_path / "nope.toml")})


def test_model_path_missing_and_not_gguf(tmp_path):
    loaded = load_config(write(tmp_path, ""), env={"MODEL_PATH": str(tmp_path / "none.gguf")})
    with pytest.raises(ConfigError, match=r"'model.path' .*\(env MODEL_PATH\): expected an existing .gguf file"):
        resolve_model(loaded)
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    loaded = load_config(write(tmp_path, ""), env={"MODEL_PATH": str(fake)})
    with pytest.raises(ConfigError, match="expected a GGUF file"):
        resolve_model(loaded)


def test_no_model_configured(tmp_path):
    with pytest.raises(ConfigError, match="no model configured"):
        resolve_model(load_config(write(tmp_path, ""), env={}))


def test_model_dir_picks_named_file_or_first_sorted(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    gguf(models, "b.gguf")
    gguf(models, "a.gguf")
    gguf(models, "mine.gguf")
    choice = resolve_model(load_config(write(tmp_path, ""), env={"MODEL_DIR": str(models)}))
    assert choice.path.name == "a.gguf" and "sorted" in choice.reason
    choice = resolve_model(load_config(write(tmp_path, ""), env={"MODEL_DIR": str(models), "MODEL_NAME": "mine"}))
    assert choice.path.name == "mine.gguf" and "model.name" in choice.reason


def test_model_dir_without_gguf(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="at least one .gguf"):
        resolve_model(load_config(write(tmp_path, ""), env={"MODEL_DIR": str(tmp_path / "empty")}))


def test_file_identity_tells_a_replaced_model_file_apart(tmp_path):
    """What a reload compares: the same path holding another file is another model."""
    path = gguf(tmp_path, "m.gguf")
    before = file_identity(path)
    assert before is not None and before[0] == str(path) and file_identity(path) == before
    path.write_bytes(b"GGUF" + b"\1" * 64)  # replaced: other size and mtime
    assert file_identity(path) != before
    assert file_identity(tmp_path / "gone.gguf") is None


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llamad.cli", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
    )


def test_cli_config_prints_toml_with_sources(tmp_path):
    import tomllib

    path = write(tmp_path, "[model]\nn_ctx = 2048\n")
    result = run_cli("--config", str(path), "config", "--sources", env={"PORT": "8555"})
    assert result.returncode == 0, result.stderr
    assert "port = 8555  # env PORT" in result.stdout
    assert f"n_ctx = 2048  # {path}:2" in result.stdout
    parsed = tomllib.loads(result.stdout)  # comments do not break the TOML
    assert parsed["server"]["port"] == 8555 and parsed["model"]["n_ctx"] == 2048


def test_cli_user_mistake_is_one_line_and_nonzero(tmp_path):
    path = write(tmp_path, "[server]\nport = 'x'\n")
    result = run_cli("--config", str(path), "serve")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "server.port" in lines[0] and "Traceback" not in result.stderr


def test_cli_check_reports_missing_model(tmp_path):
    result = run_cli("--config", str(write(tmp_path, "")), "check", env={"MODEL_PATH": str(tmp_path / "x.gguf")})
    assert result.returncode == 2
    assert "model.path" in result.stderr and "Traceback" not in result.stderr


def test_llamad_api_key_adds_to_the_keys_of_the_file(tmp_path):
    loaded = load_config(write(tmp_path, '[server]\napi_keys = ["file-key"]\n'), env={"LLAMAD_API_KEY": "env-key"})
    assert loaded.config.server.api_keys == ["file-key", "env-key"]
    assert "env LLAMAD_API_KEY" in loaded.source("server.api_keys")


def test_a_key_in_a_config_error_is_never_shown(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, '[server]\napi_keys = "sk-live-SECRET-123"\n'), env={})
    assert "SECRET" not in str(error.value) and "server.api_keys" in str(error.value)


def test_key_file_must_hold_a_key_and_be_readable(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    with pytest.raises(ConfigError, match="at least one key"):
        load_config(write(tmp_path, f'[server]\napi_key_file = "{empty}"\n'), env={})
    unreadable = tmp_path / "bad-keys"
    unreadable.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(write(tmp_path, f'[server]\napi_key_file = "{unreadable}"\n'), env={})


def test_sampling_defaults_are_configurable_and_checked(tmp_path):
    from llamad.config import sampling_defaults

    loaded = load_config(write(tmp_path, "[sampling]\ntemperature = 0.0\ntop_k = 1\n"), env={})
    defaults = sampling_defaults(loaded.config)
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 1, 0.95)
    with pytest.raises(ConfigError, match=r"sampling\.temperature"):
        load_config(write(tmp_path, "[sampling]\ntemperature = 3.0\n"), env={})


@pytest.mark.parametrize(
    "toml, words",
    [
        ('[model]\nrope_scaling = "dynamic"\n', ["model.rope_scaling", "'linear'"]),
        ('[model]\nrope_scaling = "yarn"\n', ["model.rope_scale", "above 1"]),
        ('[model]\nrope_scale = 4.0\n', ["model.rope_scale", "0 unless"]),
        ('[model]\nrope_freq_base = -1.0\n', ["model.rope_freq_base"]),
    ],
)
def test_rope_scaling_settings_are_checked(tmp_path, toml, words):
    path = tmp_path / "llamad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    for word in words:
        assert word in str(caught.value)
    path.write_text('[model]\nrope_scaling = "yarn"\nrope_scale = 4.0\n')
    assert load_config(path, env={}).config.model.rope_scale == 4.0


def test_chat_template_kwargs_from_the_toml_the_environment_and_a_models_table(tmp_path):
    from llamad.models.catalog import build_catalog

    model = gguf(tmp_path, "glm.gguf")
    small = gguf(tmp_path, "small.gguf")
    config = write(tmp_path, f'[model]\npath = "{model}"\nchat_template_kwargs = {{clear_thinking = false}}\n')
    loaded = load_config(config, env={})
    assert loaded.config.model.chat_template_kwargs == {"clear_thinking": False}
    env = {"LLAMAD_MODEL_CHAT_TEMPLATE_KWARGS": '{"enable_thinking": false}'}
    assert load_config(config, env=env).config.model.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="LLAMAD_MODEL_CHAT_TEMPLATE_KWARGS must be a JSON object"):
        load_config(config, env={"LLAMAD_MODEL_CHAT_TEMPLATE_KWARGS": "enable_thinking=false"})
    with pytest.raises(ConfigError, match="model.chat_template_kwargs"):
        load_config(write(tmp_path, '[model]\nchat_template_kwargs = "clear_thinking=false"\n'), env={})
    tables = write(
        tmp_path,
        f'[models.glm]\npath = "{model}"\nchat_template_kwargs = {{clear_thinking = false}}\n'
        f'[models.small]\npath = "{small}"\n',
    )
    catalog = build_catalog(load_config(tables, env={}))
    assert catalog.models["glm"].config.model.chat_template_kwargs == {"clear_thinking": False}
    assert catalog.models["small"].config.model.chat_template_kwargs == {}
