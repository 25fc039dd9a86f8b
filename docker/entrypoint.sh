#!/bin/bash
# vidpipe-entrypoint COMMAND [ARG…]: the vidpipe images' entrypoint (under tini). Fills in
# the credentials that docker-compose.yml leaves to the generated secrets, then execs
# COMMAND. Outside compose (no secrets mounted) it changes nothing.
#
# - VIDPIPE__AMQP__URL unset or empty and $VIDPIPE_SECRETS_DIR/amqp-user and amqp-password
#   present (the role's secrets volume, written by vidpipe-secrets): the URL becomes
#   amqp://<user>:<password>@$VIDPIPE_AMQP_ADDR/%2f (default rabbitmq:5672), user and
#   password percent-encoded. A URL given explicitly (VIDPIPE_<ROLE>_AMQP_URL in compose)
#   wins.
# - With VIDPIPE__STORAGE__BACKEND=s3 and VIDPIPE__STORAGE__S3__SECRET_ACCESS_KEY unset or
#   empty: the secret key from $VIDPIPE_SECRETS_DIR/s3-secret-access-key.
#
# Nothing here prints a secret.
set -euo pipefail
secrets=${VIDPIPE_SECRETS_DIR:-/run/vidpipe-secrets}

die() { echo "vidpipe-entrypoint: $*" >&2; exit 1; }

# urlencode, shared with the other image script.
# shellcheck source=docker/vidpipe-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/vidpipe-lib.sh"

# read_secret NAME: the file's content in $REPLY; 1 if the file does not exist.
read_secret() {
  [ -e "$secrets/$1" ] || return 1
  [ -r "$secrets/$1" ] || die "cannot read $secrets/$1 (running as uid $(id -u); the secrets volume belongs to uid 10001)"
  REPLY=$(<"$secrets/$1")
  [ -n "$REPLY" ] || die "$secrets/$1 is empty"
}

# An empty value (compose passes `${VAR:-}` through) counts as unset.
for var in VIDPIPE__AMQP__URL VIDPIPE__STORAGE__S3__SECRET_ACCESS_KEY; do
  [ -n "${!var:-}" ] || unset "$var"
done

if [ -z "${VIDPIPE__AMQP__URL:-}" ] && read_secret amqp-user; then
  user=$REPLY
  read_secret amqp-password || die "$secrets/amqp-user without amqp-password"
  VIDPIPE__AMQP__URL="amqp://$(urlencode "$user"):$(urlencode "$REPLY")@${VIDPIPE_AMQP_ADDR:-rabbitmq:5672}/%2f"
  export VIDPIPE__AMQP__URL
fi

if [ "${VIDPIPE__STORAGE__BACKEND:-}" = s3 ] && [ -z "${VIDPIPE__STORAGE__S3__SECRET_ACCESS_KEY:-}" ] &&
  read_secret s3-secret-access-key; then
  export VIDPIPE__STORAGE__S3__SECRET_ACCESS_KEY="$REPLY"
fi

unset REPLY user var
[ $# -gt 0 ] || die "no command given"
exec "$@"
