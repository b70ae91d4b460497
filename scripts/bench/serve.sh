# Sourced by the bench sections that run a daemon of their own (reserve.sh, merge.sh).
# serve_daemon DATA_DIR LOG_LEVEL LOG_FILE: starts `cowbd serve` on a free port and waits
# until its control socket answers; sets PORT, DPID and SOCK.
serve_daemon() {
  local dir=$1 level=$2 logfile=$3
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${COWBD[@]}" serve --data-dir "$dir" --listen "127.0.0.1:$PORT" --metrics-listen off --log-level "$level" >"$logfile" 2>&1 &
  DPID=$!
  SOCK=$dir/control.sock
  for _ in $(seq 1 600); do
    kill -0 "$DPID" 2>/dev/null || { echo "daemon died: $(tail -5 "$logfile")" >&2; exit 1; }
    python3 "$BENCH/cowctl.py" call "$SOCK" GET /v1/status >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "daemon did not answer on $SOCK" >&2
  exit 1
}
