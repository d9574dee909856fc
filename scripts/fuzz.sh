#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 60) and
# fails on the first crash, panic, timeout (-timeout, 10 s per input) or memory blow-up
# (-rss_limit_mb). See docs/hardening.md.
#
#   scripts/fuzz.sh [SECONDS]
#
# Uses stable Rust: RUSTC_BOOTSTRAP=1 lets it accept the nightly-only flags cargo-fuzz
# passes (sanitizer coverage, AddressSanitizer). Each target starts from its committed
# seeds in fuzz/corpus/<target>/ (scripts/make-fuzz-corpus.py writes them) and keeps
# what it finds in fuzz/corpus-run/<target>/ (ignored by git), so the committed corpus
# stays small. A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>  (in fuzz/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
SECONDS_PER_TARGET="${1:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo fuzz build
for target in $(cargo fuzz list); do
  mkdir -p "corpus-run/$target"
  echo "== fuzz $target for ${SECONDS_PER_TARGET} s"
  set +e
  # libFuzzer's progress lines and its recommended dictionary are dropped; the rest shows.
  cargo fuzz run "$target" "corpus-run/$target" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 2>&1 | grep -v -E '^(#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|RELOAD)|[[:space:]]+NEW_FUNC|"|#+ .*dictionary)'
  status=${PIPESTATUS[0]}
  set -e
  if [[ $status != 0 ]]; then
    echo "fuzz target $target failed (exit $status); its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
done
echo "== no crash in $(cargo fuzz list | wc -l) targets x ${SECONDS_PER_TARGET} s"
