#!/usr/bin/env bash
# Puts the ONNX Runtime shared library at .ort/lib/libonnxruntime.so, taken from the
# official PyPI wheel, so no Python install of onnxruntime (and no other download
# source) is needed. ladic-serve loads it at run time.
#
#   scripts/fetch-onnxruntime.sh          # CPU build (onnxruntime)
#   scripts/fetch-onnxruntime.sh --gpu    # CUDA build (onnxruntime-gpu)
#
# ORT_VERSION overrides the version; DEST overrides the target directory.
set -euo pipefail

version="${ORT_VERSION:-1.31.1}"
package="onnxruntime"
if [[ "${1:-}" == "--gpu" ]]; then
  package="onnxruntime-gpu"
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${DEST:-$root/.ort/lib}"

if [[ -f "$dest/libonnxruntime.so" && -f "$dest/.version" && "$(cat "$dest/.version")" == "$package==$version" ]]; then
  echo "ONNX Runtime $package==$version already at $dest"
  exit 0
fi

pip_cmd=()
if command -v pip3 >/dev/null 2>&1; then pip_cmd=(pip3)
elif command -v python3 >/dev/null 2>&1; then pip_cmd=(python3 -m pip)
else
  echo "error: pip is needed to download the $package wheel (apt-get install python3-pip)" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${pip_cmd[@]}" download --quiet --no-deps --only-binary=:all: \
  --dest "$tmp" "$package==$version"
wheel="$(ls "$tmp"/*.whl)"

mkdir -p "$tmp/x" "$dest"
python3 - "$wheel" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in z.namelist():
        if "/capi/lib" in name and ".so" in name:
            z.extract(name, sys.argv[2])
PY
lib="$(find "$tmp/x" -name 'libonnxruntime.so*' -type f | head -n1)"
if [[ -z "$lib" ]]; then
  echo "error: no libonnxruntime.so in $wheel" >&2
  exit 1
fi
cp "$lib" "$dest/libonnxruntime.so"
# Execution provider plugins (CUDA, TensorRT, the shared bridge) sit beside it.
find "$tmp/x" -name 'libonnxruntime_providers_*.so' -type f -exec cp {} "$dest/" \;
echo "$package==$version" > "$dest/.version"
echo "ONNX Runtime $package==$version -> $dest/libonnxruntime.so"
