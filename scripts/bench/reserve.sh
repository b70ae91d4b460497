#!/usr/bin/env bash
# Snapshot creation with the store's size reserved on disk (issue 24) against the same
# creation with `sparse: true` (nothing reserved: the behaviour before issue 24), for
# stores of RESERVE_SIZES, on an ext4 of its own: a sparse RESERVE_FS image, loop-mounted,
# so a 100 GiB reservation needs no 100 GiB free on the machine's disk (fallocate inside
# it writes only metadata to the image). A daemon with one sparse 1 TiB volume, idle;
# CREATE_N creations per store size and mode, each removed before the next, with no other
# snapshot of the origin (the store file is created each time). Needs root (mount); when
# not root it writes OUT_DIR/reserve.skipped saying so and exits 0.
#   bash scripts/bench/reserve.sh OUT_DIR     (dist/ must be built)
# Writes OUT_DIR/reserve.SIZE.MODE.json (cowctl.py create-times, plus the bytes the probe
# snapshot's store had allocated), OUT_DIR/reserve.SIZE.fallocate.json (fallocate(2)
# alone: the floor) and OUT_DIR/reserve.fs.json.
# Knobs: RESERVE_SIZES="1G 100G" CREATE_N=15 RESERVE_FS=256G BENCH_DIR=/tmp
#   COWBD_CLI=dist/daemon/cli.cjs (run.sh passes its copy of dist/)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=$ROOT/scripts/bench
OUT=${1:?usage: reserve.sh OUT_DIR}
RESERVE_SIZES=${RESERVE_SIZES:-"1G 100G"}
RESERVE_FS=${RESERVE_FS:-256G}
CREATE_N=${CREATE_N:-15}
COWBD=(node "${COWBD_CLI:-$ROOT/dist/daemon/cli.cjs}")
# shellcheck source=scripts/bench/serve.sh
. "$BENCH/serve.sh"
mkdir -p "$OUT"
log() { echo "[reserve bench] $*" >&2; }

skip() {
  echo "$1" >"$OUT/reserve.skipped"
  log "skipped: $1"
  exit 0
}
[ "$(id -u)" = 0 ] || skip "needs root to loop-mount its own ext4 image (mount -o loop); run the bench as root to measure it"
for tool in mkfs.ext4 mount umount mountpoint; do
  command -v "$tool" >/dev/null || skip "$tool is not installed"
done

W=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/cowbd-reserve-bench.XXXXXX")
IMG=$W/ext4.img
MNT=$W/mnt
DPID=
cleanup() {
  if [ -n "$DPID" ]; then
    kill "$DPID" 2>/dev/null || true
    wait "$DPID" 2>/dev/null || true
  fi
  # rm -rf never runs through a file system still mounted: that would empty it, not free it.
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" 2>/dev/null || umount -l "$MNT" || true; fi
  if mountpoint -q "$MNT" 2>/dev/null; then
    log "could not unmount $MNT; left $W in place"
  else
    rm -rf "$W"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$MNT"
truncate -s "$RESERVE_FS" "$IMG"
# Lazy inode tables and journal, no discard: mkfs writes only what it must, the image stays small.
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1,nodiscard "$IMG"
mount -o loop "$IMG" "$MNT"
D=$MNT/data
mkdir -p "$D"
log "ext4 of $RESERVE_FS on $(findmnt -n -o SOURCE "$MNT"), $(df -h --output=avail "$MNT" | tail -1 | tr -d ' ') free"

"${COWBD[@]}" volume create big --size 1T --data-dir "$D" >/dev/null
serve_daemon "$D" warn "$W/daemon.log"

for s in $RESERVE_SIZES; do
  store=$(numfmt --from=iec "$s")
  for mode in reserved sparse; do
    flag=()
    [ $mode = sparse ] && flag=(--sparse)
    sparse=false
    [ $mode = sparse ] && sparse=true
    # One untimed creation first: what its store file really holds allocated (du), so the
    # table shows that "reserved" allocated the size and "sparse" did not.
    python3 "$BENCH/cowctl.py" call "$SOCK" POST /v1/snapshots \
      "{\"name\":\"probe\",\"origin\":\"big\",\"size\":\"$store\",\"sparse\":$sparse}" >/dev/null
    allocated=$(du -s -B1 "$D/cow" | cut -f1)
    python3 "$BENCH/cowctl.py" call "$SOCK" DELETE /v1/snapshots/probe >/dev/null
    sync -f "$MNT"
    log "$CREATE_N creations of a $s store, $mode"
    python3 "$BENCH/cowctl.py" create-times "$SOCK" big "$store" "$CREATE_N" "${flag[@]}" >"$W/times.json"
    python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
d.update(storeBytes=int(sys.argv[2]), allocatedBytes=int(sys.argv[3]))
print(json.dumps(d))' "$W/times.json" "$store" "$allocated" >"$OUT/reserve.$s.$mode.json"
  done
done

kill "$DPID"
wait "$DPID" 2>/dev/null || true
DPID=
# The floor: fallocate(2) mode 0 of the same sizes on a fresh file of the same file system,
# in this process, no daemon (the daemon adds its fork of fallocate(1) and its durable writes).
for s in $RESERVE_SIZES; do
  python3 -c 'import json, os, sys, time
path, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ms = []
for _ in range(n):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    t = time.perf_counter()
    os.posix_fallocate(fd, 0, size)
    ms.append((time.perf_counter() - t) * 1000)
    os.close(fd)
    os.unlink(path)
    os.sync()
    time.sleep(0.2)
print(json.dumps({"ms": ms, "storeBytes": size}))' "$MNT/fallocate-floor" "$(numfmt --from=iec "$s")" "$CREATE_N" >"$OUT/reserve.$s.fallocate.json"
done
echo "{\"fs\": \"ext4\", \"imageApparent\": \"$RESERVE_FS\", \"imageBytesOnDisk\": $(du -s -B1 "$IMG" | cut -f1)}" >"$OUT/reserve.fs.json"
