#!/usr/bin/env bash
# Least-privilege RabbitMQ users for vidpipe, on a plain RabbitMQ (run where rabbitmqctl
# works, as root or the rabbitmq user). Idempotent: re-running updates permissions.
#
#   scripts/rabbitmq-users.sh [--vhost VHOST] [--prefix PREFIX] [--suffix SUFFIX]
#
# --prefix matches the settings' topology.prefix; --suffix is appended to every user
# name (tests use it to make private users).
#
# Users (passwords from VIDPIPE_<ROLE>_PASSWORD, or generated and printed once), as the
# task registry derives them (`producer tasks --broker-users` prints them; this script only
# applies them, so a new task kind's worker user comes with its registration):
#   vidpipe-producer     publish to video_tasks, read video_events
#   vidpipe-<worker>     one per worker role (transcoder, thumbnailer): consume its task's
#                        queue; publish to retry tiers, video_tasks.dead, video_events
#   vidpipe-ops          declares the topology, administers dead letters, management UI
# The producer binary is $VIDPIPE_PRODUCER_BIN, else `producer` on PATH, else this
# checkout's target/release or target/debug build.
# None of them may configure the work topology: run the workers and the producer with
# VIDPIPE__TOPOLOGY__DECLARE=false, and declare it once as vidpipe-ops:
#   VIDPIPE__AMQP__URL=amqp://vidpipe-ops:…@host/%2f transcoder --declare-topology
set -euo pipefail

vhost=/
prefix=""
suffix=""
while [ $# -gt 0 ]; do
  case "$1" in
    --vhost) vhost="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --suffix) suffix="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

producer_bin() {
  local here candidate
  if [ -n "${VIDPIPE_PRODUCER_BIN:-}" ]; then printf '%s' "$VIDPIPE_PRODUCER_BIN"; return; fi
  if command -v producer >/dev/null 2>&1; then command -v producer; return; fi
  here=$(cd "$(dirname "$0")/.." && pwd)
  for candidate in "$here/target/release/producer" "$here/target/debug/producer"; do
    if [ -x "$candidate" ]; then printf '%s' "$candidate"; return; fi
  done
  echo "no producer binary: set VIDPIPE_PRODUCER_BIN, put producer on PATH or build it (cargo build -p producer)" >&2
  exit 1
}

ensure_user() { # name password tags
  if rabbitmqctl -q list_users | awk '{print $1}' | grep -qx "$1"; then
    rabbitmqctl -q change_password "$1" "$2" >/dev/null
  else
    rabbitmqctl -q add_user "$1" "$2" >/dev/null
  fi
  rabbitmqctl -q set_user_tags "$1" $3 >/dev/null
}

password() { # env-var-name user
  local value="${!1:-}"
  if [ -z "$value" ]; then
    value=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    echo "$2 password: $value" >&2
  fi
  printf '%s' "$value"
}

# One line per user: role, configure, write and read regexes (already for this prefix),
# tags. None but ops may configure the work topology; the producer may create only its own
# server-named event queues (amq.gen-*).
producer=$(producer_bin)
roles=$("$producer" tasks --broker-users --prefix "$prefix")
# Read from fd 3: rabbitmqctl must not swallow the lines on stdin.
while IFS=$'\t' read -r -u 3 role configure write read tags; do
  ensure_user "vidpipe-$role$suffix" "$(password "VIDPIPE_${role^^}_PASSWORD" "vidpipe-$role")" "$tags"
  rabbitmqctl -q set_permissions -p "$vhost" "vidpipe-$role$suffix" "$configure" "$write" "$read"
done 3<<<"$roles"
echo "vidpipe users ready on vhost $vhost${prefix:+ (prefix $prefix)}"
