#!/usr/bin/env bash
# make-secrets.sh: the files this overlay's secretGenerator reads, in ./secrets/ (never
# committed: .gitignore excludes it). Run it before `kubectl apply -k` of this directory.
#
#   VIDPIPE_S3_ACCESS_KEY_ID=… VIDPIPE_S3_SECRET_ACCESS_KEY=… \
#     deploy/kubernetes/overlays/example/make-secrets.sh [--namespace vidpipe]
#
# The broker users, passwords and definitions are made exactly as for compose, by
# docker/secrets.sh and the task registry (`producer tasks --broker-users`,
# `--broker-definitions`): a random password per role (or VIDPIPE_<ROLE>_PASSWORD), kept
# on later runs in secrets/state/; the broker gets salted hashes only. Then, per role, the
# password URL-encoded:
#   secrets/<role>.amqp-urls             the three broker nodes, for amqp.urls
#   secrets/<role>.amqp-url              the broker's Service, for KEDA (one URL)
#                                        role = producer transcoder thumbnailer ops
#   secrets/s3-access-key-id, secrets/s3-secret-access-key   (from the environment)
#   secrets/definitions.json             users, vhost, permissions for the broker
# Names are full (….NAMESPACE.svc): KEDA's operator resolves them from its own namespace.
# The nodes are the operator's pods, vidpipe-rabbitmq-server-N.vidpipe-rabbitmq-nodes
# (N = 0 1 2, the RabbitmqCluster's replicas), each role starting at another node so
# that connections spread over the three; a worker whose node goes tries the next at once.
#
# Needs the producer binary: $VIDPIPE_PRODUCER_BIN, else `producer` on PATH, else this
# checkout's target/release or target/debug. Prints no secret.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
namespace=vidpipe
while [ $# -gt 0 ]; do
  case $1 in
    --namespace) namespace=$2; shift 2 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "make-secrets: unknown argument $1" >&2; exit 2 ;;
  esac
done
die() { echo "make-secrets: $*" >&2; exit 1; }

producer=${VIDPIPE_PRODUCER_BIN:-}
if [ -z "$producer" ]; then
  for p in "$(command -v producer || true)" "$repo/target/release/producer" "$repo/target/debug/producer"; do
    if [ -n "$p" ] && [ -x "$p" ]; then producer=$p; break; fi
  done
fi
[ -n "$producer" ] || die "no producer binary: build it (cargo build -p producer) or set VIDPIPE_PRODUCER_BIN"
[ -n "${VIDPIPE_S3_ACCESS_KEY_ID:-}" ] && [ -n "${VIDPIPE_S3_SECRET_ACCESS_KEY:-}" ] ||
  die "set VIDPIPE_S3_ACCESS_KEY_ID and VIDPIPE_S3_SECRET_ACCESS_KEY (the workers' and producer's S3 keys)"

out=$here/secrets
state=$out/state
umask 077
mkdir -p "$out"
roles=()
while IFS=$'\t' read -r role _; do roles+=("$role"); done < <("$producer" tasks --broker-users)
[ ${#roles[@]} -gt 0 ] || die "$producer listed no broker roles"
for d in "${roles[@]}" minio rabbitmq; do mkdir -p "$state/$d"; done

# The compose stack's own tool: passwords (kept, from the environment, or new) and the
# definitions with their hashes.
VIDPIPE_SECRETS_ROOT=$state VIDPIPE_PRODUCER_BIN=$producer "$repo/docker/secrets.sh" init >/dev/null

# shellcheck source=docker/vidpipe-lib.sh
. "$repo/docker/vidpipe-lib.sh"
put() { printf '%s' "$2" >"$out/$1.tmp" && mv -f "$out/$1.tmp" "$out/$1"; }
replicas=3
first=0
for role in "${roles[@]}"; do
  user=$(<"$state/$role/amqp-user")
  password=$(<"$state/$role/amqp-password")
  login="amqp://$(urlencode "$user"):$(urlencode "$password")"
  put "$role.amqp-url" "$login@vidpipe-rabbitmq.$namespace.svc:5672/%2f"
  urls=()
  for ((i = 0; i < replicas; i++)); do
    node=$(((first + i) % replicas))
    urls+=("$login@vidpipe-rabbitmq-server-$node.vidpipe-rabbitmq-nodes.$namespace.svc:5672/%2f")
  done
  put "$role.amqp-urls" "$(IFS=,; echo "${urls[*]}")"
  first=$(((first + 1) % replicas))
done
put s3-access-key-id "$VIDPIPE_S3_ACCESS_KEY_ID"
put s3-secret-access-key "$VIDPIPE_S3_SECRET_ACCESS_KEY"
cp "$state/rabbitmq/definitions.json" "$out/definitions.json"
echo "make-secrets: wrote $out (roles: ${roles[*]}; namespace $namespace)"
