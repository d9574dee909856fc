#!/usr/bin/env bash
# The GPU benchmark (issue 8) in one command: the service and the PyTorch reference on
# the same device, with a random-weight bundle exported on the spot.
#
#   scripts/bench-gpu.sh --binary PATH [--out DIR] [--device cuda|cpu]
#                        [--config base|tiny|micro] [--quick] [--check-export]
#                        [--budget SECONDS] [--no-reference] [--attention fused|unfused]
#                        [--precision fp32|fp16|mixed] [--unconditional-half]
#                        [--kv-precision fp32|fp16] [--export-only]
#
#   --binary PATH   a release build of ladic-serve (`--features cuda` for --device cuda);
#                   not needed with --export-only
#   --out DIR       scratch directory for the bundle and logs (default /tmp/ladic-gpu-bench);
#                   the results go to DIR, or to BENCH_RESULTS when it is set. When $OUT
#                   is set (a GPU host that brings back only a few files from it), they
#                   go to DIR/results and, at the end, $OUT gets summary.md, results.json
#                   and bench-files.tar.gz (everything)
#   --device        cuda (default) or cpu
#   --config        bundle size: base (the full LaDiC architecture; default on cuda),
#                   tiny (default on cpu) or micro; random weights, seed 0, in the bundle
#                   and in the reference alike
#   --quick         shorter phases and smaller batches: a smoke test of the script (under
#                   a minute with --device cpu --config tiny on 2 cores)
#   --check-export  also run the exporter's ONNX Runtime check (needs onnxruntime in Python)
#   --budget S      skip the later throughput phases when the run would pass S seconds,
#                   and cut the export's and the start-up's time limits to what is left
#                   (at least 60 s; not with --export-only) (default 480; 0: never skip)
#   --no-reference  measure the service only (a second run on another bundle or with
#                   other server flags, next to a full run)
#   --attention A   export attention unfused (standard ONNX ops; default) or fused (one
#                   ONNX Runtime MultiHeadAttention node each; bundle-CONFIG-fused)
#   --precision P   the bundle's graphs in fp32 (default), fp16 or mixed (the exporter's
#                   --precision; bundle-CONFIG[-fused]-P); the reference is unchanged
#   --unconditional-half  export the denoiser with --unconditional-half (the second half
#                   of each call attends to the null K/V once; bundle-CONFIG[-fused]-half)
#   --kv-precision K  with --precision fp16: the image K/V between encoder and denoiser
#                   (and in the service's pool) in fp16 too (bundle-...-fp16-kv16)
#   --export-only   stop after (b): export the bundle into DIR and exit (needs neither
#                   the binary, nor ONNX Runtime, nor a GPU), so that a later run with
#                   the same flags and DIR finds it ready
#
# Steps: (a) probe the host and say which fallback is used for a missing Python package;
# (b) export the bundle (models/ladic/export.py; reused when already in DIR);
# (c) start `BINARY serve` on a loopback port and measure over HTTP: batch-1 latency
# (sequential requests) at steps=5 and steps=34, the captions of one /caption/batch
# request (8 images x 4 candidates: a larger bucket, for comparing variants), then
# closed-loop throughput at steps=34
# (scripts/loadgen.py measure) at several concurrencies; SIGTERM, exit status checked;
# (d) the PyTorch reference (models/ladic/bench_reference.py --loop torch) on the same
# device in fp32 (TF32 allowed on CUDA, as ONNX Runtime's CUDA provider does by default)
# and bf16 autocast: batch 1 at 5 and 34 steps, and a large batch at 34 steps;
# (e) a markdown summary with the ratios, plus every raw JSON and the server log.
#
# Needs: bash, coreutils, Python 3 with torch and numpy. On CUDA, ORT_DYLIB_PATH must
# name ONNX Runtime's CUDA build, with its provider libraries and the CUDA libraries on
# the library path. Environment: PYTHON (default python3), BENCH_SERVER_ARGS (extra
# `serve` flags), BENCH_MAX_BATCH_ROWS (default: 512, less where the denoiser's K/V input
# would pass 2^31 elements: 256 for base), BENCH_CONCURRENCY (default "32 R/4 R/2" for
# R rows, "8 32" with --quick), BENCH_TP_SECONDS (seconds per throughput phase;
# default 30, 4 with --quick), BENCH_REF_THREADS (torch threads of the reference;
# default: torch's own on cuda, 1 on cpu).
set -euo pipefail
CALLER=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SECONDS=0

usage() { sed -n '5,36p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { printf '[%4ds] ERROR: %s\n' "$SECONDS" "$*" >&2; exit 1; }
log() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

BINARY="" WORK=/tmp/ladic-gpu-bench DEVICE=cuda CONFIG="" QUICK=0 CHECK_EXPORT=0 BUDGET=480
REFERENCE=1 ATTENTION=unfused PRECISION=fp32 HALF=0 KV_PRECISION=fp32 EXPORT_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --binary) BINARY=${2:?}; shift 2 ;;
    --out) WORK=${2:?}; shift 2 ;;
    --device) DEVICE=${2:?}; shift 2 ;;
    --config) CONFIG=${2:?}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --check-export) CHECK_EXPORT=1; shift ;;
    --budget) BUDGET=${2:?}; shift 2 ;;
    --no-reference) REFERENCE=0; shift ;;
    --attention) ATTENTION=${2:?}; shift 2 ;;
    --precision) PRECISION=${2:?}; shift 2 ;;
    --unconditional-half) HALF=1; shift ;;
    --kv-precision) KV_PRECISION=${2:?}; shift 2 ;;
    --export-only) EXPORT_ONLY=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n $BINARY || $EXPORT_ONLY == 1 ]] || { echo "--binary is required" >&2; usage; }
[[ $DEVICE == cuda || $DEVICE == cpu ]] || die "--device must be cuda or cpu, not $DEVICE"
[[ -n $CONFIG ]] || { [[ $DEVICE == cuda ]] && CONFIG=base || CONFIG=tiny; }
[[ $CONFIG =~ ^(base|tiny|micro)$ ]] || die "--config must be base, tiny or micro"
[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget takes whole seconds"
[[ $ATTENTION =~ ^(fused|unfused)$ ]] || die "--attention must be fused or unfused"
[[ $PRECISION =~ ^(fp32|fp16|mixed)$ ]] || die "--precision must be fp32, fp16 or mixed"
[[ $KV_PRECISION == fp32 || ( $KV_PRECISION == fp16 && $PRECISION == fp16 ) ]] \
  || die "--kv-precision must be fp32, or fp16 with --precision fp16"

PY=${PYTHON:-python3}
# Relative paths are the caller's, not the repository root's (where this runs).
[[ -z $BINARY || $BINARY == /* ]] || BINARY=$CALLER/$BINARY
[[ $WORK == /* ]] || WORK=$CALLER/$WORK
WORK=$(realpath -m "$WORK")
FINAL=""
if [[ -n ${BENCH_RESULTS:-} ]]; then
  RES=$(cd "$CALLER" && realpath -m "$BENCH_RESULTS")
elif [[ -n ${OUT:-} ]]; then
  RES=$WORK/results FINAL=$(cd "$CALLER" && realpath -m "$OUT")
  # The bundle (1.6 GB for base) must not land in the folder that is carried back.
  [[ $WORK/ != "$FINAL"/* ]] || die "--out $WORK is inside \$OUT ($FINAL): give a scratch directory outside it"
else
  RES=$WORK
fi
mkdir -p "$WORK" "$RES"
NAME=$CONFIG
[[ $ATTENTION == fused ]] && NAME=$CONFIG-fused
[[ $HALF == 1 ]] && NAME=$NAME-half
[[ $PRECISION == fp32 ]] || NAME=$NAME-$PRECISION
[[ $KV_PRECISION == fp32 ]] || NAME=$NAME-kv16
BUNDLE=$WORK/bundle-$NAME
# Results of an earlier run in the same folder would mix with this one's.
(cd "$RES" && rm -f bench.log env.json nvidia-smi.csv export.log server.log server.json \
  providers.txt info.json latency-steps*.json batch-captions.json loadgen-c*.json metrics.txt reference.jsonl \
  reference.log results.json summary.md gpu-usage.csv)
exec > >(tee "$RES/bench.log") 2>&1
TEE_PID=$!

if [[ $QUICK == 1 ]]; then
  LAT_WARMUP=2 LAT_N=8 TP_SECONDS=${BENCH_TP_SECONDS:-4} CONCURRENCY=${BENCH_CONCURRENCY:-"8 32"}
  REF_WARMUP=1 REF_LAT_N=3 REF_BATCH=16 REF_TP_N=1 READY_TIMEOUT=120 REF_RESERVE=30
else
  LAT_WARMUP=5 LAT_N=30 TP_SECONDS=${BENCH_TP_SECONDS:-30} CONCURRENCY=${BENCH_CONCURRENCY:-}
  REF_WARMUP=3 REF_LAT_N=30 REF_BATCH=256 REF_TP_N=3 READY_TIMEOUT=300 REF_RESERVE=120
fi
[[ $REFERENCE == 1 ]] || REF_RESERVE=0
if [[ $DEVICE == cpu ]]; then REF_THREADS=${BENCH_REF_THREADS:-1}; else REF_THREADS=${BENCH_REF_THREADS:-0}; fi
IMAGE=$ROOT/tests/fixtures/images/scene-test-seen-0.png
SERVER_PID=""
SUMMARY_DONE=0

# ----------------------------------------------------------------- (a) the host
log "== (a) environment (device $DEVICE, config $CONFIG, quick $QUICK; results in $RES)"
command -v "$PY" >/dev/null || die "no $PY on PATH (set PYTHON)"
if [[ $EXPORT_ONLY == 0 ]]; then
  [[ -f $BINARY ]] || die "--binary $BINARY: no such file"
  [[ -x $BINARY ]] || chmod +x "$BINARY" 2>/dev/null || die "--binary $BINARY is not executable"
  BINARY=$(cd "$(dirname "$BINARY")" && pwd)/$(basename "$BINARY")
fi
[[ -f $IMAGE ]] || die "missing $IMAGE (run from a full working tree)"
GPU_NAME=""
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$RES/nvidia-smi.csv"
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
  log "nvidia-smi: not found"
  [[ $DEVICE == cpu || $EXPORT_ONLY == 1 ]] || die "--device cuda but no nvidia-smi on this host"
fi
"$PY" - "$RES/env.json" <<'EOF' || die "the Python probe failed (see above)"
import importlib, json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "numpy", "onnx", "onnxruntime", "tokenizers", "tqdm"):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - a broken install counts as missing
        info[name] = None
        info[name + "_error"] = f"{type(e).__name__}: {e}"
if info["torch"]:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
for k, v in info.items():
    print(f"  {k}: {v}")
json.dump(info, open(sys.argv[1], "w"), indent=2)
EOF
pyinfo() { "$PY" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v in (None, False) else v)" "$RES/env.json" "$1"; }
[[ -n $(pyinfo torch) ]] || die "PyTorch is not importable by $PY: it is required (export and reference)"
[[ -n $(pyinfo numpy) ]] || die "numpy is not importable by $PY: it is required (export and reference)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$PY is older than 3.9"
if [[ $EXPORT_ONLY == 1 ]]; then
  :  # the export runs on the CPU and needs no ONNX Runtime library
elif [[ $DEVICE == cuda ]]; then
  [[ -n $(pyinfo cuda_available) ]] || die "torch.cuda.is_available() is False: no CUDA for the reference"
  [[ -n ${ORT_DYLIB_PATH:-} ]] || die "ORT_DYLIB_PATH is not set: point it at ONNX Runtime's CUDA build (libonnxruntime.so.1.*), with its provider libraries and the CUDA libraries on LD_LIBRARY_PATH"
  [[ -f $ORT_DYLIB_PATH ]] || die "ORT_DYLIB_PATH=$ORT_DYLIB_PATH does not exist"
  ls "$(dirname "$ORT_DYLIB_PATH")"/libonnxruntime_providers_cuda.so >/dev/null 2>&1 \
    || log "warning: no libonnxruntime_providers_cuda.so next to $ORT_DYLIB_PATH"
else
  if [[ -z ${ORT_DYLIB_PATH:-} ]]; then
    [[ -f $ROOT/.ort/lib/libonnxruntime.so ]] || die "no ONNX Runtime: set ORT_DYLIB_PATH or run scripts/fetch-onnxruntime.sh"
    export ORT_DYLIB_PATH=$ROOT/.ort/lib/libonnxruntime.so
  fi
fi
[[ $EXPORT_ONLY == 1 ]] \
  || log "binary: $BINARY ($("$BINARY" --version 2>&1 | head -1)); ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
EXPORT_FLAGS=()
if [[ -z $(pyinfo onnx) ]]; then
  log "fallback: the onnx package is missing -> export with --no-onnx-package (torch's exporter without it)"
  EXPORT_FLAGS+=(--no-onnx-package)
fi
if [[ $CHECK_EXPORT == 1 && -z $(pyinfo onnxruntime) ]]; then
  log "fallback: --check-export asked for but onnxruntime is missing -> export without the check"
  CHECK_EXPORT=0
fi
[[ $CHECK_EXPORT == 1 ]] || EXPORT_FLAGS+=(--no-check)
EXPORT_FLAGS+=(--attention "$ATTENTION")
[[ $PRECISION == fp32 ]] || EXPORT_FLAGS+=(--precision "$PRECISION")
[[ $HALF == 0 ]] || EXPORT_FLAGS+=(--unconditional-half)
[[ $KV_PRECISION == fp32 ]] || EXPORT_FLAGS+=(--kv-precision "$KV_PRECISION")
[[ -n $(pyinfo tokenizers) ]] \
  || log "fallback: the tokenizers package is missing -> the exporter writes tokenizer.json as plain JSON"

# A step's time limit of LIMIT seconds, cut to what the --budget leaves (at least 60 s),
# so that a slow export or start-up cannot run the whole run past its host's limit.
within_budget() {
  local limit=$1 left=$((BUDGET - SECONDS))
  # --export-only is the step run ahead of time so that the timed run need not export.
  if (( EXPORT_ONLY == 0 && BUDGET > 0 && left < limit )); then limit=$(( left > 60 ? left : 60 )); fi
  echo "$limit"
}

# With $OUT set: what has been written so far, packed into $OUT (after each phase, so a
# run its host kills still returns the phases done).
pack_results() {
  [[ -z $FINAL ]] || scripts/pack-results.sh "$RES" "$FINAL/bench-files.tar.gz" \
    summary.md results.json || log "warning: packing the results into $FINAL failed"
}

# ----------------------------------------------------------------- (b) the bundle
log "== (b) bundle: random-weight $CONFIG ($ATTENTION attention, $PRECISION) in $BUNDLE"
if [[ -f $BUNDLE/manifest.json ]] && grep -q "\"name\": \"$NAME\"" "$BUNDLE/manifest.json"; then
  log "reusing the bundle exported earlier (delete $BUNDLE to export again)"
else
  rm -rf "$BUNDLE"
  log "exporting: python -m ladic.export --random-init $CONFIG --name $NAME --out $BUNDLE ${EXPORT_FLAGS[*]}"
  (cd models && PYTHONPATH="$ROOT/models${PYTHONPATH:+:$PYTHONPATH}" timeout "$(within_budget 900)" \
    "$PY" -W ignore -m ladic.export --random-init "$CONFIG" --name "$NAME" --out "$BUNDLE" "${EXPORT_FLAGS[@]}") \
    >"$RES/export.log" 2>&1 || { tail -20 "$RES/export.log"; die "export failed (log: $RES/export.log)"; }
  tail -3 "$RES/export.log"
fi
du -sh "$BUNDLE" | sed 's/^/  /'
if [[ $EXPORT_ONLY == 1 ]]; then
  log "export only: $BUNDLE is ready for a run with the same flags and --out $WORK"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  pack_results
  exit 0
fi
# ONNX Runtime's CUDA Gather (and elementwise kernels) index with 32-bit integers, and
# the denoiser slices its K/V input [rows, 2*layers, tokens, hidden] per layer: keep that
# input under 2^31 elements (base: 295 rows), in a power of two of at most 512 rows.
MAX_ROWS=${BENCH_MAX_BATCH_ROWS:-$("$PY" - "$BUNDLE/manifest.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))["diffuser"]
limit = (2**31 - 1) // (2 * d["layers"] * d["image_tokens"] * d["hidden"])
rows = 512
while rows > limit and rows > 2:
    rows //= 2
print(rows)
EOF
)}
[[ -n $CONCURRENCY ]] || CONCURRENCY="32 $((MAX_ROWS / 4)) $((MAX_ROWS / 2))"
log "service batches: --max-batch-rows $MAX_ROWS ($((MAX_ROWS / 2)) captions with guidance); throughput at concurrency $CONCURRENCY"

# ----------------------------------------------------------------- helpers
cleanup() {
  if [[ -n ${SMI_PID:-} ]]; then kill "$SMI_PID" 2>/dev/null || true; fi
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    sleep 2
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  [[ -f $WORK/server.log && $WORK != "$RES" ]] && cp "$WORK/server.log" "$RES/server.log" 2>/dev/null
  if [[ $SUMMARY_DONE == 0 && -f $RES/env.json ]]; then
    echo "(the run stopped early; summary of what was measured:)"
    summary || true
  fi
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
  pack_results
}
trap cleanup EXIT

summary() {
  "$PY" - "$RES" "$DEVICE" "$NAME" "$QUICK" "$GPU_NAME" "$CONCURRENCY" "$REF_BATCH" \
    "$BUNDLE/manifest.json" <<'EOF'
import datetime, glob, json, os, re, sys
res, device, config, quick, gpu, conc, ref_batch, manifest = sys.argv[1:9]
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def lines(path):
    try:
        with open(path) as f:
            return [json.loads(x) for x in f if x.startswith("{")]
    except (OSError, ValueError):
        return []
env = load(f"{res}/env.json") or {}
precision = (load(manifest) or {}).get("precision", "fp32")
lat = {s: load(f"{res}/latency-steps{s}.json") for s in (5, 34)}
batch = load(f"{res}/batch-captions.json")
tp = {}
for p in sorted(glob.glob(f"{res}/loadgen-c*.json")):
    d = load(p)
    if d:
        tp[int(re.search(r"-c(\d+)\.json$", p).group(1))] = d
ref = lines(f"{res}/reference.jsonl")
def ref_get(dtype, batch, steps):
    for r in ref:
        if (r["dtype"], r["batch"], r["steps"]) == (dtype, batch, steps) and "error" not in r:
            return r
    return None
server = load(f"{res}/server.json") or {}
card = gpu or env.get("cuda_device") or "no GPU"
if device == "cpu":
    card = f"CPU ({os.cpu_count()} cores visible; GPU, if any: {card})"
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

def ms(x):
    return f"{1000 * x:.1f} ms" if x is not None else "n/a"
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"

rows = []
for steps in (5, 34):
    s = lat[steps]
    sp50 = s["p50_s"] if s else None
    cells = [f"{ms(sp50)} (p90 {ms(s['p90_s'])})" if s else "n/a"]
    refs = [ref_get(d, 1, steps) for d in ("fp32", "bf16")]
    cells += [f"{ms(r['p50_s'])} (p90 {ms(r['p90_s'])})" if r else "n/a" for r in refs]
    cells += [ratio(sp50, r["p50_s"] if r else None) for r in refs]
    rows.append([f"batch-1 latency, {steps} steps, p50"] + cells)
best_c, best = None, None
for c, d in tp.items():
    if best is None or d["captions_per_second"] > best:
        best_c, best = c, d["captions_per_second"]
refs = [ref_get(d, int(ref_batch), 34) for d in ("fp32", "bf16")]
rows.append(
    ["throughput, 34 steps (captions/s)",
     f"{best:.1f} (concurrency {best_c})" if best is not None else "n/a"]
    + [f"{r['images_per_second']:.1f} (batch {r['batch']})" if r else "n/a" for r in refs]
    + [ratio(best, r["images_per_second"] if r else None) for r in refs]
)
out = []
title = "GPU benchmark" if device == "cuda" else "GPU benchmark script, CPU smoke test"
out.append(f"### {title}: {card}, {now}{' (--quick)' if quick == '1' else ''}")
out.append("")
out.append(
    f"Bundle `{config}` ({precision}) with random weights (seed 0), exported here; service "
    f"`ladic-serve serve --device {device} {server.get('args', '')}`"
    f" ({server.get('version', '?')}); graphs: {server.get('providers', 'n/a').replace(',', ', ')}. "
    + (f"Reference: models/ladic/bench_reference.py --loop torch on {device}, PyTorch "
       f"{env.get('torch')}, Python {env.get('python')}"
       + (", fp32 with TF32 allowed" if device == "cuda" else "") + ". "
       if ref else "Reference: not run in this pass (--no-reference). ")
    + "Service latency: sequential single requests over HTTP (PNG fixture, p50 of "
    f"{(lat[5] or {}).get('n', '?')}); service throughput: scripts/loadgen.py measure, "
    "closed loop, best concurrency; reference: one caption_images-equivalent call per "
    "batch (image encoding, the loop, the decode)."
)
out.append("")
out.append("| measure | service | reference fp32 | reference bf16 | service / ref fp32 | service / ref bf16 |")
out.append("|---|---|---|---|---|---|")
for r in rows:
    out.append("| " + " | ".join(r) + " |")
out.append("")
out.append("Latency ratios below 1 and throughput ratios above 1 favour the service.")
if tp:
    parts = []
    for c, d in sorted(tp.items()):
        st = ", ".join(f"{k}: {v}" for k, v in sorted(d["statuses"].items()))
        p50 = d.get("p50_s")
        parts.append(f"{c}: {d['captions_per_second']:.1f}/s (p50 {ms(p50)}; {st})")
    out.append("Service throughput by concurrency: " + "; ".join(parts) + ".")
skipped = [c for c in conc.split() if int(c) not in tp]
if skipped:
    out.append(f"Not measured (time budget or failure): concurrency {', '.join(skipped)}.")
for steps in (5, 34):
    s = lat[steps]
    if s:
        out.append(
            f"Service at {steps} steps, server-side inference p50 "
            f"{s['inference_ms_p50']:.1f} ms, queue p50 {s['queue_ms_p50']:.2f} ms."
        )
try:
    usage = [line.split(",") for line in open(f"{res}/gpu-usage.csv") if line.count(",") == 2]
    util = [float(u[1]) for u in usage]
    mem = [float(u[2]) for u in usage]
    if usage:
        out.append(f"GPU during the throughput phases ({len(usage)} samples of nvidia-smi): "
                   f"utilization mean {sum(util) / len(util):.0f}%, max {max(util):.0f}%; "
                   f"memory used max {max(mem):.0f} MiB.")
except (OSError, ValueError):
    pass
if server and not server.get("started"):
    out.append("Server: did not become ready (see server.log); no service numbers.")
elif server:
    out.append(f"Server: ready after {server.get('ready_s', '?')} s; SIGTERM exit status "
               f"{server.get('exit_status', '?')} after {server.get('stop_s', '?')} s.")
text = "\n".join(out) + "\n"
print(text)
with open(f"{res}/summary.md", "w") as f:
    f.write(text)
with open(f"{res}/results.json", "w") as f:
    json.dump({"device": device, "config": config, "quick": quick == "1", "card": card,
               "date": now, "env": env, "server": server, "latency": lat, "batch": batch,
               "throughput": {str(k): v for k, v in tp.items()}, "reference": ref},
              f, indent=2)
EOF
}

# One /caption/batch request of the 8 scene images at 34 steps with 4 candidates each (a
# larger bucket than the latency requests': 64 rows with guidance), its captions and
# every candidate's in $RES/batch-captions.json, to compare across server variants.
batch_captions() {
  "$PY" - "$URL" "$ROOT/tests/fixtures/scenes" "$RES/batch-captions.json" <<'EOF'
import base64, http.client, json, pathlib, sys, time, urllib.parse
url, folder, path = sys.argv[1:4]
images = sorted(pathlib.Path(folder).glob("*.png"))
body = json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in images],
                   "steps": 34, "candidates": 4, "seed": 7})
u = urllib.parse.urlsplit(url)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
start = time.perf_counter()
conn.request("POST", "/caption/batch", body=body, headers={"content-type": "application/json"})
r = conn.getresponse()
data = r.read()
if r.status != 200:
    sys.exit(f"/caption/batch: HTTP {r.status}: {data[:300]!r}")
results = json.loads(data)["results"]
out = {"images": [p.name for p in images], "seconds": time.perf_counter() - start,
       "captions": [x["caption"] for x in results],
       "candidates": [[c["caption"] for c in x["candidates"]] for x in results]}
json.dump(out, open(path, "w"), indent=2)
print(f"  {len(images)} images x 4 candidates in {out['seconds']:.2f} s")
EOF
}

latency() {  # steps: sequential single requests, JSON in $RES/latency-stepsN.json
  "$PY" - "$URL" "$IMAGE" "$1" "$LAT_WARMUP" "$LAT_N" "$RES/latency-steps$1.json" <<'EOF'
import http.client, json, statistics, sys, time, urllib.parse
url, image, steps, warmup, n, path = sys.argv[1:7]
steps, warmup, n = int(steps), int(warmup), int(n)
u = urllib.parse.urlsplit(url)
body = open(image, "rb").read()
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
def one(seed):
    start = time.perf_counter()
    conn.request("POST", f"/caption?steps={steps}&seed={seed}", body=body,
                 headers={"content-type": "image/png"})
    r = conn.getresponse()
    data = r.read()
    took = time.perf_counter() - start
    if r.status != 200:
        sys.exit(f"steps={steps}: HTTP {r.status}: {data[:300]!r}")
    return took, json.loads(data)
for i in range(warmup):
    one(i)
times, inference, queue, captions = [], [], [], []
for i in range(n):
    took, answer = one(1000 + i)
    times.append(took)
    inference.append(answer["timings"]["inference_ms"])
    queue.append(answer["timings"]["queue_ms"])
    captions.append(answer["caption"])
times.sort()
out = {"steps": steps, "n": n, "warmup": warmup,
       "p50_s": statistics.median(times), "p90_s": times[min(n - 1, int(0.9 * n))],
       "mean_s": statistics.fmean(times), "min_s": times[0], "max_s": times[-1],
       "inference_ms_p50": statistics.median(inference), "queue_ms_p50": statistics.median(queue),
       "caption": answer["caption"], "model": answer.get("model"),
       "captions": captions}  # request i had seed 1000 + i
json.dump(out, open(path, "w"), indent=2)
print(f"  steps={steps}: p50 {1000 * out['p50_s']:.1f} ms, p90 {1000 * out['p90_s']:.1f} ms "
      f"(server inference p50 {out['inference_ms_p50']:.1f} ms) over {n} requests")
EOF
}

over_budget() { [[ $BUDGET -gt 0 && $((SECONDS + $1)) -gt $BUDGET ]]; }

# ----------------------------------------------------------------- (c) the service
log "== (c) service"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SERVER_ARGS=(--max-batch-rows "$MAX_ROWS" --queue-size 1024 --request-timeout-ms 120000
  --shutdown-grace-seconds 60)
# shellcheck disable=SC2206 # word splitting of the extra flags is intended
SERVER_ARGS+=(${BENCH_SERVER_ARGS:-})
log "starting: $BINARY serve --bundle $BUNDLE --device $DEVICE --bind 127.0.0.1:$PORT ${SERVER_ARGS[*]}"
NO_COLOR=1 "$BINARY" serve --bundle "$BUNDLE" --device "$DEVICE" --bind "127.0.0.1:$PORT" "${SERVER_ARGS[@]}" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
START=$SECONDS
URL=http://127.0.0.1:$PORT
SERVICE_OK=1 STATUS="" STOP_S="" READY_S="" PROVIDERS=""
if ! "$PY" - "$URL" "$SERVER_PID" "$(within_budget "$READY_TIMEOUT")" <<'EOF'
import os, sys, time, urllib.request, urllib.error
url, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + timeout
while time.monotonic() < end:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited during start-up")
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(0.5)
sys.exit(f"not ready after {timeout:.0f} s")
EOF
then
  SERVICE_OK=0
  tail -30 "$WORK/server.log"
  log "ERROR: the server did not become ready (its log above); going on with the reference"
  if kill -0 "$SERVER_PID" 2>/dev/null; then kill -TERM "$SERVER_PID"; sleep 2; kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
fi

# The measurements (not indented: the heredocs end at column 0).
if [[ $SERVICE_OK == 1 ]]; then
READY_S=$((SECONDS - START))
log "ready after ${READY_S} s; provider lines of the log:"
grep -E "graph loaded|bundle sessions loaded|execution provider|CUDA|cuda" "$WORK/server.log" \
  | sed 's/^/  /' | tee "$RES/providers.txt" || true
PROVIDERS=$(grep -E "graph loaded" "$WORK/server.log" \
  | sed -E 's/.*graph[=:] *"?([a-z]+)"?.*device[=:] *"?([A-Za-z0-9_]+)"?.*/\1 \2/' | paste -sd, - || true)
"$PY" -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1] + '/info').read().decode())" \
  "$URL" >"$RES/info.json" || log "warning: GET /info failed"

for steps in 5 34; do
  log "batch-1 latency at steps=$steps: $LAT_WARMUP warm-up + $LAT_N sequential requests"
  latency "$steps" || log "warning: the latency phase at steps=$steps failed"
done
log "batch captions: 8 images x 4 candidates in one /caption/batch request (compared across variants)"
batch_captions || log "warning: the batch captions request failed"
pack_results

SMI_PID=""
if [[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -l 1 >"$RES/gpu-usage.csv" 2>/dev/null &
  SMI_PID=$!
fi
first=1
for c in $CONCURRENCY; do
  if [[ $first == 0 ]] && over_budget $((TP_SECONDS * 2 + REF_RESERVE)); then
    log "skipping throughput at concurrency $c: the --budget of $BUDGET s would be exceeded"
    continue
  fi
  first=0
  log "throughput at steps=34, concurrency $c, ${TP_SECONDS} s (scripts/loadgen.py measure)"
  if "$PY" scripts/loadgen.py measure --url "$URL" --seconds "$TP_SECONDS" --concurrency "$c" \
      --query steps=34 >"$RES/loadgen-c$c.json.tmp"; then
    mv "$RES/loadgen-c$c.json.tmp" "$RES/loadgen-c$c.json"
    sed 's/^/  /' "$RES/loadgen-c$c.json"
  else
    log "warning: loadgen failed at concurrency $c"
  fi
done
if [[ -n $SMI_PID ]]; then kill "$SMI_PID" 2>/dev/null || true; wait "$SMI_PID" 2>/dev/null || true; SMI_PID=""; fi
"$PY" -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1] + '/metrics').read().decode())" \
  "$URL" >"$RES/metrics.txt" 2>/dev/null || true

log "stopping the server (SIGTERM)"
STOP=$SECONDS
kill -TERM "$SERVER_PID"
for _ in $(seq 1 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$SERVER_PID" 2>/dev/null; then
  log "ERROR: the server is still running 75 s after SIGTERM; SIGKILL"
  kill -KILL "$SERVER_PID" 2>/dev/null || true
fi
STATUS=0
wait "$SERVER_PID" || STATUS=$?
SERVER_PID=""
STOP_S=$((SECONDS - STOP))
if [[ $STATUS == 0 ]]; then log "server exited 0 after ${STOP_S} s"; else log "ERROR: server exit status $STATUS after SIGTERM"; fi
fi  # SERVICE_OK
"$PY" - "$RES/server.json" "${SERVER_ARGS[*]}" "$("$BINARY" --version 2>&1 | head -1)" \
  "$PROVIDERS" "$READY_S" "$STATUS" "$STOP_S" <<'EOF'
import json, sys
path, args, version, providers, ready, status, stop = sys.argv[1:8]
num = lambda v: int(v) if v else None  # noqa: E731
json.dump({"args": args, "version": version, "providers": providers, "ready_s": num(ready),
           "exit_status": num(status), "stop_s": num(stop), "started": bool(ready)},
          open(path, "w"), indent=2)
EOF
[[ $WORK == "$RES" ]] || cp "$WORK/server.log" "$RES/server.log"

pack_results

# ----------------------------------------------------------------- (d) the reference
if [[ $REFERENCE == 0 ]]; then
log "== (d) PyTorch reference: skipped (--no-reference)"
else
log "== (d) PyTorch reference on $DEVICE: fp32 and bf16; batch 1 at 5 and 34 steps ($REF_LAT_N each), batch $REF_BATCH at 34 steps ($REF_TP_N)"
TF32=(); [[ $DEVICE == cuda ]] && TF32=(--tf32)
# Bounded so that the whole run ends near --budget; the cases done by then are kept.
REF_TIMEOUT=900
[[ $BUDGET == 0 ]] || REF_TIMEOUT=$((BUDGET + 60 - SECONDS > 90 ? BUDGET + 60 - SECONDS : 90))
if (cd models && PYTHONPATH="$ROOT/models${PYTHONPATH:+:$PYTHONPATH}" timeout "$REF_TIMEOUT" \
    "$PY" -W ignore -m ladic.bench_reference \
    --random-init "$CONFIG" --device "$DEVICE" --loop torch --dtype fp32,bf16 "${TF32[@]}" \
    --cases "1x5:$REF_LAT_N,1x34:$REF_LAT_N,${REF_BATCH}x34:$REF_TP_N:1" --warmup "$REF_WARMUP" \
    --threads "$REF_THREADS") >"$RES/reference.jsonl" 2>"$RES/reference.log"; then
  "$PY" - "$RES/reference.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    case = f"  {r['dtype']} batch {r['batch']} steps {r['steps']}"
    if "error" in r:
        print(f"{case}: failed: {r['error'][:200]}")
        continue
    print(f"{case}: p50 {1000 * r['p50_s']:.1f} ms per call (p90 {1000 * r['p90_s']:.1f}),"
          f" {r['images_per_second']:.1f} captions/s")
EOF
else
  tail -5 "$RES/reference.log"
  log "warning: the reference failed or passed its ${REF_TIMEOUT} s (log: $RES/reference.log); cases done: $(grep -c . "$RES/reference.jsonl" || true)"
fi

fi  # REFERENCE

# ----------------------------------------------------------------- (e) summary
log "== (e) summary ($RES/summary.md)"
summary
SUMMARY_DONE=1
log "done in ${SECONDS} s; files in $RES:"
ls "$RES" | sed 's/^/  /'
if [[ $SERVICE_OK != 1 || $STATUS != 0 ]]; then
  log "FAILED: the service did not start or did not exit 0 on SIGTERM (server.log)"
  exit 1
fi
