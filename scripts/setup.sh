#!/usr/bin/env bash
# Installs what vidpipe needs on Debian 12 (idempotent) and makes sure RabbitMQ answers.
# Used by the demo, the test command and CI. Needs root (or sudo) only when something
# is missing.
set -euo pipefail

PACKAGES=(
  libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
  libswscale-dev libswresample-dev clang libclang-dev pkg-config ffmpeg rabbitmq-server
  # The RabbitMQ 4.x test node (tests/rabbitmq4/node.sh): a Debian trixie rootfs made with
  # debootstrap (its keyring comes with debian-archive-keyring), run with chroot.
  debootstrap debian-archive-keyring
  # The player test (tests/players.rs): Debian's Chromium, headless, plays the CMAF output
  # through hls.js and dash.js (never a downloaded browser build).
  chromium chromium-driver
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

# The deployment files' offline validation (tests/k8s/validate.sh): `kubectl kustomize`,
# `docker-compose config` and a venv with kubernetes-validate, jsonschema and pyyaml
# (pinned in tests/k8s/requirements.txt). Debian 12 has no `kubectl` package of its own:
# its `kubernetes-client` (kubectl 1.20) is taken where no `kubectl` package is offered.
tools=()
command -v kubectl >/dev/null 2>&1 || tools+=(kubectl)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || tools+=(docker-compose)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || tools+=(python3-venv)
if [ ${#tools[@]} -gt 0 ]; then
  as_root apt-get update -qq
  if [[ " ${tools[*]} " == *" kubectl "* ]] && [ -z "$(apt-cache policy kubectl | awk '/Candidate:/ && $2 != "(none)"')" ]; then
    tools=("${tools[@]/#kubectl/kubernetes-client}")
  fi
  echo "setup: installing ${tools[*]} (deployment validation)"
  # No recommends: docker-compose's would pull in the Docker engine, which only the
  # compose smoke test needs (it installs it itself).
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
fi
k8s_venv=${VIDPIPE_K8S_VENV:-$HOME/.cache/vidpipe-k8s-venv}
k8s_reqs=$(dirname "$0")/../tests/k8s/requirements.txt
if ! cmp -s "$k8s_reqs" "$k8s_venv/requirements.txt" || [ ! -x "$k8s_venv/bin/kubernetes-validate" ]; then
  echo "setup: making $k8s_venv (kubernetes-validate, jsonschema, pyyaml)"
  rm -rf "$k8s_venv"
  python3 -m venv "$k8s_venv"
  "$k8s_venv/bin/pip" install -q --disable-pip-version-check -r "$k8s_reqs"
  cp "$k8s_reqs" "$k8s_venv/requirements.txt"
fi

# The player test's npm packages (hls.js, dash.js, playwright-core), pinned by
# tests/players/package-lock.json; playwright-core needs node 20 or later.
players=$(dirname "$0")/../tests/players
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing nodejs and npm (player test)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# playwright-core and dash.js need node 20 or later, and Debian 12's own is 18: where the
# machine's node is older, node 20 comes as the npm package of its Linux build, into
# ~/.cache/vidpipe-node (tests/players.rs runs the player with it when it is there).
node_cache=$HOME/.cache/vidpipe-node
node_pkg=node-linux-$(uname -m | sed 's/x86_64/x64/; s/aarch64/arm64/')
if ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null &&
  [ ! -x "$node_cache/node_modules/$node_pkg/bin/node" ]; then
  echo "setup: node $(node --version 2>/dev/null) is older than 20; installing node 20 for the player test in $node_cache"
  npm install --prefix "$node_cache" --no-audit --no-fund --loglevel=error "$node_pkg@20"
fi
if ! cmp -s "$players/package-lock.json" "$players/node_modules/.package-lock.json.installed"; then
  echo "setup: installing the player test's npm packages"
  (cd "$players" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$players/package-lock.json" "$players/node_modules/.package-lock.json.installed"
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
