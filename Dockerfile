# vidpipe: one image with all three binaries (producer, transcoder, thumbnailer).
#
#   docker build -t vidpipe:latest .
#   docker run --rm vidpipe:latest transcoder --help
#
# The runtime stage is repeated in docker/Dockerfile.prebuilt (same packages, user and
# layout) for machines that build the binaries on the host instead; keep them in step.

# --- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libavcodec-dev libavformat-dev libavutil-dev libavfilter-dev libavdevice-dev \
      libswscale-dev libswresample-dev clang libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p producer -p transcoder -p thumbnailer \
 && mkdir -p /out \
 && cp target/release/producer target/release/transcoder target/release/thumbnailer /out/

# --- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim
# FFmpeg 5.1 runtime libraries only (what `ldd` shows the workers link; libpostproc56
# comes with libavfilter8); curl for health checks, tini as PID 1. No libavdevice59: the
# binaries do not link it, and it drags in SDL, PulseAudio, JACK and X11 (236 MB).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavfilter8 \
      ca-certificates tini curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vidpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin vidpipe \
 && mkdir -p /data /scratch /run/vidpipe-secrets \
      /secrets/producer /secrets/transcoder /secrets/thumbnailer /secrets/ops \
      /secrets/minio /secrets/rabbitmq \
 && chown vidpipe:vidpipe /data /scratch /run/vidpipe-secrets /secrets/* \
 && chmod 0700 /run/vidpipe-secrets /secrets/producer /secrets/transcoder \
      /secrets/thumbnailer /secrets/ops /secrets/minio
COPY --from=builder /out/producer /out/transcoder /out/thumbnailer /usr/local/bin/
# The entrypoint that fills in credentials from the compose stack's generated secrets,
# and the tool that generates them (the compose service `secrets`).
COPY docker/entrypoint.sh /usr/local/bin/vidpipe-entrypoint
COPY docker/secrets.sh /usr/local/bin/vidpipe-secrets
COPY docker/vidpipe-lib.sh /usr/local/bin/vidpipe-lib.sh

# Media store (local backend); a named volume mounted here starts out owned by vidpipe,
# and so do the ones compose mounts on /scratch (job scratch), /run/vidpipe-secrets (a
# role's secrets) and /secrets/* (all of them, for the `secrets` service). No VOLUME
# declaration: it gave every container that does not mount /data (the one-shot
# `secrets` and `topology` services) an anonymous volume, left behind on each re-create.
# Health endpoint on every interface of the container's own network (the built-in default
# is loopback on a free port): Prometheus on the container network scrapes :8080.
ENV VIDPIPE__STORAGE__ROOT=/data \
    VIDPIPE__HEALTH__ADDR=0.0.0.0:8080 \
    TINI_SUBREAPER=1
WORKDIR /data
EXPOSE 8080
USER vidpipe
# tini forwards SIGTERM to the worker (graceful shutdown) and reaps children. With
# compose's `init: true` it runs under docker's own init; TINI_SUBREAPER keeps it quiet.
# vidpipe-entrypoint execs the command (so the worker is tini's child).
ENTRYPOINT ["tini", "--", "vidpipe-entrypoint"]
CMD ["transcoder"]
