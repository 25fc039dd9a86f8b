#!/usr/bin/env bash
# The docker-compose smoke test: the real docker-compose.yml, real images, real broker.
#
#   tests/compose/smoke.sh            (as root, or with sudo available; Debian 12)
#
# Offline-safe (see the team's COMPOSE-CI notes): it never pulls. It
#   1. installs docker.io, docker-compose, debootstrap and ffmpeg with apt-get if missing
#      and starts dockerd if it is not running;
#   2. makes debian:bookworm-slim with debootstrap if the image is absent (cached as a
#      `docker save` tarball under $VIDPIPE_CACHE_DIR, default /var/cache/vidpipe);
#   3. builds the release binaries on the host (or takes them from $BIN_DIR) and the
#      runtime image from them (docker/Dockerfile.prebuilt), and the RabbitMQ 4.x image of
#      docker/rabbitmq/ FROM the trixie rootfs of tests/rabbitmq4/node.sh (RabbitMQ 4.0.5)
#      unless $VIDPIPE_RABBITMQ_IMAGE names one that exists locally (rabbitmq:4-management
#      is used when it is already there);
#   4. with a private compose project: no fixed password in the repository; `up -d`
#      until healthy; the generated secrets (one volume per role, modes, definitions with
#      hashes only); every vidpipe container contained (uid 10001, read-only root
#      filesystem, no capabilities, no-new-privileges) and the broker not root;
#      `--scale transcoder=3` and three consumers on video_tasks.transcode;
#      `run --rm producer upload … --wait` of a generated clip and its outputs on the
#      media volume; `docker stop` of the transcoder busy with a longer job (short
#      shutdown grace, so the job is cancelled and requeued) and that job completing on
#      the other transcoders, nothing dead; `stop` of the whole project with every worker
#      exiting 0; a second `up -d` (broker restarted, VIDPIPE_OPS_PASSWORD now given):
#      the other passwords unchanged, ops' from the environment, everyone still gets in
#      (topology, workers, an upload);
#   5. `down -v` on exit, whatever happened.
#
# Environment: BIN_DIR (prebuilt producer/transcoder/thumbnailer), IMAGE (a local vidpipe
# image to test instead, e.g. one built from the Dockerfile), VIDPIPE_RABBITMQ_IMAGE,
# VIDPIPE_CACHE_DIR, COMPOSE (the compose command; default docker-compose, else
# `docker compose`; the test command gives Compose v2's binary from
# `tests/rabbitmq4/node.sh compose-v2`), SMOKE_SCOPE=up (only `up -d` until healthy and
# the secrets checks, then `down -v`), KEEP=1 (leave the project up for a look; prints how
# to remove it).
# Exit code 0 when every check passed.
set -euo pipefail
# A command that ends the script under set -e says which one it was.
trap 'echo "smoke: line $LINENO failed: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/../.."
root=$PWD
t0=$(date +%s)

say() { printf '\033[1msmoke [%3ss]:\033[0m %s\n' "$(($(date +%s) - t0))" "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

results=()
failed=0
pass() { results+=("PASS  $1"); say "PASS: $1"; }
fail() { results+=("FAIL  $1"); say "FAIL: $1"; failed=1; }
summary() {
  echo
  echo "==== compose smoke test: $(($(date +%s) - t0)) s ===="
  for r in "${results[@]}"; do echo "  $r"; done
  if [ "$failed" = 0 ] && [ ${#results[@]} -gt 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
}
# A failed precondition ends the test (the summary still prints from the exit trap).
die() { fail "$1"; exit 1; }

# --- 1. packages and the engine ------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -n "${COMPOSE:-}" ]; then
  read -r -a compose_cmd <<<"$COMPOSE"
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  compose_cmd=(docker compose)
fi
docker_ok() { docker info >/dev/null 2>&1; }
if ! docker_ok; then
  say "starting dockerd (log: /tmp/vidpipe-dockerd.log)"
  as_root setsid dockerd >/tmp/vidpipe-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do docker_ok && break; sleep 1; done
  docker_ok || { echo "dockerd did not come up; see /tmp/vidpipe-dockerd.log" >&2; exit 1; }
fi
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# --- 2. the base image ----------------------------------------------------------------------
cache="${VIDPIPE_CACHE_DIR:-/var/cache/vidpipe}"
base_tar="$cache/debian-bookworm-slim.tar"
if ! have_image debian:bookworm-slim; then
  if [ -s "$base_tar" ]; then
    say "loading debian:bookworm-slim from $base_tar"
    docker load -q -i "$base_tar" >/dev/null
  else
    say "making debian:bookworm-slim with debootstrap (about a minute, once)"
    rootfs=$(mktemp -d /var/tmp/vidpipe-rootfs.XXXXXX)
    sources=/etc/apt/sources.list.d/debian.sources
    mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources")
    as_root debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/tmp/vidpipe-debootstrap.log 2>&1 \
      || { echo "debootstrap failed; see /tmp/vidpipe-debootstrap.log" >&2; exit 1; }
    as_root mkdir -p "$rootfs/etc/apt/sources.list.d"
    as_root cp "$sources" "$rootfs/etc/apt/sources.list.d/"
    as_root rm -rf "$rootfs/etc/apt/sources.list" "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
      "$rootfs"/usr/share/locale/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
      "$rootfs"/var/cache/apt/archives/*.deb
    as_root tar --numeric-owner -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    as_root rm -rf "$rootfs"
    as_root mkdir -p "$cache"
    as_root docker save -o "$base_tar" debian:bookworm-slim
  fi
fi

# --- 3. binaries and images -----------------------------------------------------------------
work=$(mktemp -d /tmp/vidpipe-smoke.XXXXXX)
if [ -n "${IMAGE:-}" ]; then
  # A ready vidpipe image (e.g. built from the Dockerfile): no host binaries needed.
  have_image "$IMAGE" || { echo "IMAGE=$IMAGE is not a local image (this test never pulls)" >&2; exit 1; }
  image=$IMAGE
else
  bins=(producer transcoder thumbnailer)
  if [ -n "${BIN_DIR:-}" ]; then
    bin_dir=$BIN_DIR
  else
    bin_dir=$root/target/release
    say "building the release binaries (cargo build --release; minutes when cold)"
    cargo build --release -q -p producer -p transcoder -p thumbnailer
  fi
  for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "no $bin_dir/$b (set BIN_DIR or build first)" >&2; exit 1; }
  done
  image=vidpipe:smoke
  say "building $image from $bin_dir (docker/Dockerfile.prebuilt)"
  mkdir -p "$work/context/bin"
  cp "${bins[@]/#/$bin_dir/}" "$work/context/bin/"
  cp docker/entrypoint.sh docker/secrets.sh docker/vidpipe-lib.sh "$work/context/"
  docker build -q -f docker/Dockerfile.prebuilt -t "$image" "$work/context" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; exit 1; }
fi

rabbit_image=${VIDPIPE_RABBITMQ_IMAGE:-}
if [ -n "$rabbit_image" ]; then
  have_image "$rabbit_image" || { echo "VIDPIPE_RABBITMQ_IMAGE=$rabbit_image is not a local image (this test never pulls)" >&2; exit 1; }
elif have_image rabbitmq:4-management; then
  rabbit_image=rabbitmq:4-management
else
  # RabbitMQ 4.x like the official image users get: docker/rabbitmq/Dockerfile built FROM
  # the trixie root filesystem of the 4.x test node (tests/rabbitmq4/node.sh: debootstrap,
  # cached; rabbitmq-server 4.0.5 already in it), imported as a local image. Nothing is
  # pulled or downloaded once the rootfs exists.
  rabbit_image=vidpipe-rabbitmq:4-trixie
  rootfs=$(tests/rabbitmq4/node.sh rootfs)
  rabbit_base="vidpipe-trixie-rabbitmq:$(cat "$rootfs/.vidpipe-rootfs-ready")"
  if ! have_image "$rabbit_base"; then
    say "importing $rootfs as $rabbit_base"
    # Without the test node's own state (data, logs, cookie, a mounted /proc).
    as_root tar --numeric-owner -C "$rootfs" --exclude='./proc/*' --exclude=./var/lib/rabbitmq/mnesia \
      --exclude=./var/lib/rabbitmq/.erlang.cookie --exclude='./var/log/rabbitmq/*' \
      --exclude='./tmp/*' --exclude=./.vidpipe-rootfs-ready -c . |
      docker import -c 'CMD ["bash"]' - "$rabbit_base" >/dev/null
  fi
  say "building $rabbit_image FROM $rabbit_base (docker/rabbitmq)"
  docker build -q --build-arg BASE="$rabbit_base" -t "$rabbit_image" docker/rabbitmq >"$work/build-rabbitmq.log" 2>&1 \
    || { cat "$work/build-rabbitmq.log" >&2; exit 1; }
fi

# --- 4. the compose project -----------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export COMPOSE_PROJECT_NAME="vpsmoke$$"
export COMPOSE_FILE="$root/docker-compose.yml"
export VIDPIPE_IMAGE=$image
export VIDPIPE_RABBITMQ_IMAGE=$rabbit_image
export VIDPIPE_AMQP_PORT; VIDPIPE_AMQP_PORT=$(free_port)
export VIDPIPE_MANAGEMENT_PORT; VIDPIPE_MANAGEMENT_PORT=$(free_port)
export VIDPIPE_INPUT_DIR="$work/input"
export VIDPIPE_LOG_FORMAT=json
# A stopped transcoder gives its job 2 s, then cancels and requeues it.
export VIDPIPE_TRANSCODER_SHUTDOWN_GRACE_SECS=2
compose() { "${compose_cmd[@]}" --project-directory "$root" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ "$failed" != 0 ] || [ "$rc" != 0 ]; then
    echo "---- last log lines of the workers ----"
    compose logs --no-color --tail=12 topology transcoder thumbnailer 2>&1 | tail -n 80
    echo "---- video_tasks.dead ----"
    compose run --rm -T --no-deps ops dead list 2>&1 | tail -n 20
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    say "KEEP=1: project $COMPOSE_PROJECT_NAME left up; remove it with:"
    echo "  COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME ${compose_cmd[*]} -f $COMPOSE_FILE down -v"
  else
    compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1
  fi
  rm -rf "$work"
  [ "$rc" != 0 ] && failed=1
  summary
  [ "$failed" = 0 ] || exit 1
}
trap cleanup EXIT

# Test clips, readable by the container user (uid 10001).
mkdir -p "$work/input"
clip() { # name seconds size
  ffmpeg -loglevel error -y -f lavfi -i "testsrc=duration=$2:size=$3:rate=25" \
    -f lavfi -i "sine=frequency=440:duration=$2" -c:v libx264 -preset ultrafast -pix_fmt yuv420p \
    -c:a aac -shortest "$work/input/$1"
}
clip short.mp4 4 320x240
# The long clip only serves the stop-a-busy-transcoder check (not in SMOKE_SCOPE=up).
[ "${SMOKE_SCOPE:-all}" = up ] || clip long.mp4 "${LONG_CLIP_SECS:-60}" "${LONG_CLIP_SIZE:-1280x720}"
chmod 755 "$work" "$work/input"; chmod 644 "$work"/input/*.mp4

ids() { compose ps -q "$1" 2>/dev/null; }
# Running containers of a service (Compose v1's `ps -q` also lists stopped ones).
running() {
  docker ps -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.service=$1"
}
# Every container of a service, exited ones too (one-shot services).
all_ids() {
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.service=$1"
}
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null; }
# all_healthy SERVICE COUNT: COUNT containers of SERVICE, every one healthy.
all_healthy() {
  local n=0 c
  for c in $(ids "$1"); do
    [ "$(health "$c")" = healthy ] || return 1
    n=$((n + 1))
  done
  [ "$n" -ge "$2" ]
}
wait_until() { # seconds command…
  local deadline=$(($(date +%s) + $1)); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 1
  done
}
rabbitmqctl() { compose exec -T rabbitmq rabbitmqctl -q "$@" 2>/dev/null | tr -d '\r'; }
consumers() { rabbitmqctl list_consumers queue_name | grep -cx "$1" || true; }
# In the media volume, through a running transcoder (no extra container).
on_volume() { docker exec "$(running transcoder | head -n 1)" "$@"; }
manifests_done() { # job_id
  on_volume test -f "/data/outputs/$1/transcode/manifest.json" &&
    on_volume test -f "/data/outputs/$1/thumbnail/manifest.json"
}
# outputs_ok JOB_ID: both manifests parse and every output they list exists, non-empty.
outputs_ok() {
  local task keys missing_keys
  for task in transcode thumbnail; do
    keys=$(on_volume cat "/data/outputs/$1/$task/manifest.json" |
      python3 -c 'import json,sys; m=json.load(sys.stdin); o=m["outputs"]; assert o; print("\n".join(x["key"] for x in o))') || return 1
    # One exec for all keys: prints the missing or empty ones.
    missing_keys=$(on_volume sh -c 'for k; do [ -s "/data/$k" ] || echo "$k"; done' sh $keys)
    [ -z "$missing_keys" ] || { echo "missing or empty outputs: $missing_keys" >&2; return 1; }
    say "$task: $(echo "$keys" | wc -l) outputs, e.g. $(echo "$keys" | head -n 3 | tr '\n' ' ')"
  done
}
dead_count() { rabbitmqctl list_queues name messages | awk '$1 == "video_tasks.dead" {print $2}'; }

say "project $COMPOSE_PROJECT_NAME, images $image + $rabbit_image, compose: ${compose_cmd[*]}"
# No fixed password left in the repository (the old ones were <role>-dev-… and vidpipe-dev-…).
fixed=$(grep -rnE --exclude-dir=.git --exclude-dir=target 'dev-(password|secret)' "$root" || true)
if [ -z "$fixed" ]; then
  pass "no fixed password in the repository"
else
  echo "$fixed" >&2
  fail "fixed passwords still in the repository"
fi
t_up=$(date +%s)
compose up -d --no-build >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; die "compose up -d"; }
if wait_until 180 all_healthy rabbitmq 1 && wait_until 120 all_healthy transcoder 1 && wait_until 120 all_healthy thumbnailer 1; then
  pass "up -d: rabbitmq, transcoder, thumbnailer healthy ($(($(date +%s) - t_up)) s)"
else
  die "up -d: services not healthy within the time limit"
fi

# --- secrets: generated on the first start, one volume per role, no password in clear ---
# Prints "<dir>/<file> <mode> <uid> <sha256>" per file (digests, never the passwords).
secrets_digests() {
  compose run --rm -T --no-deps --entrypoint bash secrets -c \
    'cd /secrets && for f in */*; do printf "%s %s %s\n" "$f" "$(stat -c "%a %u" "$f")" "$(sha256sum <"$f" | cut -c1-64)"; done'
}
secrets_ok() { # digests file
  local role bad=""
  for role in producer transcoder thumbnailer ops; do
    grep -Eq "^$role/amqp-password 600 10001 [0-9a-f]{64}\$" "$1" || bad="$bad $role/amqp-password"
    grep -Eq "^$role/amqp-user 600 10001 " "$1" || bad="$bad $role/amqp-user"
  done
  grep -Eq "^minio/s3-secret-access-key 600 10001 " "$1" || bad="$bad minio/s3-secret-access-key"
  grep -Eq "^rabbitmq/definitions.json 644 10001 " "$1" || bad="$bad rabbitmq/definitions.json"
  # Four different passwords.
  [ "$(grep -E '^[a-z]+/amqp-password ' "$1" | awk '{print $4}' | sort -u | wc -l)" = 4 ] || bad="$bad (passwords not distinct)"
  [ -z "$bad" ] || { echo "secrets missing or with wrong mode/owner:$bad" >&2; cat "$1" >&2; return 1; }
}
definitions_ok() { # the broker's users: salted hashes only, no guest
  compose exec -T rabbitmq cat /run/vidpipe-definitions/definitions.json | python3 -c '
import json, sys
d = json.load(sys.stdin)
users = sorted(u["name"] for u in d["users"])
assert users == ["vidpipe-ops", "vidpipe-producer", "vidpipe-thumbnailer", "vidpipe-transcoder"], users
for u in d["users"]:
    assert set(u) == {"name", "password_hash", "hashing_algorithm", "tags"}, u["name"]
    assert u["hashing_algorithm"] == "rabbit_password_hashing_sha256"
' && [ "$(rabbitmqctl list_users | awk '{print $1}' | grep -c '^vidpipe-')" = 4 ] &&
    ! rabbitmqctl list_users | awk '{print $1}' | grep -qx guest &&
    parking_lot_policy_ok
}
# The definitions' policy holds the parking lot: on RabbitMQ 4.x a parked job looked at
# 20 times (`dead list` returns what it shows) would otherwise be dropped.
parking_lot_policy_ok() {
  local p
  p=$(rabbitmqctl list_queues name policy | awk '$1 == "video_tasks.dead" {print $2}')
  [ "$p" = vidpipe-dead-letters-kept ] || { echo "video_tasks.dead has policy '$p', not vidpipe-dead-letters-kept" >&2; return 1; }
}
if secrets_digests >"$work/secrets.1" 2>"$work/secrets.err" && secrets_ok "$work/secrets.1" && definitions_ok; then
  pass "secrets generated: a password per role (0600, uid 10001, own volume), broker definitions with salted hashes only, 4 users, no guest, the parking lot's policy"
else
  cat "$work/secrets.err" >&2
  fail "generated secrets"
fi

# SMOKE_SCOPE=up: only the start (up -d until healthy, the generated secrets and the
# broker's users), then down: the test command's cheaper second check with Compose v1.
if [ "${SMOKE_SCOPE:-all}" = up ]; then
  say "SMOKE_SCOPE=up: stopping after the start checks"
  exit 0
fi

# --- containment ------------------------------------------------------------------------------
# contained_config CONTAINER: user 10001, read-only root fs, no capabilities, no-new-privileges.
contained_config() {
  local c=$1 conf
  conf=$(docker inspect -f '{{.Config.User}}|{{.HostConfig.ReadonlyRootfs}}|{{.HostConfig.CapDrop}}|{{.HostConfig.SecurityOpt}}' "$c")
  case "$conf" in
    "10001:10001|true|[ALL]|[no-new-privileges:true]") return 0 ;;
    *) echo "$(docker inspect -f '{{.Name}}' "$c"): $conf" >&2; return 1 ;;
  esac
}
# contained_live CONTAINER: every process uid 10001; PID 1 without capabilities and with
# no_new_privs; the root filesystem refuses a write; /data, /tmp writable.
contained_live() {
  local c=$1 out
  [ -z "$(docker top "$c" -eo pid,uid | awk 'NR > 1 && $2 != 10001')" ] ||
    { echo "$c: a process not running as 10001: $(docker top "$c" -eo pid,uid,comm | tail -n +2 | tr '\n' ';')" >&2; return 1; }
  out=$(docker exec "$c" sh -c 'id -u; grep -E "^(CapEff|CapBnd|NoNewPrivs):" /proc/1/status | tr -d "\t"
    touch /usr/local/bin/probe 2>/dev/null && echo rootfs-writable || echo rootfs-ro
    for d in /data /tmp; do f=$d/.probe-$$; touch "$f" && rm -f "$f" && echo "$d-writable"; done' 2>&1)
  [ "$(echo "$out" | tr '\n' ' ')" = "10001 CapEff:0000000000000000 CapBnd:0000000000000000 NoNewPrivs:1 rootfs-ro /data-writable /tmp-writable " ] ||
    { echo "$c: $out" >&2; return 1; }
}
contained=1
for svc in transcoder thumbnailer; do
  for c in $(running "$svc"); do contained_config "$c" && contained_live "$c" || contained=0; done
done
for svc in secrets topology; do
  [ -n "$(all_ids "$svc")" ] || { echo "no $svc container" >&2; contained=0; }
  for c in $(all_ids "$svc"); do contained_config "$c" || contained=0; done
done
# The one-off producer container, with the same settings (its entrypoint replaced by a probe).
# A second try if the one-off container itself could not be run (not a containment
# finding); a wrong answer fails either way.
want_probe="10001 CapBnd:0000000000000000 NoNewPrivs:1 rootfs-ro "
for _ in 1 2; do
  producer_probe=$(compose run --rm -T --no-deps --entrypoint sh producer -c \
    'id -u; grep -E "^(CapBnd|NoNewPrivs):" /proc/self/status | tr -d "\t"; touch /probe 2>/dev/null && echo rootfs-writable || echo rootfs-ro' 2>"$work/probe.err" | tr '\n' ' ') || true
  [ -z "$producer_probe" ] || break
done
[ "$producer_probe" = "$want_probe" ] ||
  { echo "producer: $producer_probe" >&2; cat "$work/probe.err" >&2; contained=0; }
# The broker's own processes (its image decides; neither runs it as root).
# `|| true` and no early `exit` in awk: under `set -e -o pipefail` a failing (or
# SIGPIPEd) pipeline in an assignment would end the script without a FAIL line.
rabbit=$(running rabbitmq | sed -n 1p) || true
beam_uid=$(docker top "$rabbit" -eo pid,uid,comm | awk '$3 ~ /^beam/ && !found++ {print $2}') || true
[ -n "$beam_uid" ] && [ "$beam_uid" != 0 ] || { echo "rabbitmq: beam runs as uid '${beam_uid:-?}'" >&2; contained=0; }
if [ "$contained" = 1 ]; then
  pass "contained: transcoder, thumbnailer, topology, secrets, producer as uid 10001 with a read-only root fs, no capabilities, no-new-privileges; broker as uid $beam_uid"
else
  fail "containment (see above)"
fi

compose up -d --no-build --scale transcoder=3 >"$work/scale.log" 2>&1 || { cat "$work/scale.log" >&2; die "up --scale transcoder=3"; }
if wait_until 120 all_healthy transcoder 3 && [ "$(ids transcoder | wc -l)" -eq 3 ]; then
  pass "--scale transcoder=3: three healthy transcoders"
else
  die "--scale transcoder=3: not three healthy transcoders"
fi
three_consumers() { [ "$(consumers video_tasks.transcode)" -eq 3 ]; }
if wait_until 60 three_consumers; then
  pass "three consumers on video_tasks.transcode, $(consumers video_tasks.thumbnail) on video_tasks.thumbnail"
else
  fail "consumers on video_tasks.transcode: $(consumers video_tasks.transcode), wanted 3"
fi

# Upload through the producer service and wait for both tasks.
say "producer upload short.mp4 --wait"
t_job=$(date +%s)
if compose run --rm -T producer upload short.mp4 --wait --timeout 240 --json >"$work/upload.json" 2>"$work/upload.err"; then
  job=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["job_id"])' <"$work/upload.json")
  pass "upload --wait: job $job completed ($(($(date +%s) - t_job)) s)"
  if outputs_ok "$job"; then pass "outputs on the media volume under outputs/$job/"; else fail "outputs of $job on the volume"; fi
else
  rc=$?
  cat "$work/upload.json" "$work/upload.err" >&2
  fail "upload --wait exited $rc"
fi

# A busy transcoder is stopped: its job must still complete elsewhere.
say "producer upload long.mp4 (no --wait), then stop the transcoder that takes it"
if compose run --rm -T producer upload long.mp4 --json >"$work/long.json" 2>"$work/long.err"; then
  long=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["job_id"])' <"$work/long.json")
  busy=""
  # The only transcoder job now is the long one: find it by the /metrics gauge.
  find_busy() {
    local c
    for c in $(running transcoder); do
      if docker exec "$c" curl -fsS http://127.0.0.1:8080/metrics 2>/dev/null |
        grep -Eq '^vidpipe_jobs_in_flight [1-9]'; then busy=$c; return 0; fi
    done
    return 1
  }
  if wait_until 60 find_busy; then
    busy_name=$(docker inspect -f '{{.Name}}' "$busy" | tr -d /)
    busy_host=$(docker inspect -f '{{.Config.Hostname}}' "$busy")
    sleep 2
    if manifests_done "$long"; then
      fail "stop test: the long job finished before its transcoder could be stopped (make LONG_CLIP_SECS larger)"
    else
      t_stop=$(date +%s)
      docker stop -t 60 "$busy" >/dev/null
      code=$(docker inspect -f '{{.State.ExitCode}}' "$busy")
      if [ "$code" = 0 ]; then
        pass "docker stop of busy $busy_name: exit 0 after $(($(date +%s) - t_stop)) s"
      else
        fail "docker stop of busy $busy_name: exit code $code"
      fi
      # Done when both manifests exist; a dead task ends the wait at once.
      settled() { manifests_done "$long" || [ "$(dead_count)" != 0 ]; }
      if wait_until 300 settled && manifests_done "$long"; then
        worker=$(on_volume cat "/data/outputs/$long/transcode/manifest.json" |
          python3 -c 'import json,sys; m=json.load(sys.stdin); print(m.get("worker", "?"))')
        case "$worker" in
          "$busy_host"*) fail "long job: completed by the stopped transcoder ($worker)" ;;
          *) pass "long job $long: requeued and completed by another transcoder ($worker)" ;;
        esac
        if outputs_ok "$long"; then pass "outputs of the long job complete"; else fail "outputs of the long job"; fi
      else
        fail "long job $long did not complete after its transcoder was stopped"
      fi
    fi
  else
    fail "no transcoder started the long job $long within 60 s"
  fi
else
  cat "$work/long.json" "$work/long.err" >&2
  fail "upload long.mp4"
fi
dead=$(dead_count)
if [ "${dead:-x}" = 0 ]; then pass "video_tasks.dead is empty"; else fail "video_tasks.dead holds ${dead:-?} message(s)"; fi

# The whole stack stops cleanly: every worker exits 0 within its stop_grace_period.
t_stop=$(date +%s)
worker_ids=$(ids transcoder; ids thumbnailer)
if compose stop >"$work/stop.log" 2>&1; then
  bad=""
  for c in $worker_ids; do
    code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
    [ "$code" = 0 ] || bad="$bad $(docker inspect -f '{{.Name}}' "$c" | tr -d /)=$code"
  done
  if [ -z "$bad" ]; then
    pass "compose stop: every worker exited 0 ($(($(date +%s) - t_stop)) s)"
  else
    fail "compose stop: worker exit codes:$bad"
  fi
else
  cat "$work/stop.log" >&2
  fail "compose stop"
fi

# A second `up`: the broker restarts and re-imports definitions made anew (new salts); the
# passwords must be the same, or the workers would be locked out. ops' password is now
# given in the environment (as from .env), which must win over the generated one.
ops_password=$(head -c 12 /dev/urandom | base64 | tr -d '/+=')
export VIDPIPE_OPS_PASSWORD="$ops_password"
t_up=$(date +%s)
compose up -d --no-build >"$work/up2.log" 2>&1 || { cat "$work/up2.log" >&2; die "second up -d"; }
if wait_until 180 all_healthy rabbitmq 1 && wait_until 120 all_healthy transcoder 1 && wait_until 120 all_healthy thumbnailer 1; then
  pass "second up -d: broker restarted, workers healthy again ($(($(date +%s) - t_up)) s)"
else
  fail "second up -d: services not healthy within the time limit"
fi
topology_exit=$(docker inspect -f '{{.State.ExitCode}}' $(all_ids topology) 2>&1 | sort -u | tr '\n' ' ' || true)
if secrets_digests >"$work/secrets.2" 2>"$work/secrets.err"; then
  want_ops=$(printf '%s' "$ops_password" | sha256sum | cut -c1-64)
  unchanged=$(grep -vE '^(ops/amqp-password|rabbitmq/definitions.json) ' "$work/secrets.1" | diff - <(grep -vE '^(ops/amqp-password|rabbitmq/definitions.json) ' "$work/secrets.2") || true)
  if [ -z "$unchanged" ] && grep -q "^ops/amqp-password 600 10001 $want_ops\$" "$work/secrets.2" && [ "$topology_exit" = "0 " ]; then
    pass "second up -d: passwords kept, ops' taken from VIDPIPE_OPS_PASSWORD (topology as vidpipe-ops exited 0)"
  else
    echo "changed: $unchanged; topology exit $topology_exit" >&2
    fail "second up -d: passwords not as expected"
  fi
else
  cat "$work/secrets.err" >&2
  fail "second up -d: reading the secrets"
fi
say "producer upload short.mp4 --wait, after the restart"
if compose run --rm -T producer upload short.mp4 --wait --timeout 240 --json >"$work/upload2.json" 2>"$work/upload2.err" &&
  compose run --rm -T ops dead list >"$work/dead2.txt" 2>&1; then
  pass "after the restart: upload --wait completed, ops dead list answered"
else
  cat "$work/upload2.json" "$work/upload2.err" "$work/dead2.txt" >&2
  fail "after the restart: upload or ops"
fi
