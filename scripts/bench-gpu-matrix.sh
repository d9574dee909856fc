#!/usr/bin/env bash
# Several service-only passes of scripts/bench-gpu.sh back to back on one GPU host, one
# per server or bundle variant, within one time budget, and one table comparing them:
# the variants are measured side by side on the same card in the same run.
#
#   scripts/bench-gpu-matrix.sh --binary PATH [--out DIR] [--budget SECONDS]
#                               [--passes "graph plain ..."] [--device cuda|cpu]
#                               [--config base|tiny|micro] [--quick]
#   scripts/bench-gpu-matrix.sh --export-only [--jobs N] [--out DIR] [--passes ...]
#                               [--config ...]
#
#   --binary PATH   a release build of ladic-serve (`--features cuda` for --device cuda)
#   --out DIR       scratch directory for the bundles, shared by the passes (default
#                   /tmp/ladic-gpu-bench); results go to DIR/matrix, one folder per pass
#                   plus matrix.md and matrix.json. When $OUT is set (a GPU host that
#                   brings back only a few files from it), $OUT gets matrix.md,
#                   matrix.json and matrix-passes.tar.gz (everything), after every pass,
#                   so that a run stopped by its host's time limit still returns a table
#   --budget S      whole run, in seconds (default 540); a pass starts only when at least
#                   PASS_MIN seconds (default 75) are left, and gets what is left
#   --passes LIST   in this order (default "graph loop plain fused-loop half-loop
#                   fused-loop-fp16 kv16-loop all-loop fused-graph workers2 fused"; the
#                   last ones are skipped when the budget runs out):
#                     plain        the default server
#                     graph        --cuda-graph true
#                     loop         --cuda-graph true --device-loop true
#                     fused        bundle exported with --attention fused
#                     fused-graph  fused and graph
#                     fused-loop   fused and loop
#                     half-loop    fused-loop on the bundle exported with
#                                  --unconditional-half (the null K/V attended once)
#                     fused-loop-fp16  fused-loop on the bundle converted to fp16
#                     kv16-loop    fused-loop-fp16 with the K/V in fp16 too
#                                  (--kv-precision fp16: the same captions expected)
#                     all-loop     kv16-loop on an --unconditional-half bundle
#                     workers2     --workers 2 (two batches in flight, one per worker)
#   --device, --config, --quick   passed to every pass (see scripts/bench-gpu.sh)
#   --export-only   only export the bundles of the passes into DIR (each once; no binary,
#                   ONNX Runtime or GPU needed), so that the timed run finds them ready;
#                   --jobs N exports N at a time (default 1; each full-size export takes
#                   a few GB of memory)
#
# Every pass runs with --no-reference: the PyTorch reference needs a full pass of
# scripts/bench-gpu.sh. Environment: BENCH_TP_SECONDS (default 10 here) and
# BENCH_CONCURRENCY (default "64 128" here) are passed on; so are the others that
# scripts/bench-gpu.sh reads.
set -euo pipefail
CALLER=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS=0

usage() { sed -n '6,38p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
log() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

BINARY="" WORK=/tmp/ladic-gpu-bench BUDGET=540 EXPORT_ONLY=0 JOBS=1
PASSES="graph loop plain fused-loop half-loop fused-loop-fp16 kv16-loop all-loop fused-graph workers2 fused"
COMMON=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --binary) BINARY=${2:?}; shift 2 ;;
    --out) WORK=${2:?}; shift 2 ;;
    --budget) BUDGET=${2:?}; shift 2 ;;
    --passes) PASSES=${2:?}; shift 2 ;;
    --device|--config) COMMON+=("$1" "${2:?}"); shift 2 ;;
    --quick) COMMON+=(--quick); shift ;;
    --export-only) EXPORT_ONLY=1; shift ;;
    --jobs) JOBS=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n $BINARY || $EXPORT_ONLY == 1 ]] || { echo "--binary is required" >&2; usage; }
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "--budget takes whole seconds" >&2; exit 2; }
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "--jobs takes a positive whole number" >&2; exit 2; }
[[ -z $BINARY || $BINARY == /* ]] || BINARY=$CALLER/$BINARY
[[ $WORK == /* ]] || WORK=$CALLER/$WORK
WORK=$(realpath -m "$WORK")
RES=$WORK/matrix
FINAL=""
[[ -z ${OUT:-} ]] || FINAL=$(cd "$CALLER" && realpath -m "$OUT")
# The bundles (1.6 GB each at full size) must not land in the folder that is carried back.
if [[ -n $FINAL && $WORK/ == "$FINAL"/* ]]; then
  echo "--out $WORK is inside \$OUT ($FINAL): give a scratch directory outside it" >&2
  exit 2
fi
mkdir -p "$WORK" "$RES"
PASS_MIN=${PASS_MIN:-75}
export BENCH_TP_SECONDS=${BENCH_TP_SECONDS:-10}
export BENCH_CONCURRENCY=${BENCH_CONCURRENCY:-"64 128"}

# The flags of each pass: bench-gpu.sh arguments, then extra `serve` flags.
pass_flags() {
  case $1 in
    plain) echo "--attention unfused|" ;;
    graph) echo "--attention unfused|--cuda-graph true" ;;
    fused) echo "--attention fused|" ;;
    fused-graph) echo "--attention fused|--cuda-graph true" ;;
    loop) echo "--attention unfused|--cuda-graph true --device-loop true" ;;
    fused-loop) echo "--attention fused|--cuda-graph true --device-loop true" ;;
    half-loop) echo "--attention fused --unconditional-half|--cuda-graph true --device-loop true" ;;
    kv16-loop) echo "--attention fused --precision fp16 --kv-precision fp16|--cuda-graph true --device-loop true" ;;
    all-loop) echo "--attention fused --unconditional-half --precision fp16 --kv-precision fp16|--cuda-graph true --device-loop true" ;;
    fused-loop-fp16) echo "--attention fused --precision fp16|--cuda-graph true --device-loop true" ;;
    workers2) echo "--attention unfused|--workers 2" ;;
    *) return 1 ;;
  esac
}
for pass in $PASSES; do
  pass_flags "$pass" >/dev/null || { echo "unknown pass: $pass" >&2; usage; }
done

if [[ $EXPORT_ONLY == 1 ]]; then
  # One export per distinct bundle (bench-gpu.sh names it from these flags), JOBS at once.
  declare -A EXPORTING=()
  for pass in $PASSES; do
    IFS='|' read -r bench_args _ <<<"$(pass_flags "$pass")"
    [[ -z ${EXPORTING[$bench_args]:-} ]] || continue
    EXPORTING[$bench_args]=$pass
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    log "== export for $pass: bench-gpu.sh --export-only $bench_args"
    dir=$RES/export-$pass
    mkdir -p "$dir" && rm -f "$dir/exit-status"
    # shellcheck disable=SC2086  # the flags are words
    ( set +e
      BENCH_RESULTS=$dir scripts/bench-gpu.sh --export-only --out "$WORK" ${COMMON[@]+"${COMMON[@]}"} \
        $bench_args >"$dir/export-pass.log" 2>&1
      echo $? >"$dir/exit-status" ) &
  done
  wait
  failed=0
  for pass in "${EXPORTING[@]}"; do
    status=$(cat "$RES/export-$pass/exit-status" 2>/dev/null || echo "?")
    [[ $status == 0 ]] || failed=1
    log "   $pass: exit $status; $(tail -n 1 "$RES/export-$pass/export-pass.log")"
  done
  [[ -z $FINAL ]] || scripts/pack-results.sh "$RES" "$FINAL/exports.tar.gz" \
    || log "warning: packing the export logs into $FINAL failed"
  (( failed == 0 )) || { log "an export failed (logs: $RES/export-*/export-pass.log)"; exit 1; }
  log "bundles ready in $WORK"
  exit 0
fi

# matrix.md and matrix.json from the passes done so far (printed), and into $OUT.
summarize() {
  python3 - "$RES" "${DONE[@]}" <<'PY'
import json, pathlib, sys

res = pathlib.Path(sys.argv[1])
rows, table = [], {}  # rows: (pass, its cells but the caption comparison; None: failed)
for name in sys.argv[2:]:
    path = res / name / "results.json"
    if not path.is_file():
        rows.append((name, None))
        continue
    r = json.loads(path.read_text())
    lat = {k: v for k, v in (r.get("latency") or {}).items() if v}  # a failed step is null
    tp = {k: v for k, v in (r.get("throughput") or {}).items() if v}
    ms = lambda k: f"{lat[k]['p50_s'] * 1000:.1f} ms" if k in lat else "n/a"
    best = max(tp.items(), key=lambda kv: kv[1]["captions_per_second"], default=None)
    tput = f"{best[1]['captions_per_second']:.1f}/s (c {best[0]})" if best else "n/a"
    table[name] = {
        "card": r.get("card"), "server_args": r.get("server", {}).get("args"),
        "providers": r.get("server", {}).get("providers"),
        "latency_p50_ms": {k: v["p50_s"] * 1000 for k, v in lat.items()},
        "throughput": {k: v["captions_per_second"] for k, v in tp.items()},
        "captions": {k: v.get("captions", []) for k, v in lat.items()},
        "batch_candidates": [c for x in (r.get("batch") or {}).get("candidates", []) for c in x],
    }
    server = r.get("server", {})
    rows.append((name, [ms("5"), ms("34"), tput,
                        server.get("providers", ""), f"`{server.get('args', '')}`"]))

# The captions of the latency requests (same seeds in every pass) against the pass
# that differs only in the flag under test: equal captions say the variant computes
# what its baseline does (random weights: a tiny numerical difference can still flip a
# word now and then; a broken copy or binding flips nearly all of them).
BASELINE = {"graph": "plain", "workers2": "plain", "fused-graph": "fused",
            "loop": "graph", "fused-loop": "fused-graph", "fused-loop-fp16": "fused-loop",
            "half-loop": "fused-loop", "kv16-loop": "fused-loop-fp16", "all-loop": "kv16-loop"}
def same(name):
    base = BASELINE.get(name)
    if base not in table or name not in table:
        return ""
    parts = []
    for steps, mine in sorted(table[name]["captions"].items(), key=lambda kv: int(kv[0])):
        theirs = table[base]["captions"].get(steps, [])
        n = min(len(mine), len(theirs))
        if n:
            equal = sum(a == b for a, b in zip(mine, theirs))
            parts.append(f"{equal}/{n} at {steps} steps")
    mine, theirs = table[name]["batch_candidates"], table[base]["batch_candidates"]
    if mine and theirs:
        equal = sum(a == b for a, b in zip(mine, theirs))
        parts.append(f"{equal}/{min(len(mine), len(theirs))} batch candidates")
    return f"{base}: " + ", ".join(parts) if parts else ""
def row(name, cells):
    if cells is None:
        return f"| {name} | failed (see {name}/matrix-pass.log) | | | | | |"
    return "| " + " | ".join([name, *cells[:3], same(name), *cells[3:]]) + " |"
card = next((v["card"] for v in table.values() if v.get("card")), "unknown card")
text = "\n".join([
    f"### Variants side by side on {card}",
    "",
    "| pass | batch-1 p50, 5 steps | batch-1 p50, 34 steps | best throughput, 34 steps | same captions as | providers | serve flags |",
    "|---|---|---|---|---|---|---|",
    *(row(name, cells) for name, cells in rows),
    "",
    "Each pass: scripts/bench-gpu.sh --no-reference (its own summary.md in the pass's folder).",
])
(res / "matrix.md").write_text(text + "\n")
(res / "matrix.json").write_text(json.dumps(table, indent=1) + "\n")
print(text)
PY
  [[ -z $FINAL ]] || scripts/pack-results.sh "$RES" "$FINAL/matrix-passes.tar.gz" \
    matrix.md matrix.json || log "warning: packing the results into $FINAL failed"
}

DONE=()
for pass in $PASSES; do
  left=$((BUDGET - SECONDS))
  if (( BUDGET > 0 && left < PASS_MIN )); then
    log "== $pass: skipped, $left s left of the budget"
    continue
  fi
  IFS='|' read -r bench_args server_args <<<"$(pass_flags "$pass")"
  log "== $pass: bench-gpu.sh $bench_args, serve $server_args ($left s left)"
  mkdir -p "$RES/$pass"
  # shellcheck disable=SC2086  # the flags are words
  if BENCH_RESULTS=$RES/$pass BENCH_SERVER_ARGS="${BENCH_SERVER_ARGS:-} $server_args" \
      scripts/bench-gpu.sh --binary "$BINARY" --out "$WORK" --no-reference \
      --budget "$((BUDGET > 0 ? left - 15 : 0))" ${COMMON[@]+"${COMMON[@]}"} $bench_args \
      >"$RES/$pass/matrix-pass.log" 2>&1; then
    log "   $pass done"
  else
    log "   $pass failed (exit $?): the end of its log:"
    tail -n 15 "$RES/$pass/matrix-pass.log" | sed 's/^/     /'
  fi
  DONE+=("$pass")
  # A summary that fails (a pass killed mid-write) must not stop the passes after it.
  summarize >/dev/null || log "warning: the summary after $pass failed"
done

summarize
log "results in $RES${FINAL:+ (packed into $FINAL)}"
