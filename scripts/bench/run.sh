#!/usr/bin/env bash
# fio (nbd engine) against cowbd and, as the yardstick, nbdkit's file plugin,
# each serving a fresh sparse file of the same size on the same filesystem.
# Jobs run interleaved: every round runs each job on every target in turn, so
# drift in the machine's state lands on all targets alike. Prints a markdown
# table of medians across rounds. Asserts nothing about speed.
#
# Usage: npm run bench   (builds first), or bash scripts/bench/run.sh
# Knobs (environment):
#   ROUNDS=3 RUNTIME=8 SIZE=1G        rounds, seconds per job, volume size
#   TARGETS="cowbd nbdkit"            which targets, in this order; the first
#                                     nbdkit one is the baseline for ratios
#   JOBS="seqread seqwrite randread randwrite"
#   BENCH_DIR=/tmp                    where the volumes live (one filesystem)
#   KEEP=1                            keep the raw fio JSON and logs
#
# Adding a target: define target_NAME_start and (optionally) target_NAME_stop.
# start gets a fresh empty directory; it must start the server and set URI.
# It may record pids with track_pid so cleanup always ends them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
SIZE=${SIZE:-1G}
TARGETS=${TARGETS:-"cowbd nbdkit"}
JOBS=${JOBS:-"seqread seqwrite randread randwrite"}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}

WORK=$(mktemp -d "$BENCH_DIR/cowbd-bench.XXXXXX")
RESULTS=$WORK/results
mkdir -p "$RESULTS"
PIDS=()

track_pid() { PIDS+=("$1"); }

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then
    rm -f "$WORK"/*/*.vol "$WORK"/*/bench 2>/dev/null || true
    echo "raw results kept in $RESULTS" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # port pid
  local i
  for i in $(seq 1 200); do
    if ! kill -0 "$2" 2>/dev/null; then echo "server (pid $2) died before listening" >&2; return 1; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on port $1" >&2
  return 1
}

# ---- targets ---------------------------------------------------------------

COWBD=(node "$ROOT/dist/daemon/cli.js")

# cowbd serving one fresh origin volume, no snapshots.
target_cowbd_start() { # dir
  local dir=$1 port pid
  "${COWBD[@]}" volume create bench --size "$SIZE" --data-dir "$dir" >/dev/null
  port=$(free_port)
  "${COWBD[@]}" serve --data-dir "$dir" --listen "127.0.0.1:$port" --log-level warn >"$dir/log" 2>&1 &
  pid=$!
  track_pid "$pid"
  wait_for_port "$port" "$pid"
  URI="nbd://127.0.0.1:$port/bench"
}

# nbdkit's file plugin on a sparse file like cowbd's: the reference server.
target_nbdkit_start() { # dir
  local dir=$1 port pid
  truncate -s "$SIZE" "$dir/bench"
  port=$(free_port)
  nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" file dir="$dir" >"$dir/log" 2>&1 &
  pid=$!
  track_pid "$pid"
  wait_for_port "$port" "$pid"
  URI="nbd://127.0.0.1:$port/bench"
}

# ---- jobs ------------------------------------------------------------------

# name -> "rw bs iodepth"
declare -A JOB_SPEC=(
  [seqread]="read 1M 8"
  [seqwrite]="write 1M 8"
  [randread]="randread 4k 16"
  [randwrite]="randwrite 4k 16"
)

run_fio() { # name uri out [extra fio args...]
  local name=$1 uri=$2 out=$3
  shift 3
  local spec rw bs qd
  spec=${JOB_SPEC[$name]:?unknown job $name}
  read -r rw bs qd <<<"$spec"
  fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
    --size="$SIZE" --output-format=json --output="$out" "$@" >/dev/null
}

# ---- run -------------------------------------------------------------------

declare -A URIS
for t in $TARGETS; do
  if ! declare -F "target_${t}_start" >/dev/null; then echo "unknown target $t" >&2; exit 2; fi
  mkdir -p "$WORK/$t"
  URI=
  "target_${t}_start" "$WORK/$t"
  URIS[$t]=$URI
  # Reads of a never-written sparse file measure nothing, so every target is
  # filled once with the same sequential write before any measurement.
  echo "filling $t ($SIZE at $URI)" >&2
  run_fio seqwrite "$URI" "$WORK/$t/prefill.json"
done

for round in $(seq 1 "$ROUNDS"); do
  for job in $JOBS; do
    for t in $TARGETS; do
      echo "round $round/$ROUNDS: $job on $t" >&2
      run_fio "$job" "${URIS[$t]}" "$RESULTS/$round.$job.$t.json" --runtime="$RUNTIME" --time_based --ramp_time=1
    done
  done
done

for t in $TARGETS; do
  if declare -F "target_${t}_stop" >/dev/null; then "target_${t}_stop" "$WORK/$t"; fi
done

python3 "$ROOT/scripts/bench/summarize.py" --results "$RESULTS" --targets "$TARGETS" --jobs "$JOBS" \
  --rounds "$ROUNDS" --runtime "$RUNTIME" --size "$SIZE"
