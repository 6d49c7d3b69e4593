#!/usr/bin/env bash
# Builds the llamad .deb for the host architecture into packaging/out/.
#
#   packaging/build-deb.sh                 host build (reuses pip's cached llama-cpp-python wheel)
#   PORTABLE=1 packaging/build-deb.sh      release build: llama.cpp compiled with GGML_NATIVE=OFF,
#                                          so it runs on any CPU of the architecture
#   JETSON=6 packaging/build-deb.sh        on a Jetson (JetPack 6): CUDA for Orin (sm_87)
#   JETSON=5 packaging/build-deb.sh        on a Jetson (JetPack 5): CUDA for Xavier and Orin
#   DEB_COMPRESS="-Zgzip -z1" ...          faster, larger package (the tests use this)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/packaging/out"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -n1)"
src="$out/src/llamad-$version"

missing=()
for tool in dpkg-buildpackage dh dh_virtualenv; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=("python3-venv")
if ((${#missing[@]})); then
    echo "build-deb: missing ${missing[*]}; install with:" >&2
    echo "  apt-get install debhelper dh-virtualenv python3-venv" >&2
    exit 1
fi

pip_args=()
case "${JETSON:-}" in
    "") ;;
    6) export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87}"
       export LLAMAD_CUDA_DEPENDS="${LLAMAD_CUDA_DEPENDS:-cuda-cudart-12-6 | cuda-cudart-12-2, libcublas-12-6 | libcublas-12-2}" ;;
    5) export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=72;87}"
       export LLAMAD_CUDA_DEPENDS="${LLAMAD_CUDA_DEPENDS:-cuda-cudart-11-4, libcublas-11-4}" ;;
    *) echo "build-deb: JETSON must be 5 or 6 (the JetPack major version)" >&2; exit 2 ;;
esac
if [[ -n "${JETSON:-}" ]]; then
    # nvcc is not on PATH by default on JetPack.
    export PATH="/usr/local/cuda/bin:$PATH"
    export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
fi
if [[ -n "${PORTABLE:-}" ]]; then
    export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_NATIVE=OFF"
fi
if [[ -n "${CMAKE_ARGS:-}" ]]; then
    # pip's wheel cache ignores CMAKE_ARGS: a cached CPU wheel would silently be reused.
    pip_args+=(--no-binary=llama-cpp-python --no-cache-dir)
    echo "build-deb: compiling llama.cpp with CMAKE_ARGS=$CMAKE_ARGS (takes a while)"
fi
export LLAMAD_PIP_ARGS="${pip_args[*]:-}"
export LLAMAD_DEB_COMPRESS="${DEB_COMPRESS:--Zxz}"

rm -rf "$out/src"
mkdir -p "$src"
# The checkout as git sees it (tracked and new files, nothing ignored such as .venv).
(cd "$root" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$root" && xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"' ) \
    | (cd "$root" && tar -cf - -T -) | tar -xf - -C "$src"
rm -rf "$src/debian"
cp -r "$root/packaging/debian" "$src/debian"
cp "$root/etc/llamad.service" "$src/debian/llamad.service"

echo "build-deb: building llamad $version for $(dpkg --print-architecture) in $src"
(cd "$src" && dpkg-buildpackage -us -uc -b --no-sign)
deb="$(ls -t "$out"/src/llamad_"$version"-*_"$(dpkg --print-architecture)".deb | head -n1)"
mv "$out"/src/llamad_"$version"-* "$out"/ 2>/dev/null || true
echo "build-deb: wrote $out/$(basename "$deb")"
