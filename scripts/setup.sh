#!/usr/bin/env bash
# One-time set-up of a fresh machine: the Python packages of models/ (PyTorch, ONNX,
# ONNX Runtime, evaluation), promtool for the metrics test, and the ONNX Runtime
# library the service loads.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! python3 -c "import ladic, torch, onnxruntime, pytest, ruff, openapi_spec_validator" \
    >/dev/null 2>&1; then
  # No pip cache: PyTorch's wheels take gigabytes, and a cached copy would double that.
  python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir -e 'models[dev]'
fi
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [[ $(id -u) == 0 ]]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
scripts/fetch-onnxruntime.sh
