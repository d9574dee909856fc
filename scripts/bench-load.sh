#!/usr/bin/env bash
# The load benchmark (benches/load.rs): the release server on a loopback port in each
# batching mode (continuous, request, off) under closed-loop clients (1, 4, 16) and
# open-loop Poisson arrivals (25/50/100/200% of saturation), a 60 s 2x overload with
# health probes and RSS sampling, and the Python PyTorch reference sampler at batch 1.
# Prints the tables and writes them to benches/RESULTS.md. About 8 minutes; stops by
# itself.
#
#   scripts/bench-load.sh            # the full run
#   scripts/bench-load.sh --quick    # a smoke test (about 1.5 minutes); writes no results
#
# Any LOAD_* variable of benches/load.rs passes through, e.g.
#   LOAD_MODES=continuous LOAD_SERVER_ARGS="--intra-op-threads 1" scripts/bench-load.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"
[[ -f $ORT_DYLIB_PATH ]] || scripts/fetch-onnxruntime.sh
export LOAD_COMMAND="${LOAD_COMMAND:-scripts/bench-load.sh${*:+ $*}}"
if [[ ${1:-} == --quick ]]; then
  export LOAD_PHASE_SECS="${LOAD_PHASE_SECS:-2}" LOAD_WARMUP_SECS="${LOAD_WARMUP_SECS:-0.5}"
  export LOAD_OVERLOAD_SECS="${LOAD_OVERLOAD_SECS:-4}" LOAD_REF_REPEATS="${LOAD_REF_REPEATS:-3}"
  export LOAD_RESULTS="${LOAD_RESULTS:--}"
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--quick]" >&2
  exit 2
fi
exec cargo bench --locked --bench load
