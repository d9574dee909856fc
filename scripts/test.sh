#!/usr/bin/env bash
# Every check CI runs: formatting, lints, the Rust tests (real ONNX Runtime, real
# bundle, real server on loopback), the Python tests of models/, the HTTP contract,
# and the deployment checks (linters, manifests, the image's runtime layout).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"

echo "== cargo fmt";    cargo fmt --all -- --check
echo "== cargo clippy"; cargo clippy --all-targets --locked -- -D warnings
# The GPU build compiles here too (ONNX Runtime is loaded at run time, no CUDA needed).
echo "== cargo clippy (cuda)"; cargo clippy --all-targets --locked --features cuda -- -D warnings
echo "== cargo test";   cargo test --locked
echo "== api contract"; scripts/api-contract.sh
echo "== soak (short)"; LADIC_BIN="${LADIC_BIN:-target/debug/ladic-serve}" scripts/soak.sh --ci
echo "== fuzz";         scripts/fuzz.sh 30
# The sanitizer build of the fuzz targets is over a gigabyte and nothing after needs it.
if [[ -n ${LADIC_TEST_FREE_DISK:-} ]]; then rm -rf fuzz/target; fi
echo "== openapi";      python3 -m openapi_spec_validator openapi.yaml
echo "== ruff";         (cd models && ruff check .)
echo "== pytest";       (cd models && python3 -m pytest -q -p no:warnings)
echo "== browser";      scripts/browser-test.sh
echo "== deploy";       scripts/check-deploy.sh --binary target/debug/ladic-serve
