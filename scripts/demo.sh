#!/usr/bin/env bash
# The vidpipe demo, on a fresh Debian 12 machine with Rust installed, no Docker:
#   1. installs what is missing (FFmpeg libraries, clang, pkg-config, ffmpeg, rabbitmq-server),
#   2. makes sure RabbitMQ answers on 127.0.0.1:5672 (starts the local server if not),
#   3. builds the release binaries,
#   4. starts one worker of each registered task kind's role (`producer tasks`: a
#      transcoder and a thumbnailer; logs under ./data/demo-logs/),
#   5. uploads VIDEO (or a generated 6-second sample) with `producer upload --wait`,
#   6. lists the outputs under ./data/outputs/<job_id>/, and stops the workers it started.
#
#   scripts/demo.sh [VIDEO]
#
# Exit code: the producer's (0 every task completed, 1 a task is dead, 4 timed out, …).
# Settings can be changed with VIDPIPE__* variables (e.g. VIDPIPE__AMQP__URL for another
# broker, which then is not started locally).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1mdemo:\033[0m %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

video="${1:-}"
if [ -n "$video" ] && [ ! -f "$video" ]; then
  echo "demo: $video is not a file; give a video file, or nothing for a generated sample" >&2
  exit 2
fi

# 1. System packages (apt-get update once, and only if something is missing).
packages=(
  libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev
  libswscale-dev libswresample-dev clang libclang-dev pkg-config ffmpeg rabbitmq-server
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "demo: cargo is missing; install Rust first (https://rustup.rs)" >&2; exit 1; }

# 2. RabbitMQ.
broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if [ -z "${VIDPIPE__AMQP__URL:-}" ] && ! broker_up; then
  say "starting the local RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do broker_up && break; sleep 1; done
  broker_up || { echo "demo: RabbitMQ did not come up on 127.0.0.1:5672 (see /var/log/rabbitmq/)" >&2; exit 1; }
  as_root rabbitmqctl -q await_startup >/dev/null 2>&1 || true
fi

# 3. Build.
say "building (release; the first build takes a few minutes)"
# Every binary but the test crate's: the producer and each worker crate.
cargo build --release -q --workspace --exclude vidpipe --bins
bin=target/release
# One worker per role of the task registry (the ROLE column of `producer tasks`).
mapfile -t workers < <("$bin/producer" tasks | awk 'NR > 1 && !seen[$3]++ { print $3 }')
[ ${#workers[@]} -gt 0 ] || { echo "demo: producer tasks listed no worker" >&2; exit 1; }

# 4. Workers.
data="${VIDPIPE__STORAGE__ROOT:-./data}"
export VIDPIPE__STORAGE__ROOT="$data"
mkdir -p "$data/demo-logs"
pids=()
stop_workers() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap stop_workers EXIT
trap 'exit 130' INT TERM
for worker in "${workers[@]}"; do
  VIDPIPE__WORKER__NAME="demo-$worker" "$bin/$worker" \
    >"$data/demo-logs/$worker.log" 2>&1 &
  pids+=($!)
done
sleep 1
for i in "${!pids[@]}"; do
  kill -0 "${pids[$i]}" 2>/dev/null || { echo "demo: a worker exited at start; see $data/demo-logs/" >&2; tail -n 20 "$data"/demo-logs/*.log >&2; exit 1; }
done
say "started ${workers[*]} (logs: $data/demo-logs/)"

# 5. Sample and upload.
if [ -z "$video" ]; then
  video="$data/demo-sample.mp4"
  say "generating a 6-second sample video at $video"
  ffmpeg -y -hide_banner -loglevel error \
    -f lavfi -i testsrc2=size=1280x720:rate=25:duration=6 \
    -f lavfi -i sine=frequency=440:duration=6 \
    -c:v libx264 -preset ultrafast -pix_fmt yuv420p -c:a aac -shortest "$video"
fi
say "uploading $video and following its job"
status=0
job=$("$bin/producer" upload "$video" --wait --timeout 900) || status=$?

# 6. Where everything went.
echo
if [ -n "$job" ]; then
  say "job $job — outputs under $data/outputs/$job/:"
  if [ -d "$data/outputs/$job" ]; then
    find "$data/outputs/$job" -type f | sort | sed 's/^/  /'
  else
    echo "  (none)"
  fi
  say "source: $data/uploads/$job/; worker logs: $data/demo-logs/"
  [ "$status" = 1 ] && say "a task is dead; see why with: $bin/producer status $job   (re-run later: $bin/producer dead replay $job)"
fi
exit "$status"
