#!/usr/bin/env bash
# A RabbitMQ 4.x node for the tests, beside the machine's own broker (Debian 12's 3.10 on
# 5672), offline. Users get rabbitmq:4-management from docker-compose.yml; this node lets
# the test command run the broker-sensitive groups against 4.x too. The measured recipe is
# the team's ../shared/RABBITMQ4-CI.md:
#
#   Debian 13 (trixie) ships rabbitmq-server 4.0.5 with its own Erlang. debootstrap makes a
#   trixie root filesystem with it (about 40 s, once; cached under
#   $VIDPIPE_RABBITMQ4_CACHE, default ~/.cache/vidpipe-rabbitmq4, and made again when
#   missing or incomplete), and the node runs in it as a chroot: AMQP on 127.0.0.1:5673,
#   management on 15673, its own Erlang distribution port (25673) and its own epmd (4370),
#   so it never meets the machine's node (epmd 4369, dist 25672).
#
#   tests/rabbitmq4/node.sh start       make the rootfs if needed, start the node (a fresh,
#                                       empty one), wait until AMQP answers; does nothing
#                                       when the node is already up
#   tests/rabbitmq4/node.sh stop        stop it: rabbitmqctl stop, end its epmd, unmount
#                                       its /proc (safe to call when it is not running)
#   tests/rabbitmq4/node.sh status      exit 0 when the node answers on its port
#   tests/rabbitmq4/node.sh url         print its AMQP URL (guest/guest, vhost /)
#   tests/rabbitmq4/node.sh ctl ARGS…   rabbitmqctl ARGS… against this node only
#   tests/rabbitmq4/node.sh rootfs      make the rootfs if needed; print its path
#   tests/rabbitmq4/node.sh compose-v2  print the path of Compose v2 (the static
#                                       `docker-compose` CLI plugin of trixie's package,
#                                       cached next to the rootfs; see ../shared/COMPOSE-CI.md)
#
# Needs root (chroot, mount), or sudo. Debian packages: debootstrap (scripts/setup.sh
# installs it). The mirror is the one of this machine's /etc/apt/sources.list.d/debian.sources
# (or /etc/apt/sources.list), so it works wherever apt-get does.
set -euo pipefail

cache=${VIDPIPE_RABBITMQ4_CACHE:-$HOME/.cache/vidpipe-rabbitmq4}
rootfs=$cache/rootfs
# Written last when the rootfs is complete: a rootfs without it is made again.
ready=$rootfs/.vidpipe-rootfs-ready
port=${VIDPIPE_RABBITMQ4_PORT:-5673}
mgmt_port=$((port + 10000))  # 15673
dist_port=$((port + 20000))  # 25673
ctl_ports=$((port + 30000))  # 35673–35683: rabbitmqctl's own distribution ports
epmd_port=${VIDPIPE_RABBITMQ4_EPMD_PORT:-4370}
node=r4@localhost
log=/var/log/rabbitmq    # inside the chroot

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "rabbitmq4: $*" >&2; }

# The Debian mirror this machine's apt uses (deb822 sources first, then sources.list).
mirror() {
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
  fi
  [ -n "$m" ] || { say "no Debian mirror found in /etc/apt/sources.list*"; exit 1; }
  echo "$m"
}

# Runs a command inside the rootfs with the node's environment (its node name, ports,
# epmd, HOME for the Erlang cookie). Distribution and epmd listen on 127.0.0.1 only.
in_root() {
  as_root chroot "$rootfs" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    HOME=/var/lib/rabbitmq RABBITMQ_NODENAME="$node" RABBITMQ_DIST_PORT="$dist_port" \
    ERL_EPMD_PORT="$epmd_port" ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
    RABBITMQ_CTL_DIST_PORT_MIN="$ctl_ports" RABBITMQ_CTL_DIST_PORT_MAX="$((ctl_ports + 10))" "$@"
}

make_rootfs() {
  [ -f "$ready" ] && return 0
  command -v debootstrap >/dev/null 2>&1 || {
    say "installing debootstrap"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  # A half-made rootfs (an interrupted run) is thrown away; never while mounted.
  unmount_proc
  as_root rm -rf "$rootfs"
  as_root mkdir -p "$cache"
  local t0 m; t0=$(date +%s); m=$(mirror)
  say "making the trixie rootfs with rabbitmq-server 4.x in $rootfs (about a minute, once)"
  if ! as_root debootstrap --variant=minbase --include=rabbitmq-server trixie "$rootfs" "$m" \
    >"$cache/debootstrap.log" 2>&1; then
    say "debootstrap failed; the end of $cache/debootstrap.log:"
    tail -n 20 "$cache/debootstrap.log" >&2
    exit 1
  fi
  # apt inside the rootfs (compose-v2, the compose image) uses the same mirror.
  as_root rm -f "$rootfs/etc/apt/sources.list"
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$m" |
    as_root tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null
  # Management plugin (the tests don't need it; the compose image does, and an operator
  # looking at the node likes it). Enabled offline: nothing runs yet.
  as_root chroot "$rootfs" rabbitmq-plugins enable --offline rabbitmq_management >/dev/null
  # Fixed cookie: rabbitmqctl run later as root in the chroot must match the server
  # (run as the rabbitmq user; both have HOME=/var/lib/rabbitmq).
  echo VIDPIPERABBITMQ4NODE | as_root tee "$rootfs/var/lib/rabbitmq/.erlang.cookie" >/dev/null
  as_root chroot "$rootfs" sh -c 'chown rabbitmq:rabbitmq /var/lib/rabbitmq/.erlang.cookie && chmod 400 /var/lib/rabbitmq/.erlang.cookie'
  # Docs, man pages, locales and apt's downloads are not needed (smaller compose image).
  as_root rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  local version
  version=$(ls "$rootfs/usr/lib/rabbitmq/lib" | sed -n 's/^rabbitmq_server-//p')
  echo "$version" | as_root tee "$ready" >/dev/null
  say "rootfs ready: RabbitMQ $version ($(($(date +%s) - t0)) s)"
}

# The node's config: its own ports; guest may connect from 127.0.0.1 (the default already)
# and from the compose containers (loopback_users = none, like the recipe).
write_config() {
  as_root tee "$rootfs/etc/rabbitmq/rabbitmq.conf" >/dev/null <<CONF
listeners.tcp.default = 127.0.0.1:$port
management.tcp.ip = 127.0.0.1
management.tcp.port = $mgmt_port
loopback_users = none
log.file.level = info
CONF
}

proc_mounted() { mountpoint -q "$rootfs/proc" 2>/dev/null; }
unmount_proc() { if proc_mounted; then as_root umount "$rootfs/proc" || as_root umount -l "$rootfs/proc"; fi; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

# PIDs of processes whose root directory is the rootfs (the node, its epmd, helpers):
# the last resort of stop, by their ids only.
chroot_pids() {
  local p real
  real=$(readlink -f "$rootfs")
  for p in /proc/[0-9]*; do
    [ "$(as_root readlink "$p/root" 2>/dev/null)" = "$real" ] && echo "${p#/proc/}"
  done
  return 0
}

start() {
  if port_open; then
    if [ -f "$ready" ] && in_root rabbitmqctl -q -n "$node" await_startup --timeout 30 >/dev/null 2>&1; then
      say "already running on 127.0.0.1:$port"
      return 0
    fi
    say "127.0.0.1:$port is taken by something that is not this node"
    exit 1
  fi
  make_rootfs
  # Whatever a failed earlier run left: stop it first.
  stop_quietly
  write_config
  # A fresh node each start: no queues left over from an earlier run.
  as_root rm -rf "$rootfs/var/lib/rabbitmq/mnesia" "$rootfs$log"/*
  as_root mount -t proc proc "$rootfs/proc"
  # Any failure from here on leaves nothing running.
  trap 'say "start failed; log: $rootfs$log/"; tail -n 30 "$rootfs$log/$node.log" >&2 2>/dev/null || true; stop_quietly' ERR
  local t0; t0=$(date +%s)
  in_root rabbitmq-server -detached
  local deadline=$((t0 + ${VIDPIPE_RABBITMQ4_START_TIMEOUT:-120}))
  until port_open; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "no answer on 127.0.0.1:$port within $((deadline - t0)) s"
      false
    fi
    sleep 0.5
  done
  in_root rabbitmqctl -q -n "$node" await_startup --timeout 60 >/dev/null
  trap - ERR
  say "RabbitMQ $(cat "$ready") up on 127.0.0.1:$port after $(($(date +%s) - t0)) s"
}

stop_quietly() { stop >/dev/null 2>&1 || true; }

stop() {
  [ -d "$rootfs/usr" ] || return 0
  if [ -n "$(chroot_pids)" ]; then
    proc_mounted || as_root mount -t proc proc "$rootfs/proc"
    in_root rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
    # Its own epmd (port 4370) outlives the node; ask it to go, then make sure.
    in_root epmd -kill >/dev/null 2>&1 || true
    local deadline=$(($(date +%s) + 20)) pids
    while pids=$(chroot_pids) && [ -n "$pids" ]; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        say "ending what is left in the chroot: $(echo $pids)"
        as_root kill -9 $pids 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.2
    done
  fi
  unmount_proc
}

# Compose v2: trixie's docker-compose package is the static CLI plugin (2.2x, no other
# dependency). Downloaded and unpacked inside the chroot (the rootfs itself is left as it
# was), the binary is copied to the cache.
compose_v2() {
  local bin=$cache/compose-v2/docker-compose
  if [ ! -x "$bin" ]; then
    make_rootfs
    say "getting Compose v2 from trixie's docker-compose package (once)"
    local tmp=/var/tmp/vidpipe-compose-v2
    as_root cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
    as_root chroot "$rootfs" sh -c "set -e; apt-get update -qq; rm -rf $tmp; mkdir -p $tmp; cd $tmp;
      apt-get download -qq -o APT::Sandbox::User=root docker-compose; dpkg-deb -x docker-compose_*.deb x"
    as_root mkdir -p "$cache/compose-v2"
    as_root cp "$rootfs$tmp/x/usr/libexec/docker/cli-plugins/docker-compose" "$bin.tmp"
    as_root rm -rf "$rootfs$tmp" "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    as_root mv "$bin.tmp" "$bin"
  fi
  echo "$bin"
}

case "${1:-}" in
  start) start ;;
  stop) stop; say "stopped" ;;
  status) port_open ;;
  url) echo "amqp://guest:guest@127.0.0.1:$port/%2f" ;;
  ctl) shift; in_root rabbitmqctl -n "$node" "$@" ;;
  rootfs) make_rootfs; echo "$rootfs" ;;
  compose-v2) compose_v2 ;;
  *) echo "usage: $0 start|stop|status|url|ctl ARGS…|rootfs|compose-v2" >&2; exit 2 ;;
esac
