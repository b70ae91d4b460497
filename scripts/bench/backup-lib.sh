# Sourced by the backup benchmarks (backup.sh, backup-s3.sh), so both back up the same
# volume the same way: the daemon, the BK_SIZE volume with BK_DATA of random data, the 1%
# rewrite, restic fed a snapshot by nbdcopy, and timing.
# The sourcing script sets ROOT, BENCH, W (its work directory), PIDS=() and BK_SIZE first.

bytes() { numfmt --from=iec "$1"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
COWBD=(node "$ROOT/dist/daemon/cli.cjs")

start_daemon() { # dir port
  "${COWBD[@]}" serve --data-dir "$1" --listen "127.0.0.1:$2" --metrics-listen off --log-level warn >"$1.log" 2>&1 &
  DPID=$!
  PIDS+=("$DPID")
  for _ in $(seq 1 200); do [ -S "$1/nbd.sock" ] && return 0; sleep 0.05; done
  echo "daemon did not start: $(tail -5 "$1.log")" >&2
  exit 1
}
snapshot() { # dir name origin
  "${COWBD[@]}" snapshot create "$2" --origin "$3" --size "$(bytes "$BK_SIZE")" --read-only --data-dir "$1" >/dev/null
}
summary_field() { # json-lines-file field
  python3 -c "
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d.get('type') == 'summary': print(d['stats'][sys.argv[2]] if sys.argv[2] in d['stats'] else d[sys.argv[2]])" "$1" "$2"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# The volume of the backup issue: `vol` of BK_SIZE in data directory D=$W/data, served by
# a daemon at URI, with BK_DATA of random data (1 MiB pieces, every other MiB).
make_backup_volume() {
  D=$W/data
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$D"
  "${COWBD[@]}" volume create vol --size "$BK_SIZE" --data-dir "$D" >/dev/null
  start_daemon "$D" "$PORT"
  URI="nbd://127.0.0.1:$PORT"
  log "writing $BK_DATA of random data into $BK_SIZE"
  /usr/bin/python3 "$BENCH/backup-writes.py" "$URI/vol" fill "$(bytes "$BK_DATA")" $((2 << 20))
}

# 1% of vol's 64 KiB chunks rewritten with random data, scattered (seeded); sets `changed`.
rewrite_one_percent() { # seed
  local chunks=$(($(bytes "$BK_SIZE") / 65536))
  changed=$((chunks / 100))
  /usr/bin/python3 "$BENCH/backup-writes.py" "$URI/vol" scatter "$changed" 65536 "$1"
}

# restic backs up one snapshot of the daemon, streamed by nbdcopy, as one file.
restic_backup() { # snapshot repo
  nbdcopy "$URI/$1" - | restic backup -q -r "$2" --stdin --stdin-filename vol.img >/dev/null
}
