#!/usr/bin/env bash
# The S3 benchmark of issue 21: cowbd backup against restic's S3 backend, each into a
# bucket of a real one-node Ceph RADOS Gateway (scripts/ceph/start.sh), on the volume of
# the backup benchmark (backup-lib.sh: BK_SIZE with BK_DATA of random data):
#   full backup wall time; an incremental after rewriting 1% of the chunks, scattered;
#   restore throughput; the bytes each run added to the tool's bucket.
# Each tool gets a fresh cluster of its own (the OSD keeps what it stores in RAM, about
# twice over), fed the same two read-only snapshots: before and after the rewrite.
# Prints one markdown table. Asserts nothing about time.
#   bash scripts/bench/backup-s3.sh OUT_DIR            (dist/ must be built)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=$ROOT/scripts/bench
OUT=${1:?usage: backup-s3.sh OUT_DIR}
BK_SIZE=${BK_SIZE:-4G}
BK_DATA=${BK_DATA:-2G}
mkdir -p "$OUT"
MD=$OUT/backup-s3.md
W=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/cowbd-backup-s3-bench.XXXXXX")
PIDS=()
CEPH=
cleanup() {
  [ -z "$CEPH" ] || "$ROOT/scripts/ceph/stop.sh" "$CEPH" >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "[backup-s3 bench] $*" >&2; }
. "$BENCH/backup-lib.sh"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache

TITLE="### Backups to S3 (Ceph RADOS Gateway): cowbd vs restic"
skip() { printf '\n%s\n\nSkipped: %s.\n' "$TITLE" "$1" >"$MD"; cat "$MD"; exit 0; }
command -v restic >/dev/null || skip "restic is not installed (scripts/install-deps.sh installs it)"
for bin in ceph-mon ceph-osd radosgw radosgw-admin; do
  command -v "$bin" >/dev/null || skip "$bin is not installed (scripts/install-deps.sh installs Ceph)"
done

# The OSD's store: what one tool uploads (random data, incompressible) with room to spare.
export COWBD_CEPH_MEMSTORE_BYTES=$((2 * $(bytes "$BK_DATA") + (1 << 30)))
cluster_start() { # name: a fresh cluster in $W/ceph-NAME, its AWS_* variables exported
  CEPH=$W/ceph-$1
  local t0
  t0=$(now)
  "$ROOT/scripts/ceph/start.sh" "$CEPH" >"$W/ceph-$1.out"
  # Only the AWS_* ones: Ceph's tools read CEPH_CONF, and the next cluster's start would too.
  eval "$(sed -n 's/^\(AWS_[A-Z_]*=.*\)$/export \1/p' "$CEPH/env")"
  log "cluster for $1 up in $(since "$t0") s at $AWS_ENDPOINT_URL"
}
cluster_stop() {
  "$ROOT/scripts/ceph/stop.sh" "$CEPH" >/dev/null
  rm -rf "$CEPH"
  CEPH=
}
# Bytes and objects in a bucket, from the gateway's own accounting.
bucket_bytes() { bucket_stat "$1" size; }
bucket_objects() { bucket_stat "$1" num_objects; }
bucket_stat() { # bucket field
  radosgw-admin bucket stats --bucket "$1" -c "$CEPH/ceph.conf" 2>/dev/null |
    python3 -c "import json, sys; print(json.load(sys.stdin)['usage'].get('rgw.main', {}).get(sys.argv[1], 0))" "$2"
}

make_backup_volume
# What restic reads later: the volume before the rewrite (r1) and after (r2). cowbd takes
# its own snapshot at each backup, of the same contents: nothing else writes the volume.
snapshot "$D" r1 vol

# ---- cowbd ----
cluster_start cowbd
REPO=s3://cowbd-bench/vol
"${COWBD[@]}" backup init --repo "$REPO" >/dev/null
cowbd_b0=$(bucket_bytes cowbd-bench)
cowbd_o0=$(bucket_objects cowbd-bench)
drop_caches
log "full backup: cowbd"
t0=$(now)
"${COWBD[@]}" backup create vol --repo "$REPO" --json --no-progress --data-dir "$D" >"$W/full.json"
cowbd_full=$(since "$t0")
cowbd_b1=$(bucket_bytes cowbd-bench)
cowbd_o1=$(bucket_objects cowbd-bench)
rewrite_one_percent 42
snapshot "$D" r2 vol
log "incremental: cowbd ($changed chunks changed)"
t0=$(now)
"${COWBD[@]}" backup create vol --repo "$REPO" --json --no-progress --data-dir "$D" >"$W/inc.json"
cowbd_inc=$(since "$t0")
cowbd_b2=$(bucket_bytes cowbd-bench)
cowbd_o2=$(bucket_objects cowbd-bench)
inc_id=$(summary_field "$W/inc.json" id)
drop_caches
log "restore: cowbd"
t0=$(now)
"${COWBD[@]}" backup restore "$inc_id" --repo "$REPO" --to-file "$W/cowbd.img" --no-progress >/dev/null
cowbd_restore=$(since "$t0")
cmp -s "$W/cowbd.img" <(nbdcopy "$URI/r2" -) || { echo "cowbd's restore differs from the volume" >&2; exit 1; }
rm -f "$W/cowbd.img"
cluster_stop

# ---- restic ----
cluster_start restic
RREPO=s3:$AWS_ENDPOINT_URL/restic-bench
restic init -q -r "$RREPO" >/dev/null
restic_b0=$(bucket_bytes restic-bench)
restic_o0=$(bucket_objects restic-bench)
drop_caches
log "full backup: restic"
t0=$(now)
restic_backup r1 "$RREPO"
restic_full=$(since "$t0")
restic_b1=$(bucket_bytes restic-bench)
restic_o1=$(bucket_objects restic-bench)
log "incremental: restic"
t0=$(now)
restic_backup r2 "$RREPO"
restic_inc=$(since "$t0")
restic_b2=$(bucket_bytes restic-bench)
restic_o2=$(bucket_objects restic-bench)
drop_caches
log "restore: restic"
t0=$(now)
restic restore -q -r "$RREPO" latest --target "$W/restic-out" >/dev/null
restic_restore=$(since "$t0")
cmp -s "$W/restic-out/vol.img" <(nbdcopy "$URI/r2" -) || { echo "restic's restore differs from the volume" >&2; exit 1; }
rm -rf "$W/restic-out"
cluster_stop

python3 - "$MD" <<PY
import sys
def r(a, b): return f"{float(a) / float(b):.2f}" if float(b) else "-"
def mib(b): return f"{b / 2**20:.1f}"
vol = $(bytes "$BK_SIZE") / 2**20
cf, ci = $cowbd_b1 - $cowbd_b0, $cowbd_b2 - $cowbd_b1
rf, ri = $restic_b1 - $restic_b0, $restic_b2 - $restic_b1
rows = [
  ("full backup, wall s", "$cowbd_full", "$restic_full", r("$cowbd_full", "$restic_full"), "<= 1.20"),
  ("incremental (1% rewritten), wall s", "$cowbd_inc", "$restic_inc", r("$cowbd_inc", "$restic_inc"), "<= 0.10"),
  ("restore, MiB/s of volume", f"{vol / float('$cowbd_restore'):.0f}", f"{vol / float('$restic_restore'):.0f}", r("$restic_restore", "$cowbd_restore"), "-"),
  ("uploaded by the full backup, MiB", mib(cf), mib(rf), r(cf, rf), "-"),
  ("uploaded by the incremental, MiB", mib(ci), mib(ri), r(ci, ri), "-"),
]
with open(sys.argv[1], "w") as f:
  f.write(f"\n$TITLE {'$(restic version | cut -d" " -f2)'} ($BK_SIZE volume, $BK_DATA random data)\n\n")
  f.write("| measure | cowbd | restic | ratio | target |\n|---|---:|---:|---:|---|\n")
  for row in rows: f.write("| " + " | ".join(row) + " |\n")
  f.write(f"\nUploaded: growth of each tool's bucket (the gateway's bucket stats). Objects added, full / incremental:"
          f" cowbd {$cowbd_o1 - $cowbd_o0} / {$cowbd_o2 - $cowbd_o1}, restic {$restic_o1 - $restic_o0} / {$restic_o2 - $restic_o1}."
          f" The incremental rewrote $changed chunks of 64 KiB ({mib($changed * 65536)} MiB).\n")
PY
cat "$MD"
