#!/bin/bash
# vidpipe-secrets: the credentials of the docker-compose stack, made on its first start.
# Installed in the vidpipe image as /usr/local/bin/vidpipe-secrets; the compose service
# `secrets` runs `init` at every `up`, before the broker starts.
#
#   vidpipe-secrets init          make what is missing, apply the environment, write the
#                                 broker's definitions
#   vidpipe-secrets show ROLE     print ROLE's password (the only command that prints one)
#   vidpipe-secrets rotate ROLE   a new random password for ROLE, and new definitions
#
# ROLE: producer, transcoder, thumbnailer, ops (RabbitMQ users vidpipe-ROLE) or minio
# (the root secret of the `s3` profile's MinIO, also the workers' S3 secret key). The
# RabbitMQ roles and their permissions come from the task registry, through the image's
# producer binary (`producer tasks --broker-users`, `--broker-definitions`).
#
# A password comes from VIDPIPE_<ROLE>_PASSWORD (VIDPIPE_S3_SECRET_ACCESS_KEY for minio)
# when that is set, else it is kept from an earlier start, else it is generated: 24 bytes
# of /dev/urandom, base64url (32 characters). So a second `up` keeps the passwords.
#
# Layout under $VIDPIPE_SECRETS_ROOT (default /secrets); each directory is its own docker
# volume, mounted read-only into only the containers that need it:
#   <role>/amqp-user, <role>/amqp-password     role = producer transcoder thumbnailer ops
#   <role>/s3-secret-access-key                for the workers with docker/compose.s3.yml
#   minio/s3-access-key-id, minio/s3-secret-access-key, minio/mc-host (MC_HOST_ URL)
#   rabbitmq/definitions.json                  users with salted SHA-256 password hashes
#                                              (no password in clear), vhost, permissions
# Secret files are mode 0600, owned by the uid this runs as (the image's vidpipe, 10001),
# their directories 0700; definitions.json is 0644 (read by the broker's own user).
set -euo pipefail
umask 077
root=${VIDPIPE_SECRETS_ROOT:-/secrets}
producer=${VIDPIPE_PRODUCER_BIN:-producer}

die() { echo "vidpipe-secrets: $*" >&2; exit 1; }

# The RabbitMQ roles, in the registry's order (producer, one per worker role, ops).
roles_out=$("$producer" tasks --broker-users) || die "cannot list the broker roles with $producer"
amqp_roles=()
while IFS=$'\t' read -r role _; do amqp_roles+=("$role"); done <<<"$roles_out"
[ ${#amqp_roles[@]} -gt 0 ] || die "$producer listed no broker roles"
say() { echo "vidpipe-secrets: $*"; }

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

# put FILE MODE VALUE: FILE holds exactly VALUE (no newline), replaced atomically.
put() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  printf '%s' "$3" >"$tmp"
  chmod "$2" "$tmp"
  mv -f "$tmp" "$1"
}

new_password() { head -c 24 /dev/urandom | base64 -w0 | tr '+/' '-_'; }

check_value() { # name value
  [[ $2 != *[[:cntrl:]]* ]] || die "$1 contains a control character"
}

env_var() { # role → the variable that sets its password
  if [ "$1" = minio ]; then echo VIDPIPE_S3_SECRET_ACCESS_KEY; else echo "VIDPIPE_${1^^}_PASSWORD"; fi
}

password_file() { # role
  if [ "$1" = minio ]; then echo "$root/minio/s3-secret-access-key"; else echo "$root/$1/amqp-password"; fi
}

check_role() {
  local r
  for r in "${amqp_roles[@]}" minio; do [ "$1" = "$r" ] && return 0; done
  die "unknown role '$1' (${amqp_roles[*]} minio)"
}

check_dirs() {
  local d
  for d in "${amqp_roles[@]}" minio rabbitmq; do
    [ -d "$root/$d" ] && [ -w "$root/$d" ] ||
      die "$root/$d is not a directory this user (uid $(id -u)) may write; mount the secrets volumes (see docker-compose.yml)"
  done
}

# ensure ROLE: its password file holds the environment's value, or any earlier one, or a
# new one.
ensure() {
  local var file value
  var=$(env_var "$1")
  file=$(password_file "$1")
  value=${!var:-}
  if [ -n "$value" ]; then
    check_value "$var" "$value"
    if [ ! -f "$file" ] || [ "$(<"$file")" != "$value" ]; then
      put "$file" 600 "$value"
      say "$1: password set from $var"
    fi
  elif [ ! -s "$file" ]; then
    put "$file" 600 "$(new_password)"
    say "$1: password generated"
  fi
}

# urlencode, shared with the other image script.
# shellcheck source=docker/vidpipe-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/vidpipe-lib.sh"

hex2bin() { printf "$(printf '%s' "$1" | sed 's/../\\x&/g')"; }

# RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), a
# random 4-byte salt. The password goes through builtins only (never a command line).
password_hash() {
  local salt digest
  salt=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
  digest=$({ hex2bin "$salt"; printf '%s' "$1"; } | sha256sum | cut -c1-64)
  { hex2bin "$salt"; hex2bin "$digest"; } | base64 -w0
}

# Users, vhost and permissions: those of scripts/rabbitmq-users.sh (no topology prefix),
# from the task registry with @ROLE@ where each password hash goes. No user may configure
# the work topology but vidpipe-ops, which declares it once (the service `topology`); the
# producer may create only its own server-named event queues.
write_definitions() {
  local template json role h
  template=$("$producer" tasks --broker-definitions) || die "cannot make the broker definitions with $producer"
  json=$template
  for role in "${amqp_roles[@]}"; do
    h=$(password_hash "$(<"$(password_file "$role")")")
    json=${json//@$role@/$h}
  done
  put "$root/rabbitmq/definitions.json" 644 "$json"
}

init() {
  local role s3_user s3_secret
  check_dirs
  chmod 700 "${amqp_roles[@]/#/$root/}" "$root/minio"
  chmod 755 "$root/rabbitmq"
  for role in "${amqp_roles[@]}"; do
    ensure "$role"
    [ "$(cat "$root/$role/amqp-user" 2>/dev/null)" = "vidpipe-$role" ] || put "$root/$role/amqp-user" 600 "vidpipe-$role"
  done
  ensure minio
  s3_user=${VIDPIPE_S3_ACCESS_KEY_ID:-vidpipe}
  check_value VIDPIPE_S3_ACCESS_KEY_ID "$s3_user"
  s3_secret=$(<"$root/minio/s3-secret-access-key")
  put "$root/minio/s3-access-key-id" 600 "$s3_user"
  put "$root/minio/mc-host" 600 "http://$(urlencode "$s3_user"):$(urlencode "$s3_secret")@minio:9000"
  for role in "${amqp_roles[@]}"; do
    put "$root/$role/s3-secret-access-key" 600 "$s3_secret"
  done
  write_definitions
  say "secrets ready (read one with: docker compose run --rm secrets show ROLE)"
}

cmd=${1:-init}
case "$cmd" in
  init)
    [ $# -le 1 ] || die "init takes no argument"
    init
    ;;
  show)
    [ $# -eq 2 ] || die "usage: vidpipe-secrets show ROLE"
    check_role "$2"
    file=$(password_file "$2")
    [ -s "$file" ] || die "no password for $2 yet (start the stack once: docker compose up -d)"
    printf '%s\n' "$(<"$file")"
    ;;
  rotate)
    [ $# -eq 2 ] || die "usage: vidpipe-secrets rotate ROLE"
    check_role "$2"
    var=$(env_var "$2")
    [ -z "${!var:-}" ] || die "$var is set, so it decides $2's password: change it there instead"
    check_dirs
    put "$(password_file "$2")" 600 "$(new_password)"
    say "$2: new password generated"
    init
    ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
