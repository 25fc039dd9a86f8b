#!/usr/bin/env bash
# The test command: set up (packages, RabbitMQ, moto), build every binary, run every test
# against the real broker. Extra arguments go to `cargo test`. Ends with one summary line
# adding up every test binary (the last binary cargo runs is an empty doc-test one).
#
# Before the tests it validates the deployment files offline (tests/k8s/validate.sh:
# kustomize, kubernetes-validate, the CRDs in ../shared/k8s-crds, compose config); a
# failure there fails the command.
#
# Then the broker-sensitive groups again on RabbitMQ 4.x, what users get from compose (the
# machine's broker is Debian 12's 3.10): tests/rabbitmq4/node.sh starts Debian trixie's
# RabbitMQ 4.0.5 as a chroot node on 127.0.0.1:5673 (its rootfs made once by debootstrap,
# about a minute, cached under ~/.cache/vidpipe-rabbitmq4) and stops it afterwards; the
# groups are $RABBITMQ4_GROUPS below. Their counts get a line of their own ("rabbitmq4:
# N passed, N failed"), and a last line adds up both runs. VIDPIPE_RABBITMQ4=0 skips it.
#
# In CI (CI=true), or with VIDPIPE_COMPOSE_SMOKE=1, it then runs the docker-compose smoke
# test (tests/compose/smoke.sh) with the binaries just built, with Compose v2 (trixie's
# static plugin binary, `node.sh compose-v2`) and a RabbitMQ 4.0.5 broker image, then a
# shorter check with Compose v1.29 (Debian 12's docker-compose: `up -d` until healthy and
# the secrets, then `down -v`); it installs and starts Docker itself and never pulls an
# image. VIDPIPE_COMPOSE_SMOKE=0 skips it even in CI.
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
counts() { awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$@"; }
counts "$log"

# --- the same groups on RabbitMQ 4.x ----------------------------------------------------------
# runtime:: is the worker runtime: retries through the quorum retry tiers, exhausted and
# permanent failures, poison messages, the work queues' delivery limit (x-death), the
# broker closing connections. producer::dead_ is the parking lot's CLI (list, replay,
# purge; broker dead letters explained from x-death). chaos:: is the whole pipeline under
# SIGKILLs, cut connections and a broker restart, on a private 4.x node (its own chroot
# node on 5681, so the restart touches nothing else). priority:: is the high queues and
# the worker's start gate, which must order jobs alike on both brokers.
RABBITMQ4_GROUPS=(runtime:: producer::dead_ chaos:: priority::)
if [ "${VIDPIPE_RABBITMQ4:-1}" != 0 ]; then
  node=tests/rabbitmq4/node.sh
  log4=$(mktemp)
  # Stop the node on any exit, unless it was already up before (someone's own).
  node_was_up=0
  $node status && node_was_up=1
  trap 'rm -f "$log" "$log4"; [ "$node_was_up" = 1 ] || $node stop >/dev/null 2>&1 || true' EXIT
  t4=$(date +%s)
  if $node start; then
    AMQP_URL=$($node url) VIDPIPE_TEST_RABBITMQCTL="$PWD/$node ctl" \
      VIDPIPE_TEST_RABBITMQ_ROOTFS=$($node rootfs) \
      cargo test --test integration -- "${RABBITMQ4_GROUPS[@]}" 2>&1 | tee "$log4" || status=$?
  else
    echo "rabbitmq4: the 4.x node did not start" >&2
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out" >"$log4"
    status=1
  fi
  [ "$node_was_up" = 1 ] || $node stop || true
  echo "rabbitmq4: $(counts "$log4") ($(($(date +%s) - t4)) s, RabbitMQ $(cat "$($node rootfs)/.vidpipe-rootfs-ready"), groups ${RABBITMQ4_GROUPS[*]})"
  echo "total: $(counts "$log" "$log4")"
fi

smoke="${VIDPIPE_COMPOSE_SMOKE:-}"
if [ -z "$smoke" ] && [ "${CI:-}" = true ]; then smoke=1; fi
if [ "$smoke" = 1 ]; then
  # Compose v2, what users type (`docker compose`): the whole smoke test.
  compose_v2=$(tests/rabbitmq4/node.sh compose-v2) || status=1
  COMPOSE=$compose_v2 BIN_DIR=target/debug tests/compose/smoke.sh || status=$?
  # Compose v1.29 (Debian 12's docker-compose): the same file still starts healthy.
  COMPOSE=docker-compose SMOKE_SCOPE=up BIN_DIR=target/debug tests/compose/smoke.sh || status=$?
else
  echo "compose smoke test skipped (runs in CI, or with VIDPIPE_COMPOSE_SMOKE=1)"
fi
exit "$status"
