"""llama.cpp's compile flags (packaging/llama-wheel.sh, README "Build flags"): AMX stays off
on x86-64, every build takes its flags from that one script, and the installed library
holds no AMX instruction.

Why: on a CPU with AMX, -march=native turns on ggml's AMX kernels, and llama.cpp 0.3.36 asks
for the AMX tile permission on the main thread only, so the first decode dies with SIGILL."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from must_run import require_tools

ROOT = Path(__file__).resolve().parent.parent
WHEEL_SCRIPT = ROOT / "packaging" / "llama-wheel.sh"
BUILD_DEB = ROOT / "packaging" / "build-deb.sh"
TARGETS = ["host", "portable", "jetson6", "jetson5"]
AMX_MACROS = ("__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__")
# Every AMX instruction: tile configuration, loads/stores, and the dot products (tdpb*).
AMX_INSTRUCTION = re.compile(r"\s(ldtilecfg|sttilecfg|tilerelease|tilezero|tileloadd\w*|tilestored|tdp\w+)\b")
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AMX is x86-64 only")


def flags(target: str, **env: str) -> dict[str, str]:
    result = subprocess.run(
        [str(WHEEL_SCRIPT), "flags", target],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=True,
    )
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def amx_macros(compiler: str, language: str, extra_flags: str) -> list[str]:
    """The AMX feature macros the compiler defines for a Sapphire Rapids CPU (which has AMX,
    as -march=native gives on one) plus `extra_flags`."""
    result = subprocess.run(
        [compiler, "-march=sapphirerapids", *extra_flags.split(), "-dM", "-E", "-x", language, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [macro for macro in AMX_MACROS if re.search(rf"^#define {macro} ", result.stdout, re.M)]


@x86_only
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_turns_amx_off(target):
    chosen = flags(target)
    for variable in ("CFLAGS", "CXXFLAGS"):
        assert set(chosen[variable].split()) >= {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"}, chosen


@x86_only
@pytest.mark.parametrize(("compiler", "language", "variable"), [("gcc", "c", "CFLAGS"), ("g++", "c++", "CXXFLAGS")])
def test_the_host_flags_are_what_turn_amx_off_on_an_amx_cpu(compiler, language, variable):
    require_tools(compiler, hint="llama.cpp is compiled with it: apt-get install build-essential")
    chosen = flags("host")[variable]
    # Without the flags an AMX CPU gets AMX code (this is what crashed)...
    assert amx_macros(compiler, language, "") == list(AMX_MACROS)
    # ...and with them it gets none.
    assert amx_macros(compiler, language, chosen) == [], chosen


def test_extra_cmake_flags_go_after_the_target_s_own():
    assert flags("host", LLAMAD_CMAKE_ARGS="-DGGML_CUDA=on")["CMAKE_ARGS"] == "-DGGML_NATIVE=ON -DGGML_CUDA=on"
    assert flags("portable")["CMAKE_ARGS"] == "-DGGML_NATIVE=OFF"


def test_each_target_has_its_own_wheel_cache_folder(tmp_path):
    env = {**os.environ, "LLAMAD_WHEEL_CACHE": str(tmp_path)}
    folders = {
        subprocess.run([str(WHEEL_SCRIPT), "dir", t], capture_output=True, text=True, env=env, check=True, timeout=30)
        .stdout.strip()
        for t in TARGETS
    }
    assert len(folders) == len(TARGETS) and all(f.startswith(str(tmp_path)) for f in folders)


# -- the .deb build takes the same wheel -----------------------------------------------------


def _fake_tool(directory: Path, name: str, body: str = "exit 0") -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _stand_in_build(tmp_path: Path, **build_env: str) -> dict[str, str]:
    """An environment where build-deb.sh runs for real up to dpkg-buildpackage, which is a
    stand-in that records its environment in tmp_path/dpkg-buildpackage.env."""
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is not installed: not a Debian system, no .deb build")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("dh", "dh_virtualenv"):
        _fake_tool(tools, tool)
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    seen = tmp_path / "dpkg-buildpackage.env"
    _fake_tool(tools, "dpkg-buildpackage", f'env > "{seen}"\ntouch ../llamad_0.1.0-1_{arch}.deb')
    env = {
        **os.environ,
        "PATH": f"{tools}:{os.environ['PATH']}",
        "LLAMAD_WHEEL_CACHE": str(tmp_path / "wheels"),
        "LLAMAD_DEB_OUT": str(tmp_path / "out"),
        **build_env,
    }
    env.pop("CMAKE_ARGS", None)
    return env


@pytest.mark.parametrize(
    ("build_env", "target"),
    [({}, "host"), ({"PORTABLE": "1"}, "portable"), ({"JETSON": "6"}, "jetson6"), ({"JETSON": "5"}, "jetson5")],
)
def test_the_deb_build_installs_the_wheel_llama_wheel_sh_built(tmp_path, build_env, target):
    """build-deb.sh hands dh_virtualenv exactly the wheel of its target (found in the wheel
    cache here), as the only llama-cpp-python pip may take: no compile with other flags, no
    wheel from pip's cache."""
    env = _stand_in_build(tmp_path, **build_env)
    wheel_dir = Path(
        subprocess.run([str(WHEEL_SCRIPT), "dir", target], capture_output=True, text=True, env=env, check=True).stdout.strip()
    )
    version = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    wheel_dir.mkdir(parents=True)
    (wheel_dir / f"llama_cpp_python-{version}-py3-none-linux_x86_64.whl").write_bytes(b"stand-in")
    # A builder "venv" already in place: the wheel is cached, so pip must never run.
    builder = tmp_path / "out" / "wheel-builder" / "bin"
    builder.mkdir(parents=True)
    _fake_tool(builder, "python", "echo 'pip must not run: the wheel is cached' >&2; exit 1")

    result = subprocess.run([str(BUILD_DEB)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    given = (tmp_path / "dpkg-buildpackage.env").read_text().splitlines()
    assert f"LLAMAD_PIP_ARGS=--find-links={wheel_dir} --only-binary=llama-cpp-python" in given
    assert not any(line.startswith("CMAKE_ARGS=") for line in given)  # nothing to compile llama.cpp with


def test_the_deb_build_refuses_flags_of_its_own(tmp_path):
    env = {**_stand_in_build(tmp_path), "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    result = subprocess.run([str(BUILD_DEB)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and "LLAMAD_CMAKE_ARGS" in result.stderr, result.stderr
    assert not (tmp_path / "dpkg-buildpackage.env").exists()


# -- the installed library ------------------------------------------------------------------


def amx_instructions(library: Path) -> list[str]:
    """AMX instructions in `library`'s code (objdump -d), one line each."""
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, timeout=300)
    assert dump.returncode == 0, dump.stderr[-2000:]
    return [line.strip() for line in dump.stdout.splitlines() if AMX_INSTRUCTION.search(line)]


@x86_only
def test_the_amx_finder_finds_amx_code(tmp_path):
    """Guards the test below: an object that does use AMX is caught."""
    require_tools("gcc", "objdump", hint="apt-get install build-essential binutils")
    source = tmp_path / "amx.c"
    source.write_text("#include <immintrin.h>\nvoid clear(void) { _tile_zero(0); _tile_release(); }\n")
    subprocess.run(["gcc", "-O1", "-mamx-tile", "-c", str(source), "-o", str(tmp_path / "amx.o")], check=True, timeout=60)
    found = amx_instructions(tmp_path / "amx.o")
    assert any("tilezero" in line for line in found), found
    subprocess.run(["gcc", "-O1", "-c", "-x", "c", "/dev/null", "-o", str(tmp_path / "empty.o")], check=True, timeout=60)
    assert amx_instructions(tmp_path / "empty.o") == []


@pytest.mark.real
@x86_only
def test_the_installed_llama_cpp_has_no_amx_instruction():
    require_tools("objdump", hint="apt-get install binutils")
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin, "llama_cpp is not installed"
    libraries = sorted((Path(spec.origin).parent / "lib").glob("libggml-cpu*.so"))
    assert libraries, f"no libggml-cpu*.so in {Path(spec.origin).parent / 'lib'}"
    for library in libraries:
        found = amx_instructions(library)
        assert not found, f"{library.name} holds AMX code (SIGILL on an AMX CPU): {found[:5]}"
