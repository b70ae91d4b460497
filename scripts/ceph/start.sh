#!/usr/bin/env bash
# Starts a throwaway one-node Ceph cluster for tests and benchmarks: one monitor, one OSD
# on memstore (RAM), and a RADOS Gateway serving S3 on 127.0.0.1, every file under DIR.
#   scripts/ceph/start.sh [DIR]          DIR defaults to a new mktemp directory
#   scripts/ceph/start.sh --gateway DIR  starts the gateway of DIR's cluster again, same port
# Prints, and writes to DIR/env, KEY=value lines: CEPH_DIR, CEPH_CONF, AWS_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION. scripts/ceph/stop.sh DIR stops it all.
# Env: COWBD_CEPH_MEMSTORE_BYTES (the OSD's RAM store, default 2 GiB),
#      COWBD_CEPH_TIMEOUT (seconds each daemon may take to come up, default 60).
set -euo pipefail

gateway_only=
if [ "${1:-}" = --gateway ]; then gateway_only=1; shift; fi
DIR=${1:-}
if [ -z "$DIR" ]; then
  [ -z "$gateway_only" ] || { echo "usage: start.sh --gateway DIR" >&2; exit 2; }
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/cowbd-ceph.XXXXXX")
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
case "$DIR" in *[[:space:]]*) echo "ceph start: DIR must not contain whitespace: $DIR" >&2; exit 2 ;; esac
CONF=$DIR/ceph.conf
TIMEOUT=${COWBD_CEPH_TIMEOUT:-60}
MEMSTORE_BYTES=${COWBD_CEPH_MEMSTORE_BYTES:-$((2 << 30))}
RGW=client.rgw.cowbd
UID_S3=cowbd-test
REGION=us-east-1

fail() { # fail MESSAGE [LOG...]: the message and each log's tail; a half-started cluster is stopped
  echo "ceph start: $1" >&2
  shift
  # A crashing daemon ends its log with a dump of recent events: its errors come first.
  for log in "$@"; do
    [ -f "$log" ] || continue
    echo "--- errors in $log" >&2
    grep -E '^[0-9][-0-9T:.+]+ [0-9a-f]+ -1 ' "$log" | tail -n 10 >&2 || true
    echo "--- tail of $log" >&2
    tail -n 20 "$log" >&2
  done
  [ -n "$gateway_only" ] || [ ! -e "$CONF" ] || "$(dirname "$0")/stop.sh" "$DIR" >&2 || true
  exit 1
}

free_port() {
  node -e 'const s = require("net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}

# Whether PID is alive and one of DIR's daemons (a stale pid file may name a reused pid).
ours() { [ -n "$1" ] && { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null | grep -qF -- "$CONF"; }

pid_of() { cat "$DIR/run/$1.pid" 2>/dev/null || true; }

# Whether PID holds the socket listening on 127.0.0.1:PORT: another process may have
# taken the port between our choosing it and the daemon binding it.
listens() {
  local pid=$1 hex inode
  hex=$(printf '0100007F:%04X' "$2")
  for inode in $(awk -v a="$hex" '$2 == a && $4 == "0A" { print $10 }' /proc/net/tcp); do
    ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF "socket:[$inode]" && return 0
  done
  return 1
}

# wait_listening NAME PORT: 0 once NAME's daemon listens on PORT, 1 if it dies or time runs out.
wait_listening() {
  local deadline=$((SECONDS + TIMEOUT)) pid
  while [ $SECONDS -lt $deadline ]; do
    pid=$(pid_of "$1")
    if [ -n "$pid" ]; then
      ours "$pid" || return 1
      listens "$pid" "$2" && return 0
    fi
    sleep 0.1
  done
  return 1
}

kill_daemon() { # kill_daemon NAME: SIGKILL, for a daemon that came up wrong
  local pid
  pid=$(pid_of "$1")
  if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$DIR/run/$1.pid"
}

write_conf() { # write_conf MON_PORT
  cat >"$CONF" <<CONF
# Throwaway one-node cluster written by scripts/ceph/start.sh; every path is under $DIR.
[global]
fsid = $(cat /proc/sys/kernel/random/uuid)
mon host = [v2:127.0.0.1:$1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind retry count = 1
ms bind retry delay = 1
auth cluster required = none
auth service required = none
auth client required = none
# The gateway asks for a secure monitor session by default, which needs cephx.
ms mon client mode = crc
client mount timeout = $TIMEOUT
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
crash dir = $DIR/crash
mon cluster log file = $DIR/log/cluster.log
mon data = $DIR/\$name
osd data = $DIR/\$name
rgw data = $DIR/\$name
# One OSD: pools of one replica, few placement groups (the gateway makes 8 pools),
# and monitor decisions without the default 1 s batching, which dominates the start.
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail crit = 0
paxos propose interval = 0.1
# memstore keeps deleted objects' tails in RAM until the gateway's garbage collection frees them.
rgw gc obj min wait = 1
rgw gc processor period = 2
rgw gc processor max time = 2
CONF
}

start_monitor() {
  local attempt port
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    write_conf "$port"
    rm -rf "$DIR/mon.a" "$DIR/monmap"
    monmaptool --create --clobber --fsid "$(awk '$1 == "fsid" { print $3 }' "$CONF")" \
      --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" >>"$DIR/log/mkfs.log" 2>&1 ||
      fail "ceph-mon --mkfs failed" "$DIR/log/mkfs.log" "$DIR/log/mon.a.log"
    # ceph-mon forks and its parent returns once the child has started.
    if ceph-mon -c "$CONF" -i a >>"$DIR/log/mkfs.log" 2>&1 && wait_listening mon.a "$port"; then return 0; fi
    kill_daemon mon.a
  done
  fail "the monitor did not come up" "$DIR/log/mon.a.log"
}

start_osd() {
  local uuid id
  uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(timeout "$TIMEOUT" ceph -c "$CONF" osd new "$uuid" 2>>"$DIR/log/mkfs.log") ||
    fail "ceph osd new failed" "$DIR/log/mkfs.log" "$DIR/log/mon.a.log"
  [ "$id" = 0 ] || fail "ceph osd new gave id $id, not 0"
  mkdir -p "$DIR/osd.0"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$DIR/log/mkfs.log" 2>&1 ||
    fail "ceph-osd --mkfs failed" "$DIR/log/mkfs.log" "$DIR/log/osd.0.log"
  ceph-osd -c "$CONF" -i 0 >>"$DIR/log/mkfs.log" 2>&1 || fail "ceph-osd did not start" "$DIR/log/mkfs.log" "$DIR/log/osd.0.log"
}

create_user() {
  local access secret out
  access=$(od -An -tx1 -N10 /dev/urandom | tr -d ' \n' | tr a-f A-F)
  secret=$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')
  # radosgw-admin makes the gateway's pools, so it waits for the OSD to be up.
  out=$(timeout "$TIMEOUT" radosgw-admin -c "$CONF" user create --uid "$UID_S3" --display-name "$UID_S3" \
    --access-key "$access" --secret-key "$secret" 2>&1) ||
    { echo "$out" >"$DIR/log/user-create.log"; fail "radosgw-admin user create failed (is the OSD up?)" \
      "$DIR/log/user-create.log" "$DIR/log/osd.0.log" "$DIR/log/mon.a.log"; }
  printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$access" "$secret" >"$DIR/keys"
}

# start_gateway [PORT]: on PORT, or on a free port, retried when another process takes it.
start_gateway() {
  local fixed=${1:-} attempt port pid
  for attempt in 1 2 3 4 5; do
    port=${fixed:-$(free_port)}
    kill_daemon "$RGW"
    # In the foreground, in a session of its own: a daemonized radosgw that fails to bind
    # dies before writing its pid file, and we would wait for it in vain.
    setsid radosgw -f -c "$CONF" -n "$RGW" --rgw-frontends "beast endpoint=127.0.0.1:$port" \
      </dev/null >>"$DIR/log/$RGW.out" 2>&1 &
    echo $! >"$DIR/run/$RGW.pid"
    if wait_listening "$RGW" "$port" &&
      [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$port/")" = 200 ]; then
      echo "$port" >"$DIR/gateway.port"
      return 0
    fi
    kill_daemon "$RGW"
    [ -z "$fixed" ] || break
  done
  fail "the gateway did not come up" "$DIR/log/$RGW.out" "$DIR/log/$RGW.log"
}

write_env() {
  {
    echo "CEPH_DIR=$DIR"
    echo "CEPH_CONF=$CONF"
    echo "AWS_ENDPOINT_URL=http://127.0.0.1:$(cat "$DIR/gateway.port")"
    cat "$DIR/keys"
    echo "AWS_REGION=$REGION"
  } >"$DIR/env"
  cat "$DIR/env"
}

for bin in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool node curl; do
  command -v "$bin" >/dev/null || fail "$bin is not installed (see scripts/install-deps.sh)"
done
mkdir -p "$DIR/run" "$DIR/log" "$DIR/crash"
if [ -n "$gateway_only" ]; then
  [ -f "$DIR/gateway.port" ] || fail "$DIR holds no cluster started by start.sh"
  start_gateway "$(cat "$DIR/gateway.port")"
  write_env
  exit 0
fi
if [ -e "$CONF" ]; then
  echo "ceph start: $DIR already holds a cluster (stop.sh it, then use a new directory)" >&2
  exit 1
fi
start_monitor
start_osd
create_user
start_gateway
write_env
