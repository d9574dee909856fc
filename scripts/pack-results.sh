#!/usr/bin/env bash
# Packs a folder of benchmark results for a transfer that brings back only a few files
# (the GPU host's $OUT): every file below FROM goes into one gzipped tar ARCHIVE (files
# over 4 MiB, server logs mostly, keep their last 4 MiB there), and the FILEs named (paths
# relative to FROM, if present) are copied beside the archive too, to be read at once.
# The archive is replaced in one rename, so it can be run after every step of a run.
#
#   scripts/pack-results.sh FROM ARCHIVE [FILE...]
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
FROM=$1 ARCHIVE=$2
shift 2
LIMIT=$((4 * 1024 * 1024))
[[ -d $FROM ]] || { echo "pack-results: no folder $FROM" >&2; exit 1; }
TO=$(dirname "$ARCHIVE")
mkdir -p "$TO"
STAGE=$(mktemp -d)
chmod 755 "$STAGE"  # the archive's top folder; mktemp makes it private
trap 'rm -rf "$STAGE"' EXIT
ARCHIVE_REAL=$(realpath -m "$ARCHIVE")
while IFS= read -r -d '' file; do
  [[ $(realpath -m "$FROM/$file") == "$ARCHIVE_REAL"* ]] && continue
  mkdir -p "$STAGE/$(dirname "$file")"
  if (( $(stat -c %s "$FROM/$file") > LIMIT )); then
    tail -c "$LIMIT" "$FROM/$file" >"$STAGE/$file"
  else
    cp "$FROM/$file" "$STAGE/$file"
  fi
done < <(cd "$FROM" && find . -type f -print0)
tar -czf "$ARCHIVE.tmp" -C "$STAGE" .
mv "$ARCHIVE.tmp" "$ARCHIVE"
for file in "$@"; do
  [[ -f $FROM/$file ]] && cp "$FROM/$file" "$TO/$(basename "$file")"
done
exit 0
