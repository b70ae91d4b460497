#!/usr/bin/env bash
# Reproduces the open question of BENCHMARKS.md ("short exception counts"): random 4 KiB
# first writes into 8192 distinct chunks of a 1 GiB volume with NS snapshots, then a
# FLUSH, then the first snapshot's exception count, its data, and the origin's data.
# A round prints one line; a short count is one below 8192. Needs a build (npm run build),
# fio, python3-libnbd. Usage: ROUNDS=20 NS=4 bash scripts/bench/short-count.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-20} NS=${NS:-4} PORT=${PORT:-10931}
D=$(mktemp -d)
trap 'kill $CP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
CHK=(/usr/bin/python3 scripts/bench/short-count-check.py)
ctl() { python3 scripts/bench/cowctl.py call "$D/c/control.sock" "$@"; }
node dist/daemon/cli.cjs volume create bench --size 1G --data-dir "$D/c" >/dev/null
node dist/daemon/cli.cjs serve --data-dir "$D/c" --listen 127.0.0.1:$PORT --metrics-listen off --log-level warn >"$D/log" 2>&1 &
CP=$!
sleep 1.5
U=nbd://127.0.0.1:$PORT/bench
flush() { /usr/bin/python3 -c "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()" "$U"; }
fio --name=fill --ioengine=nbd --uri=$U --rw=write --bs=1M --iodepth=8 --size=1G --output-format=json >/dev/null
python3 scripts/bench/cowctl.py iolog "$D/iolog" $((1 << 30)) 65536 8192
for r in $(seq "$ROUNDS"); do
  fio --name=pre --ioengine=nbd --uri=$U --rw=randwrite --bs=4k --iodepth=16 --size=1G --read_iolog="$D/iolog" --output-format=json >/dev/null 2>&1
  flush
  "${CHK[@]}" ref "$U" "$D/iolog" "$D/ref.json"
  for i in $(seq "$NS"); do ctl POST /v1/snapshots "{\"name\":\"s$i\",\"origin\":\"bench\",\"size\":\"1200M\",\"chunkSize\":\"65536\"}" >/dev/null; done
  pat=5a5a$(printf %02x $((r % 256)))a5
  echo -n "round $r: "
  fio --name=run --ioengine=nbd --uri=$U --rw=randwrite --bs=4k --iodepth=16 --size=1G --read_iolog="$D/iolog" --buffer_pattern=0x$pat --output-format=json 2>/dev/null |
    sed -n '/^{/,$p' | python3 -c "import json, sys; j = json.load(sys.stdin)['jobs'][0]; print('fio writes', j['write']['total_ios'], 'error', j['error'], end=' ')"
  flush
  ctl GET /v1/snapshots/s1 | python3 -c "import json, sys; print('exceptions', json.load(sys.stdin)['exceptions'], end=' ')"
  "${CHK[@]}" snap nbd://127.0.0.1:$PORT/s1 "$D/iolog" "$D/ref.json"
  "${CHK[@]}" origin "$U" "$D/iolog" "$pat"
  ctl GET /v1/snapshots/s1 | python3 -c "import json, sys; print('exceptions again', json.load(sys.stdin)['exceptions'])"
  for i in $(seq "$NS"); do ctl DELETE "/v1/snapshots/s$i" >/dev/null; done
done
grep -v '"level":30' "$D/log" | head -5
