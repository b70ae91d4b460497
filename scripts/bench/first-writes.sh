#!/usr/bin/env bash
# First writes over real data, issue 22's independent check: a fresh 1 GiB volume,
# 512 MiB written (fio seq 1M qd8 through the nbd engine), then the same 512 MiB
# written again, with no snapshot, with 1 snapshot (reserved store, 64K chunks)
# taken between the two writes, and with 1 snapshot under `serve --write-behind 0`.
# Unlike run.sh's `cow` section, the copies read data, not holes. Cases are
# interleaved per round so load drift on a shared machine falls on all alike.
#
#   scripts/bench/first-writes.sh            (after `npm run build`)
#
# Env: ROUNDS=3, CASES="nosnap snap wb0", SIZE=1G, WRITE=512M, CHUNK=64K,
#   STORE=1G (the snapshot's store), WB=auto (write-behind of the snap case),
#   BUILD=dist (the daemon's build), KEEP_WORK=0, METRICS=off (--metrics-listen),
#   WARM=0 (1: first writes under a removed snapshot right before, so memory is warm),
#   HOOK=cmd: run as `cmd PID CASE ROUND` in the background during the second
#   write (e.g. a per-thread CPU sampler); killed after it.
# Prints one line per run: round, case, MiB/s of the second write, its mean
# completion latency and fio's CPU, seconds of a FLUSH right after it (what is still owed to make it durable), disk MiB written
# during the second write and flush (/proc/diskstats of the data dir's disk).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH=$ROOT/scripts/bench
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-nosnap snap wb0}
SIZE=${SIZE:-1G}
WRITE=${WRITE:-512M}
CHUNK=${CHUNK:-64K}
STORE=${STORE:-1G}
WB=${WB:-auto}
BUILD=${BUILD:-$ROOT/dist}
WORK=$(mktemp -d /var/tmp/first-writes.XXXXXX)
# One copy of the build for the whole run: other work may rebuild dist/ meanwhile.
mkdir -p "$WORK/build"
cp -r "$BUILD" "$WORK/build/dist"
cp "$ROOT/package.json" "$WORK/build/"
ln -s "$ROOT/node_modules" "$WORK/build/node_modules"
COWBD=(node "$WORK/build/dist/daemon/cli.cjs")
PID=
HOOK_PID=

cleanup() {
  [ -n "$HOOK_PID" ] && kill "$HOOK_PID" 2>/dev/null || true
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # port pid
  local i
  for i in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { echo "daemon died before listening" >&2; return 1; }
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

# Sectors written so far to the disk holding $WORK.
DISK=$(lsblk -no PKNAME "$(df --output=source "$WORK" | tail -1)" 2>/dev/null || true)
[ -n "$DISK" ] || DISK=$(basename "$(df --output=source "$WORK" | tail -1)")
written() { awk -v d="$DISK" '$3 == d { print $10 }' /proc/diskstats; }

fio_write() { # uri out
  fio --name=w --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 --size="$WRITE" \
    --output-format=json --output="$2" >/dev/null
}

flush_time() { # uri: seconds one FLUSH takes (flush-time.py)
  /usr/bin/python3 "$BENCH/flush-time.py" "$1"
}

one() { # round case
  local round=$1 kase=$2 dir=$WORK/$1-$2 port uri wb=auto mibs fl w0 w1
  [ "$kase" = wb0 ] && wb=0
  [ "$kase" = snap ] && wb=$WB
  mkdir -p "$dir"
  "${COWBD[@]}" volume create v --size "$SIZE" --data-dir "$dir" >/dev/null
  port=$(free_port)
  "${COWBD[@]}" serve --data-dir "$dir" --listen "127.0.0.1:$port" --metrics-listen "${METRICS:-off}" \
    --log-level warn --write-behind "$wb" >"$dir/log" 2>&1 &
  PID=$!
  wait_for_port "$port" "$PID"
  uri="nbd://127.0.0.1:$port/v"
  fio_write "$uri" "$dir/fill.json"
  if [ "${WARM:-0}" = 1 ]; then
    # The same first writes once before, under a snapshot removed after: the daemon's
    # buffers for held writes are then warm (docs/tuning.md, KEEP_FREE_MS).
    "${COWBD[@]}" snapshot create w --origin v --size "$STORE" --chunk-size "$CHUNK" --data-dir "$dir" >/dev/null
    fio_write "$uri" "$dir/warm.json"
    "${COWBD[@]}" snapshot remove w --data-dir "$dir" >/dev/null
  fi
  if [ "$kase" != nosnap ]; then
    "${COWBD[@]}" snapshot create s --origin v --size "$STORE" --chunk-size "$CHUNK" --data-dir "$dir" >/dev/null
  fi
  if [ -n "${HOOK:-}" ]; then
    $HOOK "$PID" "$kase" "$round" &
    HOOK_PID=$!
  fi
  w0=$(written)
  fio_write "$uri" "$dir/write.json"
  fl=$(flush_time "$uri")
  w1=$(written)
  if [ -n "$HOOK_PID" ]; then
    kill "$HOOK_PID" 2>/dev/null || true
    wait "$HOOK_PID" 2>/dev/null || true
    HOOK_PID=
  fi
  # MiB/s, mean completion latency (ms) and fio's own CPU (%) of the second write.
  read -r mibs lat cpu < <(python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
print(round(j["write"]["bw_bytes"] / 2**20), round(j["write"]["clat_ns"]["mean"] / 1e6, 2), round(j["usr_cpu"] + j["sys_cpu"]))' "$dir/write.json")
  printf '%s\t%-7s\t%6s MiB/s\tlat %5s ms\tfio cpu %3s%%\tflush %s s\tdisk %s MiB\n' "$round" "$kase" "$mibs" "$lat" "$cpu" "$fl" $(((w1 - w0) / 2048))
  kill "$PID"
  wait "$PID" 2>/dev/null || true
  PID=
  rm -rf "$dir"
}

echo "round	case	second write	mean latency	fio CPU	flush after	disk written (second write + flush)"
for round in $(seq 1 "$ROUNDS"); do
  for kase in $CASES; do one "$round" "$kase"; done
done
