#!/usr/bin/env bash
# Runs the service the way the CPU image runs it, without a Docker engine: rebuilds the
# runtime stage's layout (docker/layout.env: the binary, ONNX Runtime, the bundle, the
# health probe) under a temporary root, starts the binary from there as the image's
# unprivileged uid/gid with a clean environment (only the ENV docker/Dockerfile sets,
# paths moved under the root), and checks it: /health/ready, the image's HEALTHCHECK
# probe, POST /caption with a PNG (200, JSON with a caption), GET /metrics, then
# SIGTERM and exit status 0.
#
#   scripts/runtime-layout.sh [--binary PATH] [--pod-env FILE] [--keep]
#
#   --binary PATH   the release binary (default target/release/ladic-serve, built with
#                   `cargo build --release --locked` when missing)
#   --pod-env FILE  KEY=VALUE lines (docker/layout.py pod-env) for a second run with the
#                   environment a Kubernetes pod adds (ConfigMap) on top of the image's
#   --keep          leave the temporary root for inspection
#
# Differences from the container, by design: the service binds 127.0.0.1 on a free port
# instead of 0.0.0.0:PORT (this check only talks to loopback), and the root is a
# directory, not a mount namespace (root-owned and read-only to the service's uid, as
# the image's files are).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"

binary="" pod_env="" keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --pod-env) pod_env="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--binary PATH] [--pod-env FILE] [--keep]" >&2; exit 2 ;;
  esac
done

# shellcheck source=SCRIPTDIR/../docker/layout.env
source docker/layout.env

if [[ -z "$binary" ]]; then
  binary="${CARGO_TARGET_DIR:-target}/release/ladic-serve"
  if [[ ! -x "$binary" ]]; then
    echo "runtime-layout: building $binary (cargo build --release --locked)"
    nice -n 19 cargo build --release --locked
  fi
fi
[[ -x "$binary" ]] || { echo "runtime-layout: no executable at $binary" >&2; exit 1; }
if [[ ! -f .ort/lib/libonnxruntime.so ]]; then
  scripts/fetch-onnxruntime.sh
fi

work="$(mktemp -d /tmp/ladic-layout.XXXXXX)"
root="$work/root"
pid=""
cleanup() {
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  if [[ "$keep" == 1 ]]; then echo "runtime-layout: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- the runtime stage's layout -----------------------------------------------------
install -D -m 0755 "$binary" "$root$BIN_PATH"
install -D -m 0755 docker/healthcheck.sh "$root$HEALTHCHECK_PATH"
mkdir -p "$root$ORT_LIB_DIR" "$root$BUNDLE_DIR" "$root$APP_DIR"
cp -L .ort/lib/libonnxruntime*.so "$root$ORT_LIB_DIR/"
ln -sf libonnxruntime.so "$root$ORT_LIB_DIR/libonnxruntime.so.1"
cp -R "$BUNDLE_SRC/." "$root$BUNDLE_DIR/"
chmod 0755 "$work"
chmod -R u+rwX,go+rX,go-w "$root"

# The environment: the image's ENV only, re-rooted; loopback bind on a free port.
mapfile -t image_env < <(python3 docker/layout.py image-env docker/Dockerfile "$root")
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base_env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${image_env[@]}")
url="http://127.0.0.1:$port"

# As the image's user: setpriv when we are root, else ourselves (with a note).
as_app=()
if [[ "$(id -u)" == 0 ]]; then
  as_app=(setpriv "--reuid=$APP_UID" "--regid=$APP_GID" --clear-groups --no-new-privs)
else
  echo "runtime-layout: not root, so running as $(id -un) instead of uid $APP_UID"
fi

# A 96x64 RGB PNG (stdlib only).
python3 - "$work/test.png" <<'PY'
import struct, sys, zlib
w, h = 96, 64
rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // w, y * 255 // h, 128)) for x in range(w)) for y in range(h))
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY

fail() {
  echo "runtime-layout: FAIL: $*" >&2
  if [[ -f "$work/service.log" ]]; then
    echo "--- service log (last 40 lines)" >&2
    tail -n 40 "$work/service.log" >&2
  fi
  exit 1
}

# run_service NAME ENV... : start, check, stop.
run_service() {
  local name="$1"; shift
  # Later settings override earlier ones (pod env over image ENV), as in a container.
  local -A value=()
  local order=() kv env_list=()
  for kv in "$@" "LADIC_BIND=127.0.0.1:$port"; do
    [[ -v "value[${kv%%=*}]" ]] || order+=("${kv%%=*}")
    value["${kv%%=*}"]="${kv#*=}"
  done
  for kv in "${order[@]}"; do env_list+=("$kv=${value[$kv]}"); done
  echo "runtime-layout: [$name] $BIN_PATH serve, as uid $APP_UID, with only: ${env_list[*]:1}"
  touch "$work/started"
  (cd "$root$APP_DIR" && exec "${as_app[@]}" env -i "${env_list[@]}" "$root$BIN_PATH" serve) \
    >"$work/service.log" 2>&1 &
  pid=$!

  local start=$SECONDS deadline=$((SECONDS + 180))
  until curl -fsS -o /dev/null "$url/health/ready" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || fail "[$name] the service exited before it was ready"
    ((SECONDS < deadline)) || fail "[$name] not ready after 180 s"
    sleep 0.5
  done
  echo "runtime-layout: [$name] ready after $((SECONDS - start)) s"

  if [[ -n "${as_app[*]}" ]]; then
    local uid
    uid="$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")"
    [[ "$uid" == "$APP_UID" ]] || fail "[$name] runs as uid $uid, not $APP_UID"
  fi

  # The image's HEALTHCHECK probe, in the same clean environment; and against a closed
  # port it must fail (so it is not vacuous).
  (cd / && "${as_app[@]}" env -i "${env_list[@]}" "$root$HEALTHCHECK_PATH" /health/live) \
    || fail "[$name] HEALTHCHECK probe failed"
  if (cd / && "${as_app[@]}" env -i LADIC_BIND=127.0.0.1:1 "$root$HEALTHCHECK_PATH") 2>/dev/null; then
    fail "[$name] HEALTHCHECK probe succeeded against a closed port"
  fi

  local code
  code="$(curl -sS -o "$work/caption.json" -w '%{http_code}' -H 'content-type: image/png' \
    --data-binary "@$work/test.png" "$url/caption")"
  [[ "$code" == 200 ]] || fail "[$name] POST /caption answered $code: $(head -c 300 "$work/caption.json")"
  python3 - "$work/caption.json" <<'PY' || fail "[$name] POST /caption: no caption in the JSON"
import json, sys
body = json.load(open(sys.argv[1]))
assert isinstance(body.get("caption"), str) and body["caption"].strip(), body
print(f"runtime-layout: caption: {body['caption']!r}")
PY

  code="$(curl -sS -o "$work/metrics.txt" -w '%{http_code}' "$url/metrics")"
  [[ "$code" == 200 ]] || fail "[$name] GET /metrics answered $code"
  for family in ladic_requests_total ladic_request_duration_seconds ladic_queue_depth ladic_model_load_seconds; do
    grep -q "^# TYPE $family " "$work/metrics.txt" || fail "[$name] /metrics lacks $family"
  done
  grep -Eq '^ladic_requests_total\{.*route="/caption".*status="200".*\} 1$|^ladic_requests_total\{.*status="200".*route="/caption".*\} 1$' \
    "$work/metrics.txt" || fail "[$name] /metrics does not count the caption request"

  # Nothing may have been written into the image's file system.
  local written
  written="$(find "$root" -newer "$work/started" -print -quit)"
  [[ -z "$written" ]] || fail "[$name] the service wrote into the image's file system: $written"

  kill -TERM "$pid"
  local rc=0
  deadline=$((SECONDS + 45))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "[$name] still running 45 s after SIGTERM"
    sleep 0.2
  done
  wait "$pid" || rc=$?
  pid=""
  [[ "$rc" == 0 ]] || fail "[$name] exit status $rc after SIGTERM"
  echo "runtime-layout: [$name] ok: ready, healthcheck, caption 200, metrics, SIGTERM exit 0"
}

run_service image "${base_env[@]}"

if [[ -n "$pod_env" ]]; then
  mapfile -t extra < <(grep -v '^[[:space:]]*$' "$pod_env")
  run_service pod "${base_env[@]}" "${extra[@]}"
fi
echo "runtime-layout: passed ($repo, layout from docker/layout.env)"
