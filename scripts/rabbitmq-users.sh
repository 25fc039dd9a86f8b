#!/usr/bin/env bash
# Least-privilege RabbitMQ users for vidpipe, on a plain RabbitMQ (run where rabbitmqctl
# works, as root or the rabbitmq user). Idempotent: re-running updates permissions.
#
#   scripts/rabbitmq-users.sh [--vhost VHOST] [--prefix PREFIX] [--suffix SUFFIX]
#
# --prefix matches the settings' topology.prefix; --suffix is appended to every user
# name (tests use it to make private users).
#
# Users (passwords from the environment, or generated and printed once):
#   vidpipe-producer     VIDPIPE_PRODUCER_PASSWORD     publish to video_tasks, read video_events
#   vidpipe-transcoder   VIDPIPE_TRANSCODER_PASSWORD   consume video_tasks.transcode; publish to
#                                                      retry tiers, video_tasks.dead, video_events
#   vidpipe-thumbnailer  VIDPIPE_THUMBNAILER_PASSWORD  the same for video_tasks.thumbnail
#   vidpipe-ops          VIDPIPE_OPS_PASSWORD          declares the topology, administers dead
#                                                      letters (producer dead …), management UI
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
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
done

# The prefix as a regular expression (dots are literal).
p=$(printf '%s' "$prefix" | sed 's/[.[\*^$()+?{|]/\\&/g')

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

ensure_user "vidpipe-producer$suffix" "$(password VIDPIPE_PRODUCER_PASSWORD vidpipe-producer)" ""
# Its own exclusive, server-named event queues (amq.gen-*) are all it may create.
rabbitmqctl -q set_permissions -p "$vhost" "vidpipe-producer$suffix" \
  '^amq\.gen-.*$' "^(${p}video_tasks|amq\\.gen-.*)\$" "^(${p}video_events|amq\\.gen-.*)\$"

for task in transcode thumbnail; do
  user="vidpipe-${task}r"
  [ "$task" = thumbnail ] && user=vidpipe-thumbnailer
  var="VIDPIPE_$(echo "${user#vidpipe-}" | tr a-z A-Z)_PASSWORD"
  ensure_user "$user$suffix" "$(password "$var" "$user")" ""
  rabbitmqctl -q set_permissions -p "$vhost" "$user$suffix" \
    '^$' "^(${p}video_tasks\\.retry\\..*|${p}video_tasks\\.dead|${p}video_events)\$" "^${p}video_tasks\\.${task}\$"
done

ensure_user "vidpipe-ops$suffix" "$(password VIDPIPE_OPS_PASSWORD vidpipe-ops)" "management"
rabbitmqctl -q set_permissions -p "$vhost" "vidpipe-ops$suffix" \
  "^(${p}video_tasks.*|${p}video_events|amq\\.gen-.*)\$" "^(${p}video_tasks.*|${p}video_events|amq\\.gen-.*)\$" "^(${p}video_tasks.*|${p}video_events|amq\\.gen-.*)\$"
echo "vidpipe users ready on vhost $vhost${prefix:+ (prefix $prefix)}"
