#!/usr/bin/env bash
# Overload and soak test of the release binary on a loopback port (docs/hardening.md).
#
#   scripts/soak.sh          # full: 60 s at 2x saturation, then 10 min at 50% load
#   scripts/soak.sh --ci     # short: 20 s at 2x saturation, then 60 s at 50% load
#
# 1. measure: the throughput at saturation, R captions/s (closed loop, 8 clients);
# 2. overload: open loop at 2R for OVERLOAD_SECONDS: only 200/429/503/504 allowed,
#    the server's RSS (sampled each second from /proc) under RSS_LIMIT_MB;
# 3. soak: open loop at R/2 for SOAK_SECONDS: only 200 allowed, RSS growth between
#    the first and the last fifth of the run under MAX_GROWTH_MB (noise allowance);
# 4. SIGTERM: the server must exit 0.
# Stops by itself; the server is killed on any exit. Reports (JSON) and the server log
# go to target/soak/.
#
# Environment: LADIC_BIN (default: target/release/ladic-serve, built first),
# OVERLOAD_SECONDS, SOAK_SECONDS, RSS_LIMIT_MB (default 1024), MAX_GROWTH_MB (default
# 32), QUERY (extra caption parameters, default none: the bundle's defaults),
# SERVER_ARGS (extra `serve` flags).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"

if [[ ${1:-} == --ci ]]; then
  OVERLOAD_SECONDS="${OVERLOAD_SECONDS:-20}"
  SOAK_SECONDS="${SOAK_SECONDS:-60}"
  MEASURE_SECONDS="${MEASURE_SECONDS:-10}"
else
  OVERLOAD_SECONDS="${OVERLOAD_SECONDS:-60}"
  SOAK_SECONDS="${SOAK_SECONDS:-600}"
  MEASURE_SECONDS="${MEASURE_SECONDS:-20}"
fi
RSS_LIMIT_MB="${RSS_LIMIT_MB:-1024}"
MAX_GROWTH_MB="${MAX_GROWTH_MB:-32}"
QUERY="${QUERY:-}"
BIN="${LADIC_BIN:-target/release/ladic-serve}"
OUT=target/soak
# Build (a no-op when up to date) unless a binary was named.
[[ -n ${LADIC_BIN:-} ]] || cargo build --release --locked
mkdir -p "$OUT"

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
# shellcheck disable=SC2086
"$BIN" serve --bind "127.0.0.1:$PORT" ${SERVER_ARGS:-} >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  curl -sf "$URL/health/ready" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
  sleep 0.5
done
curl -sf "$URL/health/ready" >/dev/null || { echo "not ready after 120 s" >&2; exit 1; }
rss() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$SERVER/status"; }
echo "== server pid $SERVER on $URL, idle RSS $(rss) MiB"

echo "== measure: saturation throughput (${MEASURE_SECONDS} s, 8 clients)"
python3 scripts/loadgen.py measure --url "$URL" --seconds "$MEASURE_SECONDS" \
  --concurrency 8 --query "$QUERY" | tee "$OUT/measure.json"
R=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["captions_per_second"])' "$OUT/measure.json")
OVER=$(python3 -c "print(round(2 * $R, 2))")
HALF=$(python3 -c "print(round(0.5 * $R, 2))")

echo "== overload: ${OVER}/s (2x) for ${OVERLOAD_SECONDS} s; RSS bound ${RSS_LIMIT_MB} MiB"
python3 scripts/loadgen.py run --url "$URL" --pid "$SERVER" --rate "$OVER" \
  --seconds "$OVERLOAD_SECONDS" --query "$QUERY" --allowed 200,429,503,504 \
  --rss-limit-mb "$RSS_LIMIT_MB" --json "$OUT/overload.json"

echo "== soak: ${HALF}/s (50%) for ${SOAK_SECONDS} s; growth allowance ${MAX_GROWTH_MB} MiB"
python3 scripts/loadgen.py run --url "$URL" --pid "$SERVER" --rate "$HALF" \
  --seconds "$SOAK_SECONDS" --query "$QUERY" --allowed 200 \
  --rss-limit-mb "$RSS_LIMIT_MB" --max-growth-mb "$MAX_GROWTH_MB" --json "$OUT/soak.json"

echo "== SIGTERM"
kill -TERM "$SERVER"
code=0
wait "$SERVER" || code=$?
trap - EXIT
if [[ $code != 0 ]]; then
  echo "the server exited $code after SIGTERM" >&2
  tail -20 "$OUT/server.log" >&2
  exit 1
fi
if grep -q panicked "$OUT/server.log"; then
  echo "the server panicked" >&2; exit 1
fi
echo "== ok (reports in $OUT/)"
