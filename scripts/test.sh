#!/usr/bin/env bash
# The test command: set up (packages, RabbitMQ, moto), build every binary, run every test
# against the real broker. Extra arguments go to `cargo test`. Ends with one summary line
# adding up every test binary (the last binary cargo runs is an empty doc-test one).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
