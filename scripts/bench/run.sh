#!/usr/bin/env bash
# The benchmark of issue 6: fio (nbd engine) against cowbd and, as the
# yardstick, nbdkit's file plugin, each serving a fresh sparse file of the same
# size on the same filesystem; then cowbd's copy-on-write costs, snapshot
# creation latency (with the store's size reserved on disk, and sparse), and memory
# and restart time at 1M exceptions.
# Jobs run interleaved: every round runs each job on every target in turn, so
# drift in the machine's state lands on all targets alike, and each ratio
# compares runs of one round. Prints markdown tables of medians across rounds
# with ratios and the issue's targets. Asserts nothing about speed.
#
# Usage: npm run bench   (builds first), or bash scripts/bench/run.sh
# Knobs (environment):
#   SECTIONS="base conns cow rewrite snapread create reserve memory engine backup backup-s3 merge"   which parts to run:
#     base      cowbd origin (no snapshot) vs nbdkit file, time-based jobs
#     conns     the base jobs over one connection and over four (fio numjobs=4, a
#               connection per job, each on its own quarter of the volume, same
#               iodepth per connection), on cowbd, nbdkit file and qemu-nbd
#               (CONNS_TARGETS); one-connection runs base already made are reused
#     cow       first writes (every chunk uncopied) with 0, 1 and 4 snapshots,
#               size-bounded: seq 1M over the whole volume once; random 4K
#               writes, each into a distinct chunk (RAND_IOS of them)
#     rewrite   1 snapshot whose chunks are all copied, time-based write jobs
#     snapread  reading a snapshot, uncopied then copied, time-based read jobs
#               (rewrite and snapread compare with base's cowbd runs of the
#               round, which run on cowbd alone when base is not selected)
#     create    snapshot creation latency, idle and under a random-write load
#               (stores reserved, the default of `snapshot create`)
#     reserve   snapshot creation with a RESERVE_SIZES store reserved vs sparse, on
#               an ext4 image of its own, loop-mounted (reserve.sh; needs root, else
#               skipped with a line saying why)
#     memory    RSS per exception and restart time with MEM_SIZE/MEM_CHUNK exceptions
#     backup    cowbd backup against restic, fed the same snapshot (backup.sh)
#     backup-s3 the same into a bucket of a one-node Ceph RADOS Gateway, against restic's
#               S3 backend (backup-s3.sh; without Ceph, skipped with a line saying why)
#     engine    the COW engine in process (engine.ts): first-write ratios with 0, 1
#               and 4 snapshots and snapshot/origin read speed on ENGINE_SIZE
#     merge     merging a snapshot with every chunk copied back into its origin
#               (merge.sh): its throughput against cp of a file as big, and origin
#               4K random reads during a merge at the default rate against without
#   ROUNDS=5 RUNTIME=6 SIZE=1G        rounds, seconds per time-based job, volume size
#   CHUNK=64K                         snapshot chunk size for cow/rewrite/snapread
#   RAND_IOS=(half the chunks)        random first writes per run, each in its own chunk
#   TARGETS="cowbd nbdkit"            base targets; the first nbdkit one is the baseline
#   JOBS="seqread seqwrite randread randwrite"   base jobs (and conns jobs)
#   CONNS_TARGETS="cowbd nbdkit qemunbd" CONNS=4   conns: targets, connections of the many-connection runs
#   CREATE_SIZES="1G 1T" CREATE_N=15  volumes for snapshot creation, creations per case
#   RESERVE_SIZES="1G 100G" RESERVE_FS=256G   reserve: store sizes, apparent size of its ext4 image
#   MEM_SIZE=4G MEM_CHUNK=4K RESTARTS=3   memory: exceptions = MEM_SIZE / MEM_CHUNK
#   ENGINE_SIZE=256M                  engine: volume size
#   MERGE_SIZE=(SIZE) MERGE_IOPS_SIZE=(2 x MERGE_SIZE) MERGE_FIO_SECONDS=10
#                                     merge: volume merged for throughput, volume merged
#                                     under the reads (big enough to outlast them), fio time
#   BENCH_DIR=/tmp                    where the volumes live (one filesystem)
#   KEEP=1                            keep the raw fio JSON and logs
#
# Adding a target: define target_NAME_start and (optionally) target_NAME_stop.
# start gets a fresh empty directory; it must start the server and set URI.
# It may record pids with track_pid so cleanup always ends them.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH=$ROOT/scripts/bench

ROUNDS=${ROUNDS:-5}
RUNTIME=${RUNTIME:-6}
SIZE=${SIZE:-1G}
SECTIONS=${SECTIONS:-"base conns cow rewrite snapread create reserve memory engine backup backup-s3 merge"}
TARGETS=${TARGETS:-"cowbd nbdkit"}
JOBS=${JOBS:-"seqread seqwrite randread randwrite"}
CONNS_TARGETS=${CONNS_TARGETS:-"cowbd nbdkit qemunbd"}
CONNS=${CONNS:-4}
CHUNK=${CHUNK:-64K}
CREATE_SIZES=${CREATE_SIZES:-"1G 1T"}
CREATE_N=${CREATE_N:-15}
MEM_SIZE=${MEM_SIZE:-4G}
MEM_CHUNK=${MEM_CHUNK:-4K}
RESTARTS=${RESTARTS:-3}
ENGINE_SIZE=${ENGINE_SIZE:-256M}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}

for s in $SECTIONS; do
  case $s in base | conns | cow | rewrite | snapread | create | reserve | memory | engine | backup | backup-s3 | merge) ;; *) echo "unknown section $s" >&2; exit 2 ;; esac
done
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
bytes() { numfmt --from=iec "${1%B}"; }

SIZE_BYTES=$(bytes "$SIZE")
CHUNK_BYTES=$(bytes "$CHUNK")
# Exception store big enough for every chunk of the volume plus its metadata: never invalidated.
STORE_BYTES=$((SIZE_BYTES + SIZE_BYTES / 8 + 64 * 1024 * 1024))
RAND_IOS=${RAND_IOS:-$((SIZE_BYTES / CHUNK_BYTES / 2))}

WORK=$(mktemp -d "$BENCH_DIR/cowbd-bench.XXXXXX")
RESULTS=$WORK/results
mkdir -p "$RESULTS"
PIDS=()
START=$(date +%s)

track_pid() { PIDS+=("$1"); }
untrack_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then
    rm -f "$WORK"/*/*.vol "$WORK"/*/bench "$WORK"/*/cow/* 2>/dev/null || true
    echo "raw results kept in $RESULTS" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$(($(date +%s) - START)) s] $*" >&2; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # port pid
  local i
  for i in $(seq 1 600); do
    if ! kill -0 "$2" 2>/dev/null; then echo "server (pid $2) died before listening" >&2; return 1; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listening on port $1" >&2
  return 1
}

stop_pid() { # pid: SIGTERM, wait for it to exit (a daemon flushes first)
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  untrack_pid "$1"
}

rss_of() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status"; }

# ---- cowbd control ----------------------------------------------------------

# Other work in this tree may rebuild dist/ while the bench runs: every daemon
# started here runs one copy of it, taken now, so one run measures one build.
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [ -n "$(git status --porcelain --untracked-files=no -- cow daemon protocol 2>/dev/null)" ]; then
  COMMIT="$COMMIT + uncommitted changes to $(git status --porcelain --untracked-files=no -- cow daemon protocol | awk '{ print $2 }' | paste -sd, -)"
fi
mkdir -p "$WORK/build"
cp -r "$ROOT/dist" "$WORK/build/dist"
cp "$ROOT/package.json" "$WORK/build/"
ln -s "$ROOT/node_modules" "$WORK/build/node_modules"
COWBD=(node "$WORK/build/dist/daemon/cli.cjs")

ctl() { # sock method path [json]
  python3 "$BENCH/cowctl.py" call "$@"
}

snap_create() { # sock origin name store-bytes chunk-bytes
  ctl "$1" POST /v1/snapshots "{\"name\":\"$3\",\"origin\":\"$2\",\"size\":\"$4\",\"chunkSize\":\"$5\"}" >/dev/null
}

snap_remove() { # sock name
  ctl "$1" DELETE "/v1/snapshots/$2" >/dev/null
}

# ---- targets ---------------------------------------------------------------

# cowbd serving one fresh origin volume, no snapshots.
target_cowbd_start() { # dir
  local dir=$1 port pid
  "${COWBD[@]}" volume create bench --size "$SIZE" --data-dir "$dir" >/dev/null
  port=$(free_port)
  "${COWBD[@]}" serve --data-dir "$dir" --listen "127.0.0.1:$port" --metrics-listen off --log-level warn >"$dir/log" 2>&1 &
  pid=$!
  track_pid "$pid"
  wait_for_port "$port" "$pid"
  URI="nbd://127.0.0.1:$port/bench"
  COWBD_PORT=$port
  COWBD_SOCK=$dir/control.sock
  COWBD_VOL=$dir/bench.vol
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

# qemu-nbd on a sparse raw file: the other reference server. -e lets several
# clients in at once (the default is one); -t keeps it up between fio runs.
target_qemunbd_start() { # dir
  local dir=$1 port pid
  truncate -s "$SIZE" "$dir/bench"
  port=$(free_port)
  qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$port" -t -e 16 "$dir/bench" >"$dir/log" 2>&1 &
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

flush_time() { # uri out: seconds one FLUSH takes (flush-time.py)
  /usr/bin/python3 "$BENCH/flush-time.py" "$1" >"$2"
}

timed() { # the time-based shape of a job
  # Every timed job starts with no dirty page cache: otherwise a job pays for the
  # writeback of whatever ran before it, and the order of jobs decides ratios.
  sync
  run_fio "$@" --runtime="$RUNTIME" --time_based --ramp_time=1
}

# ---- throughput: base, cow, rewrite, snapread --------------------------------

BASE_TARGETS=
if has base; then
  BASE_TARGETS=$TARGETS
elif has rewrite || has snapread; then
  BASE_TARGETS=cowbd
fi
START_TARGETS=$BASE_TARGETS
if has conns; then
  for t in $CONNS_TARGETS; do
    [[ " $START_TARGETS " == *" $t "* ]] || START_TARGETS="$START_TARGETS $t"
  done
fi
if { has cow || has rewrite || has snapread; } && [[ " $START_TARGETS " != *" cowbd "* ]]; then
  START_TARGETS="cowbd $START_TARGETS"
fi
BASE_JOBS=$JOBS
if ! has base; then
  BASE_JOBS=
  has snapread && BASE_JOBS="seqread randread"
  has rewrite && BASE_JOBS="$BASE_JOBS seqwrite randwrite"
fi

declare -A URIS
for t in $START_TARGETS; do
  if ! declare -F "target_${t}_start" >/dev/null; then echo "unknown target $t" >&2; exit 2; fi
  mkdir -p "$WORK/$t"
  URI=
  "target_${t}_start" "$WORK/$t"
  URIS[$t]=$URI
  # Reads of a never-written sparse file measure nothing, and first writes of
  # a snapshot must copy real data, so every target is filled once with the
  # same sequential write before any measurement.
  log "filling $t ($SIZE at $URI)"
  run_fio seqwrite "$URI" "$WORK/$t/prefill.json"
done

if has cow; then
  IOLOG=$WORK/randwrite-first.iolog
  python3 "$BENCH/cowctl.py" iolog "$IOLOG" "$SIZE_BYTES" "$CHUNK_BYTES" "$RAND_IOS"
fi

COW_SNAPS="1 4"
rewrite_reference() {
  for job in seqwrite randwrite; do
    log "round $round/$ROUNDS: $job on cowbd, no snapshot (the rewrites' reference)"
    timed "$job" "${URIS[cowbd]}" "$RESULTS/$round.$job.cowbd-ref.json"
  done
}
QUARTER=$((SIZE_BYTES / CONNS))
for round in $(seq 1 "$ROUNDS"); do
  for job in $BASE_JOBS; do
    for t in $BASE_TARGETS; do
      log "round $round/$ROUNDS: $job on $t"
      timed "$job" "${URIS[$t]}" "$RESULTS/$round.$job.$t.json"
    done
  done

  if has conns; then
    # One figure per target and job: fio sums its jobs (connections) with group_reporting.
    for job in $JOBS; do
      for t in $CONNS_TARGETS; do
        if ! [[ " $BASE_TARGETS " == *" $t "* && " $BASE_JOBS " == *" $job "* ]]; then
          log "round $round/$ROUNDS: $job on $t, 1 connection"
          timed "$job" "${URIS[$t]}" "$RESULTS/$round.$job.$t.json"
        fi
        log "round $round/$ROUNDS: $job on $t, $CONNS connections"
        timed "$job" "${URIS[$t]}" "$RESULTS/$round.$job-conns.$t.json" \
          --numjobs="$CONNS" --group_reporting --size="$QUARTER" --offset_increment="$QUARTER"
      done
    done
  fi

  if has cow; then
    # First writes: fresh snapshots made right before each run, every chunk
    # uncopied; runs bounded by size so none wraps onto a copied chunk. The
    # no-snapshot run of the same shape goes first, after a sync of the volume
    # file (creating a snapshot flushes the origin, so all start clean).
    for job in seqwrite randwrite; do
      extra=()
      [ "$job" = randwrite ] && extra=(--read_iolog="$IOLOG")
      sync "$COWBD_VOL"
      log "round $round/$ROUNDS: first-write $job on cowbd, no snapshot"
      run_fio "$job" "${URIS[cowbd]}" "$RESULTS/$round.cow-$job.cowbd.json" "${extra[@]}"
      flush_time "${URIS[cowbd]}" "$RESULTS/$round.cow-$job.cowbd.flush"
      for n in $COW_SNAPS; do
        for i in $(seq 1 "$n"); do snap_create "$COWBD_SOCK" bench "cow$i" "$STORE_BYTES" "$CHUNK_BYTES"; done
        log "round $round/$ROUNDS: first-write $job on cowbd, $n snapshot(s)"
        run_fio "$job" "${URIS[cowbd]}" "$RESULTS/$round.cow-$job.cowbd-${n}snap.json" "${extra[@]}"
        flush_time "${URIS[cowbd]}" "$RESULTS/$round.cow-$job.cowbd-${n}snap.flush"
        ctl "$COWBD_SOCK" GET /v1/snapshots/cow1 >"$RESULTS/$round.cow-$job.cowbd-${n}snap.meta"
        for i in $(seq 1 "$n"); do snap_remove "$COWBD_SOCK" "cow$i"; done
      done
    done
  fi

  if has rewrite || has snapread; then
    # The rewrites' own no-snapshot reference, on the same origin in the same round:
    # right before the snapshot in odd rounds, right after its removal in even ones.
    # Against the base section's runs at the round's start, the ratio moved with what
    # ran in between (0.82-1.06 per round) while the copy-on-write layer did not show
    # in a CPU profile of the rewrites. Which run goes first moved the ratio too (median
    # 0.94 over 4 rounds with the reference first, 1.00 with the rewrite first), so the
    # order alternates.
    has rewrite && ((round % 2 == 1)) && rewrite_reference
    snapuri=${URIS[cowbd]%/bench}/rs
    snap_create "$COWBD_SOCK" bench rs "$STORE_BYTES" "$CHUNK_BYTES"
    if has snapread; then
      for job in seqread randread; do
        log "round $round/$ROUNDS: $job on a snapshot, chunks uncopied"
        timed "$job" "$snapuri" "$RESULTS/$round.$job.snap-uncopied.json"
      done
    fi
    log "round $round/$ROUNDS: copying every chunk (sequential write of the whole origin)"
    run_fio seqwrite "${URIS[cowbd]}" "$RESULTS/$round.copyall.cowbd-1snap.json"
    # Held writes land (and their chunks are copied) before "copied" is measured.
    flush_time "${URIS[cowbd]}" "$RESULTS/$round.copyall.cowbd-1snap.flush"
    ctl "$COWBD_SOCK" GET /v1/snapshots/rs >"$RESULTS/$round.copyall.cowbd-1snap.meta"
    if has rewrite; then
      for job in seqwrite randwrite; do
        log "round $round/$ROUNDS: $job on cowbd, 1 snapshot, chunks all copied"
        timed "$job" "${URIS[cowbd]}" "$RESULTS/$round.$job.cowbd-1snap-copied.json"
      done
    fi
    if has snapread; then
      for job in seqread randread; do
        log "round $round/$ROUNDS: $job on a snapshot, chunks all copied"
        timed "$job" "$snapuri" "$RESULTS/$round.$job.snap-copied.json"
      done
    fi
    snap_remove "$COWBD_SOCK" rs
    has rewrite && ((round % 2 == 0)) && rewrite_reference
  fi
done

for t in $START_TARGETS; do
  if declare -F "target_${t}_stop" >/dev/null; then "target_${t}_stop" "$WORK/$t"; fi
done
# The throughput servers are done: free their page cache and disk before the next sections.
for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
rm -f "$WORK"/*/*.vol "$WORK"/*/bench "$WORK"/*/cow/* 2>/dev/null || true

# ---- snapshot creation --------------------------------------------------------

if has create; then
  dir=$WORK/create
  mkdir -p "$dir"
  vols=()
  for s in $CREATE_SIZES; do
    v=c$(echo "$s" | tr 'A-Z' 'a-z')
    "${COWBD[@]}" volume create "$v" --size "$s" --data-dir "$dir" >/dev/null
    vols+=("$v")
  done
  port=$(free_port)
  "${COWBD[@]}" serve --data-dir "$dir" --listen "127.0.0.1:$port" --metrics-listen off --log-level info >"$dir/log" 2>&1 &
  cpid=$!
  track_pid "$cpid"
  wait_for_port "$port" "$cpid"
  for v in "${vols[@]}"; do
    vb=$(stat -c %s "$dir/$v.vol")
    # Volumes up to 16 GiB are filled (their chunks hold data, so a load copies); bigger ones stay sparse.
    if [ "$vb" -le $((16 << 30)) ]; then
      log "create: filling $v"
      fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$port/$v" --rw=write --bs=1M --iodepth=8 --size="$vb" \
        --output-format=json --output="$dir/fill-$v.json" >/dev/null
      store=$((vb + vb / 8 + 64 * 1024 * 1024))
    else
      store=$((2 << 30))
    fi
    for load in idle load; do
      sync "$dir/$v.vol"
      lpid=
      if [ $load = load ]; then
        fio --name=load --ioengine=nbd --uri="nbd://127.0.0.1:$port/$v" --rw=randwrite --bs=4k --iodepth=16 --size="$vb" \
          --time_based --runtime=600 --output-format=json --output="$RESULTS/create.$v.load.fio.json" >/dev/null &
        lpid=$!
        track_pid "$lpid"
        sleep 2
      fi
      for mode in fresh held; do
        # fresh: the origin has no other snapshot (its store file is created);
        # held: one other snapshot exists (its store is reused).
        [ $mode = held ] && snap_create "$dir/control.sock" "$v" hold "$store" 65536
        log "create: $CREATE_N snapshots of $v, $load, $mode"
        python3 "$BENCH/cowctl.py" create-times "$dir/control.sock" "$v" "$store" "$CREATE_N" >"$RESULTS/create.$v.$load.$mode.json"
        [ $mode = held ] && snap_remove "$dir/control.sock" hold
      done
      if [ -n "$lpid" ]; then
        kill -INT "$lpid" 2>/dev/null || true
        wait "$lpid" 2>/dev/null || true
        untrack_pid "$lpid"
      fi
    done
  done
  stop_pid "$cpid"
  cp "$dir/log" "$RESULTS/create.log"
  rm -f "$dir"/*.vol "$dir"/cow/*
fi

# ---- snapshot creation, reserved against sparse --------------------------------

if has reserve; then
  log "reserve: snapshot creation with the store reserved and sparse, on a loop-mounted ext4"
  # In the background and tracked, so an interrupted bench ends it and its trap unmounts.
  COWBD_CLI=$WORK/build/dist/daemon/cli.cjs CREATE_N=$CREATE_N BENCH_DIR=$WORK bash "$BENCH/reserve.sh" "$RESULTS" &
  rpid=$!
  track_pid "$rpid"
  wait "$rpid"
  untrack_pid "$rpid"
fi

# ---- memory and restart ------------------------------------------------------

if has memory; then
  dir=$WORK/memory
  mkdir -p "$dir"
  "${COWBD[@]}" volume create m --size "$MEM_SIZE" --data-dir "$dir" >/dev/null
  port=$(free_port)
  mport=$(free_port)
  serve=("${COWBD[@]}" serve --data-dir "$dir" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" --log-level warn)
  mem_bytes=$(bytes "$MEM_SIZE")
  mem_chunk=$(bytes "$MEM_CHUNK")
  "${serve[@]}" >"$dir/log" 2>&1 &
  mpid=$!
  track_pid "$mpid"
  wait_for_port "$port" "$mpid"
  log "memory: filling m ($MEM_SIZE)"
  fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$port/m" --rw=write --bs=1M --iodepth=8 --size="$MEM_SIZE" \
    --output-format=json --output="$RESULTS/memory.fill.fio.json" >/dev/null
  stop_pid "$mpid"
  log "memory: $RESTARTS restarts with no snapshot"
  python3 "$BENCH/cowctl.py" restart "$RESTARTS" "$RESULTS/memory.restart0.json" -- "${serve[@]}"
  "${serve[@]}" >>"$dir/log" 2>&1 &
  mpid=$!
  track_pid "$mpid"
  wait_for_port "$port" "$mpid"
  snap_create "$dir/control.sock" m ms $((mem_bytes + mem_bytes / 8 + 64 * 1024 * 1024)) "$mem_chunk"
  rss0=$(rss_of "$mpid")
  log "memory: copying every $MEM_CHUNK chunk of m (sequential 1M writes)"
  fio --name=copy --ioengine=nbd --uri="nbd://127.0.0.1:$port/m" --rw=write --bs=1M --iodepth=8 --size="$MEM_SIZE" \
    --output-format=json --output="$RESULTS/memory.copy.fio.json" >/dev/null
  # Every copy made and every held write landed (and its memory freed) before counting.
  flush_time "nbd://127.0.0.1:$port/m" "$RESULTS/memory.flush"
  sleep 1
  rss1=$(rss_of "$mpid")
  ctl "$dir/control.sock" GET /v1/snapshots/ms >"$RESULTS/memory.snap.json"
  mapb=$(python3 -c 'import re, sys, urllib.request
t = urllib.request.urlopen(sys.argv[1]).read().decode()
m = re.search(r"^cowbd_cow_exception_map_bytes (\S+)$", t, re.M)
print(m.group(1) if m else "null")' "http://127.0.0.1:$mport/metrics")
  echo "{\"rssBefore\": $rss0, \"rssAfter\": $rss1, \"exceptionMapBytes\": $mapb}" >"$RESULTS/memory.live.json"
  stop_pid "$mpid"
  log "memory: $RESTARTS restarts with the snapshot's exceptions"
  python3 "$BENCH/cowctl.py" restart "$RESTARTS" "$RESULTS/memory.restart1.json" -- "${serve[@]}"
  rm -f "$dir"/*.vol "$dir"/cow/*
fi

# ---- the engine in process ---------------------------------------------------

if has engine; then
  log "engine: first writes and reads in process ($ENGINE_SIZE)"
  mkdir -p "$WORK/engine"
  # Run from the working tree's sources, as the tests do: no daemon, no build needed.
  TS_NODE_TRANSPILE_ONLY=1 node --import @tapjs/typescript/import "$BENCH/engine.ts" "$WORK/engine" "$(bytes "$ENGINE_SIZE")" >"$RESULTS/engine.md"
fi

if has backup; then
  log "backup: cowbd backup against restic"
  bash "$BENCH/backup.sh" "$RESULTS" >/dev/null
fi

if has backup-s3; then
  log "backup-s3: cowbd backup against restic, into a Ceph S3 gateway"
  # In the background and tracked, so an interrupted bench ends it and its trap stops the cluster.
  bash "$BENCH/backup-s3.sh" "$RESULTS" >/dev/null &
  spid=$!
  track_pid "$spid"
  wait "$spid"
  untrack_pid "$spid"
fi

if has merge; then
  log "merge: a snapshot merged back into its origin"
  # In the background and tracked, so an interrupted bench ends it and its trap cleans up.
  COWBD_CLI=$WORK/build/dist/daemon/cli.cjs CHUNK=$CHUNK BENCH_DIR=$WORK MERGE_SIZE=${MERGE_SIZE:-$SIZE} \
    MERGE_IOPS_SIZE=${MERGE_IOPS_SIZE:-$((2 * $(bytes "${MERGE_SIZE:-$SIZE}")))} bash "$BENCH/merge.sh" "$RESULTS" &
  gpid=$!
  track_pid "$gpid"
  wait "$gpid"
  untrack_pid "$gpid"
fi

log "done"
python3 "$BENCH/summarize.py" --results "$RESULTS" --targets "$TARGETS" --jobs "$BASE_JOBS" --base-targets "$BASE_TARGETS" \
  --conns-targets "$CONNS_TARGETS" --conns-jobs "$JOBS" --conns "$CONNS" \
  --sections "$SECTIONS" --rounds "$ROUNDS" --runtime "$RUNTIME" --size "$SIZE" --chunk "$CHUNK" --rand-ios "$RAND_IOS" \
  --create-n "$CREATE_N" --mem-size "$MEM_SIZE" --mem-chunk "$MEM_CHUNK" --elapsed "$(($(date +%s) - START))" --commit "$COMMIT"
if has engine; then cat "$RESULTS/engine.md"; fi
if has backup; then cat "$RESULTS/backup.md"; fi
if has backup-s3; then cat "$RESULTS/backup-s3.md"; fi
