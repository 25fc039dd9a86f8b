#!/usr/bin/env bash
# The test command: set up (packages, RabbitMQ, moto), build every binary, run every test
# against the real broker. Extra arguments go to `cargo test`. Ends with one summary line
# adding up every test binary (the last binary cargo runs is an empty doc-test one).
#
# Before the tests it validates the deployment files offline (tests/k8s/validate.sh:
# kustomize, kubernetes-validate, the CRDs in ../shared/k8s-crds, compose config); a
# failure there fails the command.
#
# In CI (CI=true), or with VIDPIPE_COMPOSE_SMOKE=1, it then runs the docker-compose smoke
# test (tests/compose/smoke.sh) with the binaries just built; it installs and starts Docker
# itself and never pulls an image. VIDPIPE_COMPOSE_SMOKE=0 skips it even in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The deployment files, offline (Kubernetes manifests, docker-compose.workers.yml): about
# 15 s; no cluster is needed or touched. Before the tests, so the summary line below stays
# right after cargo's output.
tests/k8s/validate.sh || status=$?
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"

smoke="${VIDPIPE_COMPOSE_SMOKE:-}"
if [ -z "$smoke" ] && [ "${CI:-}" = true ]; then smoke=1; fi
if [ "$smoke" = 1 ]; then
  BIN_DIR=target/debug tests/compose/smoke.sh || status=$?
else
  echo "compose smoke test skipped (runs in CI, or with VIDPIPE_COMPOSE_SMOKE=1)"
fi
exit "$status"
