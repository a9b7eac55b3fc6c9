#!/usr/bin/env bash
# Runs every test in the workspace and ends with one plain total line ("tests: N passed, N failed"),
# so the last thing CI reads is the whole run, not the last test binary's summary.
set -uo pipefail
# Free disk before and after (a full disk shows up as etcd or tar failures far from the cause).
free_disk() { df -h --output=target,avail "${CARGO_TARGET_DIR:-target}" /tmp 2>/dev/null | tail -n +2 | awk '{printf "%s %s free; ", $1, $2}'; echo; }
echo "test.sh: disk: $(free_disk)"
log=$(mktemp /tmp/weft-test.XXXXXX)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
echo "test.sh: disk: $(free_disk)"
exit "$rc"
