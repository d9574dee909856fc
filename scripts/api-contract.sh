#!/usr/bin/env bash
# API contract test: schemathesis generates requests for every operation of
# openapi.yaml, sends them to a real server (the debug binary on a loopback port, the
# default bundle) and checks that no response is a 5xx, that every status code is one
# the spec lists, and that every body and Content-Type matches the spec.
#
#   scripts/api-contract.sh            # bounded: about 2 minutes
#   MAX_EXAMPLES=200 MAX_TIME=900 scripts/api-contract.sh
#
# schemathesis lives in its own virtual environment (LADIC_SCHEMATHESIS_VENV, default
# ~/.cache/ladic-schemathesis), created on first use, so its dependencies stay away
# from models/' packages. The server's log goes to target/api-contract/server.log and
# schemathesis' reports (JUnit, and a pytest file reproducing any failure) next to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"

VENV="${LADIC_SCHEMATHESIS_VENV:-$HOME/.cache/ladic-schemathesis}"
SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
MAX_EXAMPLES="${MAX_EXAMPLES:-25}"
MAX_TIME="${MAX_TIME:-120}"
BIN="${LADIC_BIN:-target/debug/ladic-serve}"
OUT=target/api-contract

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
# Build (a no-op when up to date) unless a binary was named.
[[ -n ${LADIC_BIN:-} ]] || cargo build --locked

mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
"$BIN" serve --bind "127.0.0.1:$PORT" --intra-op-threads 1 >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

for _ in $(seq 1 240); do
  if curl -sf "$BASE/health/ready" >/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "the server exited; its log:" >&2; cat "$OUT/server.log" >&2; exit 1
  fi
  sleep 0.5
done
curl -sf "$BASE/health/ready" >/dev/null || { echo "not ready after 120 s" >&2; exit 1; }

# Run from $OUT: schemathesis keeps its cache (it replays earlier failures first) in
# ./.schemathesis. One worker: with two, hypothesis (under Python 3.11) hit an
# internal AST race.
ROOT=$PWD
status=0
(
  cd "$OUT"
  "$VENV/bin/schemathesis" --config-file "$ROOT/scripts/schemathesis.toml" \
    run "$ROOT/openapi.yaml" \
    --url "$BASE" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --request-timeout 60 \
    --seed 1 \
    --generation-database none \
    --suppress-health-check too_slow,filter_too_much,data_too_large \
    --workers 1 \
    --no-color \
    --report junit,pytest \
    --report-dir .
) || status=$?

if ! kill -0 "$SERVER" 2>/dev/null; then
  echo "the server died during the run; its log:" >&2; tail -50 "$OUT/server.log" >&2; exit 1
fi
if grep -q "panicked" "$OUT/server.log"; then
  echo "the server panicked:" >&2; grep -A5 "panicked" "$OUT/server.log" >&2; exit 1
fi
exit "$status"
