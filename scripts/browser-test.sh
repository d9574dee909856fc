#!/usr/bin/env bash
# The demo page in a real browser: headless Chromium (Debian's `chromium` package)
# driven by playwright-core (tests/browser/) against the debug binary serving the
# default bundle. Installs what is missing: Chromium with apt-get (as root only),
# the npm packages with `npm ci` from tests/browser/package-lock.json, the debug
# binary with cargo. Screenshots land in target/browser/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$PWD/.ort/lib/libonnxruntime.so}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export CHROMIUM

if [[ ! -x "$CHROMIUM" ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    echo "== installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null
  else
    echo "error: $CHROMIUM is missing; install the Debian packages chromium and chromium-driver" >&2
    exit 1
  fi
fi
if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
  echo "== npm ci"
  (cd tests/browser && npm ci --prefer-offline --no-audit --no-fund)
fi
if [[ ! -x target/debug/ladic-serve ]]; then
  echo "== cargo build"
  cargo build --locked --bin ladic-serve
fi
if [[ ! -f "$ORT_DYLIB_PATH" ]]; then
  scripts/fetch-onnxruntime.sh
fi

echo "== browser test"
cd tests/browser
node --test demo.test.mjs
