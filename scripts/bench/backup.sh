#!/usr/bin/env bash
# The backup benchmark of issue 19: cowbd backup against restic (Debian's), fed the same
# snapshot by nbdcopy, in one run. A BK_SIZE volume with BK_DATA of random data (1 MiB
# pieces, every other MiB) and the rest never written:
#   full backup wall time and repository size; an incremental after rewriting 1% of the
#   chunks, scattered (time, bytes read); restore throughput; 4K random-write IOPS of the
#   origin while a backup runs against the same without; the daemon's peak RSS while it
#   backs up a BK_HUGE sparse volume with BK_HUGE_DATA written.
# Prints one markdown table. Asserts nothing about time.
#   bash scripts/bench/backup.sh OUT_DIR            (dist/ must be built)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=$ROOT/scripts/bench
OUT=${1:?usage: backup.sh OUT_DIR}
BK_SIZE=${BK_SIZE:-4G}
BK_DATA=${BK_DATA:-2G}
BK_HUGE=${BK_HUGE:-1T}
BK_HUGE_DATA=${BK_HUGE_DATA:-1G}
BK_FIO_SECONDS=${BK_FIO_SECONDS:-10}
mkdir -p "$OUT"
W=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/cowbd-backup-bench.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
log() { echo "[backup bench] $*" >&2; }
. "$BENCH/backup-lib.sh"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache

command -v restic >/dev/null || { echo "| backup | restic is not installed (scripts/install-deps.sh installs it) |" >"$OUT/backup.md"; exit 0; }

dusize() { du -sb "$1" | cut -f1; }

make_backup_volume

"${COWBD[@]}" backup init --repo "$W/cowbd-repo" >/dev/null
restic init -q -r "$W/restic-repo" >/dev/null

# Full backup: the same instant for both: one snapshot restic reads, one cowbd takes itself.
drop_caches
log "full backup: cowbd"
t0=$(now)
"${COWBD[@]}" backup create vol --repo "$W/cowbd-repo" --json --data-dir "$D" >"$W/full.json"
cowbd_full=$(since "$t0")
snapshot "$D" r1 vol
drop_caches
log "full backup: restic"
t0=$(now)
restic_backup r1 "$W/restic-repo"
restic_full=$(since "$t0")
"${COWBD[@]}" snapshot remove r1 --data-dir "$D" >/dev/null
cowbd_repo=$(dusize "$W/cowbd-repo")
restic_repo=$(dusize "$W/restic-repo")

# Incremental after 1% of the chunks rewritten, scattered.
rewrite_one_percent 42
log "incremental: cowbd ($changed chunks changed)"
t0=$(now)
"${COWBD[@]}" backup create vol --repo "$W/cowbd-repo" --json --data-dir "$D" >"$W/inc.json"
cowbd_inc=$(since "$t0")
inc_read=$(summary_field "$W/inc.json" bytesRead)
inc_id=$(summary_field "$W/inc.json" id)
snapshot "$D" r2 vol
log "incremental: restic"
t0=$(now)
restic_backup r2 "$W/restic-repo"
restic_inc=$(since "$t0")
"${COWBD[@]}" snapshot remove r2 --data-dir "$D" >/dev/null

# Restore to a file.
drop_caches
log "restore: cowbd"
t0=$(now)
"${COWBD[@]}" backup restore "$inc_id" --repo "$W/cowbd-repo" --to-file "$W/cowbd.img" --no-progress >/dev/null
cowbd_restore=$(since "$t0")
rm -f "$W/cowbd.img"
drop_caches
log "restore: restic"
t0=$(now)
restic restore -q -r "$W/restic-repo" latest --target "$W/restic-out" >/dev/null
restic_restore=$(since "$t0")
rm -rf "$W/restic-out"

# Origin 4K random-write IOPS, alone and while a backup runs.
fio_iops() { # out
  fio --name=rw --ioengine=nbd --uri="$URI/vol" --rw=randwrite --bs=4k --iodepth=16 --size="$BK_SIZE" \
    --time_based --runtime="$BK_FIO_SECONDS" --output-format=json --output="$1" >/dev/null
  python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['iops']))" "$1"
}
log "random writes alone"
iops_alone=$(fio_iops "$W/fio-alone.json")
log "random writes during a backup"
/usr/bin/python3 "$BENCH/backup-writes.py" "$URI/vol" scatter "$changed" 65536 7
"${COWBD[@]}" backup create vol --repo "$W/cowbd-repo" --json --data-dir "$D" --snapshot-size "$BK_SIZE" >"$W/during.json" &
bpid=$!
iops_during=$(fio_iops "$W/fio-during.json")
wait "$bpid"
during_read=$(summary_field "$W/during.json" bytesRead)

# The daemon's RSS while it backs up a huge sparse volume.
"${COWBD[@]}" volume create huge --size "$BK_HUGE" --data-dir "$D" >/dev/null
log "writing $BK_HUGE_DATA into a $BK_HUGE volume"
/usr/bin/python3 "$BENCH/backup-writes.py" "$URI/huge" fill "$(bytes "$BK_HUGE_DATA")" $(( $(bytes "$BK_HUGE") / ($(bytes "$BK_HUGE_DATA") >> 20) ))
rss_peak=0
t0=$(now)
"${COWBD[@]}" backup create huge --repo "$W/cowbd-repo" --json --data-dir "$D" >"$W/huge.json" &
bpid=$!
while kill -0 "$bpid" 2>/dev/null; do
  r=$(awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$DPID/status")
  [ "$r" -gt "$rss_peak" ] && rss_peak=$r
  sleep 0.1
done
wait "$bpid"
huge_time=$(since "$t0")

python3 - "$OUT/backup.md" <<PY
import sys
def r(a, b): return f"{float(a) / float(b):.2f}" if float(b) else "-"
size, data = "$BK_SIZE", "$BK_DATA"
rows = [
  ("full backup, wall s", "$cowbd_full", "$restic_full", r("$cowbd_full", "$restic_full"), "<= 1.00"),
  ("repository after full, MiB", f"{$cowbd_repo / 2**20:.0f}", f"{$restic_repo / 2**20:.0f}", r("$cowbd_repo", "$restic_repo"), "<= 1.05"),
  ("incremental (1% rewritten), wall s", "$cowbd_inc", "$restic_inc", r("$cowbd_inc", "$restic_inc"), "<= 0.10"),
  ("incremental, bytes read / changed", f"{$inc_read / ($changed * 65536):.2f}", "-", "-", "<= 2.00"),
  ("restore, MiB/s of volume", f"{$(bytes "$BK_SIZE") / 2**20 / float('$cowbd_restore'):.0f}", f"{$(bytes "$BK_SIZE") / 2**20 / float('$restic_restore'):.0f}", r("$restic_restore", "$cowbd_restore"), ">= 1.00"),
  ("origin 4K randwrite IOPS during / without backup", "$iops_during", "$iops_alone", r("$iops_during", "$iops_alone"), ">= 0.80"),
  ("daemon peak RSS, $BK_HUGE sparse backup, MiB", f"{$rss_peak / 2**20:.0f}", "-", "-", "< 256"),
]
with open(sys.argv[1], "w") as f:
  f.write(f"\n### Backups: cowbd vs restic {'$(restic version | cut -d" " -f2)'} ({size} volume, {data} random data)\n\n")
  f.write("| measure | cowbd | restic | ratio | target |\n|---|---:|---:|---:|---|\n")
  for row in rows: f.write("| " + " | ".join(row) + " |\n")
  f.write(f"\nThe {size} backup during fio read {$during_read / 2**20:.0f} MiB; the $BK_HUGE backup took $huge_time s.\n")
PY
cat "$OUT/backup.md"
