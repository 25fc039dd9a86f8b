#!/usr/bin/env bash
# Installs what vidpipe needs on Debian 12 (idempotent) and makes sure RabbitMQ answers.
# Used by the demo, the test command and CI. Needs root (or sudo) only when something
# is missing.
set -euo pipefail

PACKAGES=(
  libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
  libswscale-dev libswresample-dev clang libclang-dev pkg-config ffmpeg rabbitmq-server
)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A real S3 server for the S3 storage tests (moto in server mode).
if ! python3 -c "import moto.server" >/dev/null 2>&1; then
  echo "setup: installing moto (S3 server for tests)"
  python3 -m pip install -q --disable-pip-version-check "moto[s3]" flask flask-cors
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust (rustup) first" >&2
  exit 1
fi

# RabbitMQ: use AMQP_URL's broker if given, else make sure the local one runs.
broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if [ -z "${AMQP_URL:-}" ] && ! broker_up; then
  echo "setup: starting the local RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do broker_up && break; sleep 1; done
  broker_up || { echo "setup: RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi
echo "setup: ready"
