#!/usr/bin/env bash
# Builds the llamad .deb for the host architecture into packaging/out/.
#
#   packaging/build-deb.sh                 llama.cpp for this machine (target host)
#   PORTABLE=1 packaging/build-deb.sh      release build for any CPU of the architecture (portable)
#   JETSON=6 packaging/build-deb.sh        on a Jetson (JetPack 6): CUDA for Orin (jetson6)
#   JETSON=5 packaging/build-deb.sh        on a Jetson (JetPack 5): CUDA for Xavier and Orin (jetson5)
#   DEB_COMPRESS="-Zgzip -z1" ...          faster, larger package (the tests use this)
#
# llama.cpp's compile flags are not chosen here: packaging/llama-wheel.sh builds (or finds in
# its cache) the llama-cpp-python wheel for the target, and dh_virtualenv installs exactly
# that wheel. It never compiles llama.cpp itself and never takes a wheel from pip's cache.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${LLAMAD_DEB_OUT:-$root/packaging/out}"
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

case "${JETSON:-}" in
    "") target="$([[ -n "${PORTABLE:-}" ]] && echo portable || echo host)" ;;
    6) target=jetson6
       export LLAMAD_CUDA_DEPENDS="${LLAMAD_CUDA_DEPENDS:-cuda-cudart-12-6 | cuda-cudart-12-2, libcublas-12-6 | libcublas-12-2}" ;;
    5) target=jetson5
       export LLAMAD_CUDA_DEPENDS="${LLAMAD_CUDA_DEPENDS:-cuda-cudart-11-4, libcublas-11-4}" ;;
    *) echo "build-deb: JETSON must be 5 or 6 (the JetPack major version)" >&2; exit 2 ;;
esac
if [[ -n "${JETSON:-}" && -n "${PORTABLE:-}" ]]; then
    echo "build-deb: PORTABLE=1 and JETSON=$JETSON are two different builds; choose one" >&2
    exit 2
fi
if [[ -n "${CMAKE_ARGS:-}" ]]; then
    echo "build-deb: CMAKE_ARGS is not read here: llama.cpp's flags come from packaging/llama-wheel.sh" >&2
    echo "  (target $target; see README 'Build flags'). Put extra CMake flags in LLAMAD_CMAKE_ARGS." >&2
    exit 2
fi

# pip for the wheel build: a venv of the Python the package is built for (Debian's own
# python3 may lack pip).
builder="$out/wheel-builder"
[[ -x "$builder/bin/python" ]] || /usr/bin/python3 -m venv "$builder"
echo "build-deb: llama-cpp-python for target '$target':"
"$root/packaging/llama-wheel.sh" flags "$target" | sed 's/^/    /'
wheel="$("$root/packaging/llama-wheel.sh" build "$target" "$builder/bin/python")"
echo "build-deb: using $wheel"
# The only llama-cpp-python pip may install is that wheel (PyPI has only the source).
export LLAMAD_PIP_ARGS="--find-links=$(dirname "$wheel") --only-binary=llama-cpp-python"
unset CMAKE_ARGS
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
