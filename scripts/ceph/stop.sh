#!/usr/bin/env bash
# Stops the cluster scripts/ceph/start.sh started in DIR: the gateway, then the OSD, then
# the monitor, each waited for (SIGTERM, then SIGKILL after COWBD_CEPH_STOP_TIMEOUT seconds,
# default 10), then any other process still using DIR's ceph.conf. Safe to run twice.
#   scripts/ceph/stop.sh DIR
set -euo pipefail
DIR=${1:?usage: stop.sh DIR}
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf
GRACE=${COWBD_CEPH_STOP_TIMEOUT:-10}

# Whether PID is alive and one of DIR's processes (a stale pid file may name a reused pid).
ours() { [ -n "$1" ] && { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | grep -qF -- "$CONF"; }

# Whether PID is gone; a zombie has an empty cmdline, so it counts as gone.
gone() { ! ours "$1"; }

stop_pid() {
  local pid=$1 deadline
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + GRACE))
  while [ $SECONDS -lt $deadline ]; do
    gone "$pid" && return 0
    sleep 0.1
  done
  echo "ceph stop: $pid ignored SIGTERM for ${GRACE}s, killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  while ! gone "$pid"; do sleep 0.1; done
}

for name in client.rgw.cowbd osd.0 mon.a; do
  f=$DIR/run/$name.pid
  [ -f "$f" ] || continue
  stop_pid "$(cat "$f")"
  rm -f "$f"
done
# Strays: a radosgw-admin or ceph command that hung, a daemon whose pid file never got written.
for cmdline in $(grep -laF -- "$CONF" /proc/[0-9]*/cmdline 2>/dev/null); do
  pid=${cmdline#/proc/}
  pid=${pid%/cmdline}
  [ "$pid" = $$ ] || stop_pid "$pid"
done
