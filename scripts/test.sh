#!/usr/bin/env bash
# Runs every test in the workspace and ends with one plain total line ("tests: N passed, N failed"),
# so the last thing CI reads is the whole run, not the last test binary's summary.
set -uo pipefail
log=$(mktemp /tmp/weft-test.XXXXXX)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
