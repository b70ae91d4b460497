#!/usr/bin/env bash
# Merging a snapshot back into its origin (issue 20), two figures:
# 1. Throughput: a MERGE_SIZE volume, filled, a snapshot, then every chunk rewritten (so
#    every chunk is copied into the store); the merge with no rate bound ("rate": "0"),
#    timed from the POST until the snapshot is gone (GET answers 404, cowctl.py's clock)
#    plus a sync of the volume file, against `cp --reflink=never` of the same volume file to a new file on the
#    same file system plus a sync of the copy. Before each: sync, then drop the page cache
#    when root (echo 3 > /proc/sys/vm/drop_caches), so both read from disk.
# 2. Origin 4K random reads (fio nbd engine, randread 4k qd16, MERGE_FIO_SECONDS) during a
#    merge at the daemon's default rate, against the same reads on the same volume right
#    before the merge. A MERGE_IOPS_SIZE volume, every chunk copied likewise, big enough
#    that the merge outlasts fio; its progress is read right before and after fio.
#   bash scripts/bench/merge.sh OUT_DIR     (dist/ must be built)
# Writes OUT_DIR/merge.json.
# Knobs: MERGE_SIZE=1G MERGE_IOPS_SIZE=2G CHUNK=64K MERGE_FIO_SECONDS=10 BENCH_DIR=/tmp
#   COWBD_CLI=dist/daemon/cli.cjs (run.sh passes its copy of dist/)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=$ROOT/scripts/bench
OUT=${1:?usage: merge.sh OUT_DIR}
MERGE_SIZE=${MERGE_SIZE:-1G}
MERGE_IOPS_SIZE=${MERGE_IOPS_SIZE:-2G}
CHUNK=${CHUNK:-64K}
MERGE_FIO_SECONDS=${MERGE_FIO_SECONDS:-10}
COWBD=(node "${COWBD_CLI:-$ROOT/dist/daemon/cli.cjs}")
# shellcheck source=scripts/bench/serve.sh
. "$BENCH/serve.sh"
mkdir -p "$OUT"
log() { echo "[merge bench] $*" >&2; }
bytes() { numfmt --from=iec "${1%B}"; }
now() { date +%s.%N; }
since() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.3f}')" "$1"; }

W=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/cowbd-merge-bench.XXXXXX")
D=$W/data
DPID=
cleanup() {
  if [ -n "$DPID" ]; then
    kill "$DPID" 2>/dev/null || true
    wait "$DPID" 2>/dev/null || true
  fi
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$(id -u)" = 0 ]; then
  CACHE="sync, then echo 3 > /proc/sys/vm/drop_caches"
  settle() { sync; echo 3 >/proc/sys/vm/drop_caches; }
else
  CACHE="sync only (not root: the page cache could not be dropped)"
  settle() { sync; }
fi

CHUNK_BYTES=$(bytes "$CHUNK")
mkdir -p "$D"
"${COWBD[@]}" volume create m --size "$MERGE_SIZE" --data-dir "$D" >/dev/null
"${COWBD[@]}" volume create r --size "$MERGE_IOPS_SIZE" --data-dir "$D" >/dev/null
serve_daemon "$D" info "$W/daemon.log"
ctl() { python3 "$BENCH/cowctl.py" "$@"; }

seqwrite() { # volume
  fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/$1" --rw=write --bs=1M --iodepth=8 \
    --size="$(stat -c %s "$D/$1.vol")" --output-format=json --output="$W/fio-$1.json" >/dev/null
}
flush() { # volume: the writes just acknowledged land, and their chunk copies with them
  /usr/bin/python3 -c 'import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.flush()
h.shutdown()' "nbd://127.0.0.1:$PORT/$1"
}
# A snapshot of VOLUME whose every chunk is copied: filled, snapshotted, rewritten.
copied_snapshot() { # volume snapshot
  local vb
  vb=$(stat -c %s "$D/$1.vol")
  log "$1: filling, then a snapshot, then every chunk rewritten"
  seqwrite "$1"
  ctl call "$SOCK" POST /v1/snapshots \
    "{\"name\":\"$2\",\"origin\":\"$1\",\"size\":\"$((vb + vb / 8 + 64 * 1024 * 1024))\",\"chunkSize\":\"$CHUNK_BYTES\"}" >/dev/null
  seqwrite "$1"
  flush "$1"
  local exc
  exc=$(ctl call "$SOCK" GET "/v1/snapshots/$2" | python3 -c 'import json, sys; print(json.load(sys.stdin)["exceptions"])')
  if [ "$exc" != $((vb / CHUNK_BYTES)) ]; then
    echo "snapshot $2 holds $exc exceptions, not every chunk ($((vb / CHUNK_BYTES)))" >&2
    exit 1
  fi
}

# ---- 1. throughput against cp -------------------------------------------------

copied_snapshot m ms
settle
log "cp of the ${MERGE_SIZE} volume file ($CACHE first)"
t0=$(now)
cp --reflink=never "$D/m.vol" "$W/copy"
sync "$W/copy"
cp_seconds=$(since "$t0")
rm -f "$W/copy"
settle
log "merging ms, no rate bound ($CACHE first)"
ctl merge "$SOCK" ms --rate 0 --wait >"$W/merge-fast.json"
t0=$(now)
sync "$D/m.vol"
merge_sync=$(since "$t0")
grep -q '"merge done"' "$W/daemon.log" || { echo "no 'merge done' in the daemon's log" >&2; exit 1; }
rm -f "$D/m.vol"

# ---- 2. origin random reads during a merge at the default rate ------------------

fio_randread() { # out
  fio --name=rr --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/r" --rw=randread --bs=4k --iodepth=16 \
    --size="$(stat -c %s "$D/r.vol")" --time_based --runtime="$MERGE_FIO_SECONDS" \
    --output-format=json --output="$1" >/dev/null
}
copied_snapshot r rs
sync
log "random reads of r, no merge"
fio_randread "$W/fio-alone.json"
sync
log "random reads of r during a merge at the default rate"
ctl merge "$SOCK" rs >"$W/merge-default.json"
ctl progress "$SOCK" rs >"$W/progress-before.json"
fio_randread "$W/fio-during.json"
ctl progress "$SOCK" rs >"$W/progress-after.json"
log "waiting for the merge of rs to finish"
ctl merge-wait "$SOCK" rs >"$W/merge-default-done.json"

python3 - "$W" "$OUT/merge.json" "$merge_sync" "$cp_seconds" "$CACHE" "$MERGE_SIZE" "$MERGE_IOPS_SIZE" "$MERGE_FIO_SECONDS" <<'PY'
import json, sys
w, out, merge_sync, cp_s, cache, size, iops_size, fio_s = sys.argv[1:9]
j = lambda n: json.load(open(f"{w}/{n}"))
iops = lambda n: j(n)["jobs"][0]["read"]["iops"]
fast = j("merge-fast.json")
before = fast["before"]
json.dump({
    "size": size, "iopsSize": iops_size, "fioSeconds": int(fio_s), "cache": cache,
    "chunkSize": before["chunkSize"], "exceptions": before["exceptions"],
    "volumeBytes": before["exceptions"] * before["chunkSize"],
    # From the POST (cowctl's own clock, not its start-up) until 404, then the sync.
    "mergeSeconds": fast["seconds"] + float(merge_sync), "mergeSyncSeconds": float(merge_sync),
    "mergeFirstGetSeconds": fast["getSeconds"], "cpSeconds": float(cp_s),
    "iopsAlone": iops("fio-alone.json"), "iopsDuring": iops("fio-during.json"),
    "progressBefore": j("progress-before.json"), "progressAfter": j("progress-after.json"),
    "defaultRate": j("merge-default.json").get("reply"),
    "defaultMergeSeconds": j("merge-default-done.json")["seconds"],
    "iopsVolumeBytes": j("merge-default.json")["before"]["exceptions"] * before["chunkSize"],
}, open(out, "w"))
PY
