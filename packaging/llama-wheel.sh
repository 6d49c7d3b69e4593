#!/usr/bin/env bash
# The one place where llama.cpp's compile flags are chosen, for every build of llamad:
# `make run` / `make test` (target host), `make deb` (host, or portable with PORTABLE=1)
# and the Jetson build (jetson6, jetson5).
#
#   packaging/llama-wheel.sh flags TARGET            print the flags, one VAR=value a line
#   packaging/llama-wheel.sh build TARGET [PYTHON]   build the wheel once per set of flags and
#                                                    print its path
#   packaging/llama-wheel.sh dir TARGET              print the cache folder for TARGET's flags
#                                                    (rm -rf it to force a rebuild)
#
# Why the flags:
# - x86-64, every target: -mno-amx-tile -mno-amx-int8 -mno-amx-bf16. On a CPU with AMX,
#   GGML_NATIVE's -march=native turns on ggml's AMX kernels, and llama.cpp 0.3.36 asks the
#   kernel for the AMX tile-data permission on the main thread only: the first decode on a
#   worker thread dies with SIGILL (`tilezero`). Explicit -mno-* flags win over -march.
# - host: GGML_NATIVE=ON, the fastest build for the machine it is built on.
# - portable: GGML_NATIVE=OFF, a release that runs on any CPU of the architecture.
# - jetson6 / jetson5: CUDA for Orin (sm_87) / Xavier and Orin (sm_72, sm_87).
#
# Wheels go to $LLAMAD_WHEEL_CACHE (default ~/.cache/llamad/wheels), one folder per set of
# flags. pip's own wheel cache keys llama-cpp-python by version only, so it would hand back
# a wheel built with other flags (or without the AMX fix); it is never used for this build.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
version="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$root/pyproject.toml" | head -n1)"
[[ -n "$version" ]] || { echo "llama-wheel: no llama-cpp-python==X pin in pyproject.toml" >&2; exit 2; }

flags() {
    local target="$1" cmake_args cflags=""
    case "$target" in
        host)     cmake_args="-DGGML_NATIVE=ON" ;;
        portable) cmake_args="-DGGML_NATIVE=OFF" ;;
        jetson6)  cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" ;;
        jetson5)  cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=72;87" ;;
        *) echo "llama-wheel: unknown target '$target' (host, portable, jetson6, jetson5)" >&2; exit 2 ;;
    esac
    if [[ "$(uname -m)" == x86_64 ]]; then
        cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
    # Extra flags for a one-off build (e.g. -DGGML_CUDA=on on a desktop GPU) go last.
    [[ -n "${LLAMAD_CMAKE_ARGS:-}" ]] && cmake_args="$cmake_args $LLAMAD_CMAKE_ARGS"
    echo "CMAKE_ARGS=$cmake_args"
    echo "CFLAGS=$cflags"
    echo "CXXFLAGS=$cflags"
}

cache_dir() {
    local target="$1" spec key
    spec="$(flags "$target")"
    key="$(printf '%s\n%s\n%s\n' "$version" "$(uname -m)" "$spec" | sha256sum | cut -c1-12)"
    echo "${LLAMAD_WHEEL_CACHE:-$HOME/.cache/llamad/wheels}/llama-cpp-python-$version-$target-$key"
}

build() {
    local target="$1" python="${2:-python3}"
    local spec dir wheel
    spec="$(flags "$target")"
    dir="$(cache_dir "$target")"
    wheel="$(ls "$dir"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        mkdir -p "$dir"
        echo "llama-wheel: compiling llama-cpp-python $version for '$target' (about 9 minutes on 2 cores):" >&2
        sed 's/^/    /' <<<"$spec" >&2
        (
            while IFS= read -r line; do export "${line?}"; done <<<"$spec"
            if [[ "$target" == jetson* ]]; then
                export PATH="/usr/local/cuda/bin:$PATH" CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
            fi
            "$python" -m pip wheel --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python \
                "llama-cpp-python==$version" -w "$dir.tmp" >&2
        )
        mv "$dir.tmp"/llama_cpp_python-*.whl "$dir"/ && rm -rf "$dir.tmp"
        printf '%s\n' "$spec" >"$dir/FLAGS"
        wheel="$(ls "$dir"/llama_cpp_python-"$version"-*.whl | head -n1)"
    fi
    echo "$wheel"
}

case "${1:-}" in
    flags) flags "${2:-host}" ;;
    build) build "${2:-host}" "${3:-python3}" ;;
    dir) cache_dir "${2:-host}" ;;
    *) echo "usage: $0 flags|build|dir [host|portable|jetson6|jetson5] [PYTHON]" >&2; exit 2 ;;
esac
