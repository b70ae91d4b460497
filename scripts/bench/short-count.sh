#!/usr/bin/env bash
# Checks BENCHMARKS.md's "Short exception counts": random 4 KiB
# first writes into 8192 distinct chunks of a 1 GiB volume with NS snapshots, then a
# FLUSH, then per round: the writes fio issued and saw acknowledged, the writes the
# daemon served (its metrics), every snapshot's exception count, the first snapshot's
# data, and the origin's data. fio replaying an iolog closes its connection with its last
# writes unanswered, so some may never reach the daemon; the invariant is that every
# served write has its exception in every snapshot, and only unserved writes are
# missing from the origin. A round that breaks it says DEFECT.
# Needs a build (npm run build), fio, curl, python3-libnbd.
# Usage: ROUNDS=20 NS=4 bash scripts/bench/short-count.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-20} NS=${NS:-4} PORT=${PORT:-10931} MPORT=${MPORT:-10933}
D=$(mktemp -d)
trap 'kill $CP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
CHK=(/usr/bin/python3 scripts/bench/short-count-check.py)
ctl() { python3 scripts/bench/cowctl.py call "$D/c/control.sock" "$@"; }
node dist/daemon/cli.cjs volume create bench --size 1G --data-dir "$D/c" >/dev/null
node dist/daemon/cli.cjs serve --data-dir "$D/c" --listen 127.0.0.1:$PORT --metrics-listen 127.0.0.1:$MPORT --log-level warn >"$D/log" 2>&1 &
CP=$!
sleep 1.5
U=nbd://127.0.0.1:$PORT/bench
flush() { /usr/bin/python3 -c "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()" "$U"; }
served() { curl -s "http://127.0.0.1:$MPORT/metrics" | awk '/^cowbd_nbd_requests_total\{.*export="bench".*command="write".*result="ok"/ {s += $2} END {printf "%d", s}'; }
fio --name=fill --ioengine=nbd --uri=$U --rw=write --bs=1M --iodepth=8 --size=1G --output-format=json >/dev/null
python3 scripts/bench/cowctl.py iolog "$D/iolog" $((1 << 30)) 65536 8192
for r in $(seq "$ROUNDS"); do
  fio --name=pre --ioengine=nbd --uri=$U --rw=randwrite --bs=4k --iodepth=16 --size=1G --read_iolog="$D/iolog" --output-format=json >/dev/null 2>&1
  flush
  "${CHK[@]}" ref "$U" "$D/iolog" "$D/ref.json"
  for i in $(seq "$NS"); do ctl POST /v1/snapshots "{\"name\":\"s$i\",\"origin\":\"bench\",\"size\":\"1200M\",\"chunkSize\":\"65536\"}" >/dev/null; done
  pat=5a5a$(printf %02x $((r % 256)))a5
  w0=$(served)
  fio --name=run --ioengine=nbd --uri=$U --rw=randwrite --bs=4k --iodepth=16 --size=1G --read_iolog="$D/iolog" --buffer_pattern=0x$pat \
    --output-format=json 2>/dev/null | sed -n '/^{/,$p' >"$D/run.json"
  flush
  s=$(($(served) - w0))
  for i in $(seq "$NS"); do ctl GET "/v1/snapshots/s$i"; echo; done >"$D/snaps.json"
  "${CHK[@]}" snap nbd://127.0.0.1:$PORT/s1 "$D/iolog" "$D/ref.json" >"$D/snap.txt"
  "${CHK[@]}" origin "$U" "$D/iolog" "$pat" >"$D/origin.txt"
  python3 - "$r" "$s" "$D" <<'PY'
import json, sys
r, served, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
w = json.load(open(f"{d}/run.json"))["jobs"][0]["write"]
issued, acked = w["total_ios"], w["io_bytes"] // 4096
snaps = [json.loads(l) for l in open(f"{d}/snaps.json") if l.strip()]
changed = int(open(f"{d}/snap.txt").read().split()[0])
missing = int(open(f"{d}/origin.txt").read().split()[0])
ok = acked <= served <= issued and changed == 0 and missing == issued - served and all(
    s["exceptions"] == served and s["state"] == "valid" for s in snaps)
print(f"round {r}: fio issued {issued}, saw {acked} acknowledged; daemon served {served}; exceptions",
      "/".join(str(s["exceptions"]) for s in snaps), f"; s1 chunks changed {changed}; origin blocks without the run's data {missing}",
      "" if ok else " DEFECT")
PY
  for i in $(seq "$NS"); do ctl DELETE "/v1/snapshots/s$i" >/dev/null; done
done
grep -v '"level":30' "$D/log" | head -5
