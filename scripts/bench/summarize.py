#!/usr/bin/env python3
"""Turns the files written by run.sh into markdown tables.

fio results are named ROUND.JOB.TARGET.json (plus ROUND.JOB.TARGET.meta, the
snapshot's state after a copy-on-write run). For each comparison it reports the
median over rounds of the figure and of its reference, the ratio of the two
medians, the spread of the per-round ratios (each from runs of one round), and
the issue 6 target. create.*.json, reserve.*.json and memory.*.json hold the
snapshot creation, the reserved-vs-sparse creation and the memory/restart figures.
"""

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

MiB = 1024 * 1024


def load(path):
    with open(path) as f:
        text = f.read()
    # fio prints some engine chatter before the JSON when it goes to stdout.
    return json.loads(text[text.index("{"):])


def side(job):
    """The direction the job measured: fio reports both, one of them idle."""
    rw = job["job options"].get("rw", "")
    return "write" if "write" in rw else "read"


def machine():
    def cmd(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": cmd("nproc"),
        "cpu": cpu,
        "mem": mem,
        "kernel": platform.release(),
        "node": cmd("node", "--version"),
        "nbdkit": cmd("nbdkit", "--version"),
        "fio": cmd("fio", "--version"),
        "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "dirty": bool(cmd("git", "status", "--porcelain", "--untracked-files=no")),
        # Other work shows up as spread between rounds; the load (which includes fio and the servers themselves) hints at it.
        "load": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"],
    }


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}"


class Results:
    def __init__(self, path):
        self.samples = {}  # (job, target) -> {round: (MiB/s, IOPS)}
        self.meta = {}  # (job, target) -> {round: snapshot usage}
        self.flush = {}  # (job, target) -> {round: seconds of the FLUSH after the run}
        self.runs = {}  # (job, target) -> {round: (bytes, seconds)}
        self.ios = {}  # (job, target) -> {round: requests fio completed}
        self.errors = []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            parts = name.split(".")
            if len(parts) != 4 or not parts[0].isdigit():
                continue
            rnd, job, target, ext = int(parts[0]), parts[1], parts[2], parts[3]
            if ext == "meta":
                with open(full) as f:
                    self.meta.setdefault((job, target), {})[rnd] = json.load(f)
                continue
            if ext == "flush":
                with open(full) as f:
                    self.flush.setdefault((job, target), {})[rnd] = float(f.read().strip() or "nan")
                continue
            if ext != "json":
                continue
            data = load(full)
            for j in data["jobs"]:
                if j.get("error"):
                    self.errors.append(f"{name}: fio error {j['error']}")
                    continue
                s = j[side(j)]
                self.samples.setdefault((job, target), {})[rnd] = (s["bw_bytes"] / MiB, s["iops"])
                self.runs.setdefault((job, target), {})[rnd] = (s["io_bytes"], s["runtime"] / 1000)
                self.ios.setdefault((job, target), {})[rnd] = s.get("total_ios", 0)

    def median(self, key, idx):
        got = self.samples.get(key)
        return statistics.median(v[idx] for v in got.values()) if got else None

    def compare(self, key, ref, idx):
        """(figure, reference, ratio of medians, min and max of per-round ratios, rounds)"""
        fig, base = self.median(key, idx), self.median(ref, idx)
        a, b = self.samples.get(key, {}), self.samples.get(ref, {})
        per = [a[r][idx] / b[r][idx] for r in sorted(a) if r in b and b[r][idx]]
        ratio = fig / base if fig is not None and base else None
        return fig, base, ratio, (min(per), max(per)) if per else None, len(per)


def gib(n):
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 / 100 else f"{n / 1024:.0f} KiB"


def reserve_table(results, create_n):
    """reserve.sh's figures: creation with the store reserved beside sparse, and fallocate(2) alone."""
    print("### Snapshot creation, store reserved vs sparse")
    print()
    skipped = os.path.join(results, "reserve.skipped")
    if os.path.exists(skipped):
        with open(skipped) as f:
            print(f"Skipped: {f.read().strip()}")
        print()
        return
    fs = {}
    try:
        with open(os.path.join(results, "reserve.fs.json")) as f:
            fs = json.load(f)
    except (OSError, ValueError):
        pass
    print(f"POST /v1/snapshots on the control socket, {create_n} creations per case, each removed before the next, no other "
          f"snapshot of the origin (the store file is created), an idle sparse 1 TiB origin; the data dir on an ext4 of "
          f"{fs.get('imageApparent', '?')} of its own (a sparse image, loop-mounted; {fs.get('imageBytesOnDisk', 0) / MiB:.0f} MiB "
          f"of it on disk at the end). sparse = `\"sparse\": true`, nothing reserved, as before issue 24. "
          f"\"allocated\" = what the store file held on disk after one creation (du).")
    print()
    print("| store | mode | allocated | min ms | median ms | max ms | remove median ms | vs sparse | target | met |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    by = {}
    for f in glob.glob(os.path.join(results, "reserve.*.*.json")):
        parts = os.path.basename(f).split(".")
        if len(parts) != 4 or parts[1] == "fs":
            continue
        with open(f) as fh:
            by[(parts[1], parts[2])] = json.load(fh)
    store_bytes = {size: d["storeBytes"] for (size, _), d in by.items()}
    sizes = sorted(store_bytes, key=store_bytes.get)
    for size in sizes:
        sparse = by.get((size, "sparse"))
        for mode, label in (("reserved", "reserved"), ("sparse", "sparse"), ("fallocate", "fallocate(2) alone, no daemon")):
            d = by.get((size, mode))
            if d is None:
                continue
            ms = d["ms"]
            med = statistics.median(ms)
            alloc = gib(d["allocatedBytes"]) if "allocatedBytes" in d else "–"
            remove = f"{statistics.median(d['removeMs']):.1f}" if d.get("removeMs") else "–"
            vs = f"{med / statistics.median(sparse['ms']):.2f}" if mode == "reserved" and sparse else ""
            goal = ("≤ 10", "yes" if med <= 10 else "no") if mode != "fallocate" else ("", "")
            print(f"| {size} | {label} | {alloc} | {min(ms):.1f} | {med:.1f} | {max(ms):.1f} | {remove} | {vs} | {goal[0]} | {goal[1]} |")
    print()


SHAPES = {"seqread": "seq 1M read qd8", "seqwrite": "seq 1M write qd8", "randread": "rand 4K read qd16", "randwrite": "rand 4K write qd16"}
NAMES = {"qemunbd": "qemu-nbd"}


def conns_table(R, targets, jobs, conns):
    """The conns section: each job over one connection and over `conns`, per target."""
    print(f"### {conns} connections against 1, side by side")
    print()
    print(f"fio numjobs={conns} with group_reporting: one connection per job, each on its own 1/{conns} of the volume, "
          f"the iodepth below per connection; figures summed over the connections, medians over rounds.")
    print()
    cols = [(t, n) for t in targets for n in (1, conns)]
    ref = next((t for t in targets if t.startswith("nbdkit")), None)
    head = [f"{NAMES.get(t, t)} {n} conn" for t, n in cols]
    extra = ([f"cowbd / {ref}, {conns} conn"] if ref and "cowbd" in targets else []) + ([f"cowbd {conns} conn / 1 conn"] if "cowbd" in targets else [])
    print("| shape | " + " | ".join(head + extra) + " |")
    print("|---|" + "---:|" * (len(head) + len(extra)))
    for job in jobs:
        idx = 0 if job.startswith("seq") else 1
        unit = "MiB/s" if idx == 0 else "IOPS"
        key = lambda t, n: (job if n == 1 else f"{job}-conns", t)
        figs = [R.median(key(t, n), idx) for t, n in cols]
        cells = ["–" if f is None else f"{f:.0f} {unit}" for f in figs]
        if ref and "cowbd" in targets:
            cells.append(fmt_ratio(R.compare(key("cowbd", conns), key(ref, conns), idx)[2]))
        if "cowbd" in targets:
            cells.append(fmt_ratio(R.compare(key("cowbd", conns), key("cowbd", 1), idx)[2]))
        print(f"| {SHAPES.get(job, job)} | " + " | ".join(cells) + " |")
    print()


def merge_table(results):
    """merge.sh's figures: merge throughput against cp, origin random reads during a merge."""
    print("### Merging a snapshot back into its origin")
    print()
    try:
        with open(os.path.join(results, "merge.json")) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        print(f"merge: results missing ({e})")
        print()
        return False
    size = lambda n: f"{n / 1024 ** 3:g} GiB" if n >= 1024 ** 3 else f"{n / MiB:g} MiB"
    mib = d["volumeBytes"] / MiB
    merge_bw, cp_bw = mib / d["mergeSeconds"], mib / d["cpSeconds"]
    ratio = merge_bw / cp_bw
    iops_ratio = d["iopsDuring"] / d["iopsAlone"] if d["iopsAlone"] else None
    pb, pa = d["progressBefore"], d["progressAfter"]
    # The reads ran during the merge only if it had started before fio and was still copying after.
    throughout = not pb.get("gone") and not pa.get("gone") and (pa.get("mergedChunks") or 0) < (pa.get("totalChunks") or 0)
    moved = None if pa.get("gone") else (pa.get("mergedChunks") or 0) - (pb.get("mergedChunks") or 0)
    print(f"Throughput: a {size(d['volumeBytes'])} volume, filled, snapshotted, then every chunk rewritten ({d['exceptions']} exceptions of "
          f"{d['chunkSize'] // 1024} KiB); the merge with rate 0 (no bound) from the POST until GET answers 404, plus a sync of "
          f"the volume file: {d['mergeSeconds']:.2f} s; `cp --reflink=never` of the volume file to a new file on the same file "
          f"system, plus a sync of the copy: {d['cpSeconds']:.2f} s. Before each: {d['cache']}.")
    print()
    print(f"Reads: fio randread 4k qd16 on the origin for {d['fioSeconds']} s, right before and then during a merge at the "
          f"default rate of a {size(d['iopsVolumeBytes'])} snapshot with every chunk copied (that merge took {d['defaultMergeSeconds']:.1f} s "
          f"after fio). Merge progress: "
          + ("done before fio started" if pb.get("gone") else f"{pb.get('mergedChunks')} of {pb.get('totalChunks')} chunks when fio started, "
             + ("done when it ended" if pa.get("gone") else f"{pa.get('mergedChunks')} when it ended ({moved} chunks merged during the reads)"))
          + f"; running throughout: {'yes' if throughout else 'no (a bigger MERGE_IOPS_SIZE makes it outlast the reads)'}.")
    print()
    print("| measure | merge | reference | ratio | target | met |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| merge throughput, MiB/s, against cp | {merge_bw:.0f} | {cp_bw:.0f} | {fmt_ratio(ratio)} | ≥ 0.5 | {'yes' if ratio >= 0.5 else 'no'} |")
    met = "–" if iops_ratio is None else ("yes" if iops_ratio >= 0.7 else "no")
    print(f"| 4K random reads of the origin, IOPS, during / without a merge | {d['iopsDuring']:.0f} | {d['iopsAlone']:.0f} | "
          f"{fmt_ratio(iops_ratio)} | ≥ 0.7 | {met} |")
    print()
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--targets", default="cowbd nbdkit")
    ap.add_argument("--base-targets", default=None)
    ap.add_argument("--jobs", default="seqread seqwrite randread randwrite")
    ap.add_argument("--sections", default="base")
    ap.add_argument("--conns-targets", default="cowbd nbdkit qemunbd")
    ap.add_argument("--conns-jobs", default="seqread seqwrite randread randwrite")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--runtime", default="?")
    ap.add_argument("--size", default="?")
    ap.add_argument("--chunk", default="64K")
    ap.add_argument("--rand-ios", default="?")
    ap.add_argument("--create-n", default="?")
    ap.add_argument("--mem-size", default="?")
    ap.add_argument("--mem-chunk", default="?")
    ap.add_argument("--elapsed", default=None)
    ap.add_argument("--commit", default=None, help="what was built, as run.sh saw it when it started")
    args = ap.parse_args()
    sections = args.sections.split()
    base_targets = (args.base_targets if args.base_targets is not None else args.targets).split()
    jobs = args.jobs.split()
    nbdkit = next((t for t in base_targets if t.startswith("nbdkit")), None)
    R = Results(args.results)

    m = machine()
    print(f"Date: {m['date']}  ")
    if args.commit:
        print(f"cowbd: built from {args.commit}  ")
    else:
        print(f"cowbd: commit {m['commit']}{' with uncommitted changes in the working tree' if m['dirty'] else ''}  ")
    print(f"Machine: {m['nproc']} × {m['cpu']}, {m['mem']} RAM, Linux {m['kernel']}  ")
    print(f"Software: node {m['node']}, {m['nbdkit']}, {m['fio']}  ")
    print(f"Load average at the end: {' '.join(m['load'])}" + (f"; whole run {int(args.elapsed) // 60} min {int(args.elapsed) % 60} s  " if args.elapsed else "  "))
    print(f"Method: fio ioengine=nbd, one job; time-based jobs {args.runtime} s (+1 s ramp); volume {args.size}; "
          f"snapshot chunks {args.chunk}; {args.rounds} interleaved rounds; medians shown, ratio = median / median of the reference, "
          f"\"per round\" = min–max of the ratios of runs in the same round")
    print()

    SEQ, RAND = 0, 1  # index into (MiB/s, IOPS)
    unit = {SEQ: "MiB/s", RAND: "IOPS"}
    rows = []  # (item, what, key, ref, idx, target)
    if "base" in sections and nbdkit:
        for job, what, tgt in [("seqwrite", "seq 1M write qd8", 0.9), ("seqread", "seq 1M read qd8", 0.9),
                               ("randread", "rand 4K read qd16", 0.8), ("randwrite", "rand 4K write qd16", 0.8)]:
            rows.append(("1", f"origin, no snapshot: {what}, vs nbdkit file", (job, "cowbd"), (job, nbdkit), SEQ if job.startswith("seq") else RAND, tgt))
    if "cow" in sections:
        rows.append(("2", "1 snapshot, first writes: seq 1M write over the volume once, vs no snapshot (same shape)",
                     ("cow-seqwrite", "cowbd-1snap"), ("cow-seqwrite", "cowbd"), SEQ, 0.5))
        rows.append(("2", f"1 snapshot, first writes: {args.rand_ios} rand 4K writes qd16 into distinct chunks, vs no snapshot (same writes)",
                     ("cow-randwrite", "cowbd-1snap"), ("cow-randwrite", "cowbd"), RAND, 0.35))
    if "rewrite" in sections:
        # run.sh measures the rewrites' reference next to them (cowbd-ref); a result
        # directory without those runs falls back to the base section's.
        ref = "cowbd-ref" if ("randwrite", "cowbd-ref") in R.samples else "cowbd"
        what = "no snapshot, same round next to it" if ref == "cowbd-ref" else "no snapshot"
        rows.append(("3", f"1 snapshot, chunks all copied: seq 1M write qd8, vs {what}", ("seqwrite", "cowbd-1snap-copied"), ("seqwrite", ref), SEQ, 0.95))
        rows.append(("3", f"1 snapshot, chunks all copied: rand 4K write qd16, vs {what}", ("randwrite", "cowbd-1snap-copied"), ("randwrite", ref), RAND, 0.95))
    if "cow" in sections:
        rows.append(("4", "4 snapshots, first writes: seq 1M write, vs 1 snapshot", ("cow-seqwrite", "cowbd-4snap"), ("cow-seqwrite", "cowbd-1snap"), SEQ, 0.8))
        rows.append(("4", "4 snapshots, first writes: rand 4K write, vs 1 snapshot", ("cow-randwrite", "cowbd-4snap"), ("cow-randwrite", "cowbd-1snap"), RAND, 0.8))
    if "snapread" in sections:
        for state in ("uncopied", "copied"):
            rows.append(("5", f"snapshot read, chunks {state}: seq 1M read qd8, vs origin", ("seqread", f"snap-{state}"), ("seqread", "cowbd"), SEQ, 0.9))
            rows.append(("5", f"snapshot read, chunks {state}: rand 4K read qd16, vs origin", ("randread", f"snap-{state}"), ("randread", "cowbd"), RAND, 0.9))

    if rows:
        print("### Throughput against the targets")
        print()
        print("| # | case | figure | reference | ratio | per round | target | met |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for item, what, key, ref, idx, tgt in rows:
            fig, base, ratio, per, n = R.compare(key, ref, idx)
            f = "–" if fig is None else f"{fig:.0f} {unit[idx]}"
            b = "–" if base is None else f"{base:.0f} {unit[idx]}"
            p = "–" if per is None else f"{per[0]:.2f}–{per[1]:.2f} ({n})"
            met = "–" if ratio is None else ("yes" if ratio >= tgt else "no")
            print(f"| {item} | {what} | {f} | {b} | {fmt_ratio(ratio)} | {p} | ≥ {tgt} | {met} |")
        print()
        if ("randwrite", "cowbd-ref") in R.samples:
            # The comparison older results made, kept so they can be read side by side.
            far = [R.compare((job, "cowbd-1snap-copied"), (job, "cowbd"), idx)[2] for job, idx in (("seqwrite", SEQ), ("randwrite", RAND))]
            near = [R.compare((job, "cowbd-ref"), (job, "cowbd"), idx)[2] for job, idx in (("seqwrite", SEQ), ("randwrite", RAND))]
            print(f"Rewrites against the base section's no-snapshot runs at the start of each round: seq {fmt_ratio(far[0])}, "
                  f"rand {fmt_ratio(far[1])}; the rewrites' own reference against those same runs: seq {fmt_ratio(near[0])}, rand {fmt_ratio(near[1])}.")
            print()

    if "conns" in sections:
        conns_table(R, args.conns_targets.split(), args.conns_jobs.split(), args.conns)

    # What the first writes cost once durable: the run plus one FLUSH right after it.
    if R.flush:
        print("### First writes made durable (the run, then one FLUSH)")
        print()
        print("| job | target | run | FLUSH after | MiB/s including the FLUSH | vs no snapshot |")
        print("|---|---|---:|---:|---:|---:|")
        def durable(key):
            runs, fl = R.runs.get(key, {}), R.flush.get(key, {})
            per = {r: runs[r][0] / MiB / (runs[r][1] + fl[r]) for r in runs if r in fl}
            return per
        for job in ("cow-seqwrite", "cow-randwrite"):
            base = durable((job, "cowbd"))
            for target in ("cowbd", "cowbd-1snap", "cowbd-4snap"):
                key = (job, target)
                if key not in R.flush:
                    continue
                per = durable(key)
                run = statistics.median(v[1] for v in R.runs[key].values())
                fl = statistics.median(R.flush[key].values())
                ratios = [per[r] / base[r] for r in per if r in base and base[r]]
                ratio = "" if target == "cowbd" or not ratios else fmt_ratio(statistics.median(ratios))
                print(f"| {job} | {target} | {run:.2f} s | {fl:.2f} s | {statistics.median(per.values()):.0f} | {ratio} |")
        print()

    # Snapshots' own account of the copy-on-write runs: was every write a first write?
    notes = []
    for (job, target), per in sorted(R.meta.items()):
        exc = [u.get("exceptions", 0) for u in per.values()]
        states = sorted({u.get("state", "?") for u in per.values()})
        ios = args.rand_ios if job == "cow-randwrite" else None
        notes.append(f"- {job} on {target}: exceptions in the snapshot after the run {min(exc)}–{max(exc)}"
                     + (f" (for {ios} writes)" if ios else "") + f", state {'/'.join(states)}")
        if ios:
            # fio replaying an iolog closes its connection without reaping its last
            # iodepth-1 writes (libnbd's trace shows nbd_close with them in flight), so
            # those may never reach the server. Every write fio saw acknowledged must
            # have its exception; one it issued but never saw answered may not.
            for rnd, u in sorted(per.items()):
                got = u.get("exceptions", 0)
                issued = R.ios.get((job, target), {}).get(rnd, 0)
                acked = R.runs.get((job, target), {}).get(rnd, (0, 0))[0] // 4096
                if got < acked or got > issued:
                    notes.append(f"  - round {rnd}: DEFECT: {got} exceptions, but fio saw {acked} writes acknowledged and issued {issued}")
                elif got != issued:
                    notes.append(f"  - round {rnd}: {got} exceptions; fio issued {issued}, saw {acked} acknowledged and closed with the rest unanswered")
    if notes:
        print("Snapshots after the copy-on-write runs (a first-write run must leave one exception per chunk whose write was acknowledged, and the snapshot valid):")
        print()
        print("\n".join(notes))
        print()

    # Every fio figure, as the older table printed them.
    keys = sorted(R.samples, key=lambda k: (k[0], k[1]))
    if keys:
        print("### Every run (medians)")
        print()
        print("| job | target | MiB/s | MiB/s min–max | IOPS | runs |" + (f" MiB/s vs {nbdkit} |" if nbdkit else ""))
        print("|---|---|---:|---:|---:|---:|" + ("---:|" if nbdkit else ""))
        for job, target in keys:
            got = list(R.samples[(job, target)].values())
            bw = statistics.median(x[0] for x in got)
            iops = statistics.median(x[1] for x in got)
            lo, hi = min(x[0] for x in got), max(x[0] for x in got)
            row = f"| {job} | {target} | {bw:.1f} | {lo:.1f}–{hi:.1f} | {iops:.0f} | {len(got)} |"
            if nbdkit:
                base = R.median((job, nbdkit), 0)
                row += f" {bw / base:.2f} |" if base else " – |"
            print(row)
        print()

    if "create" in sections:
        files = sorted(glob.glob(os.path.join(args.results, "create.*.*.*.json")))
        files = [f for f in files if not f.endswith(".fio.json")]
        if files:
            print(f"### Snapshot creation (POST /v1/snapshots on the control socket, {args.create_n} creations per case, each removed before the next)")
            print()
            print("| volume | load | other snapshot | create median ms | create max ms | remove median ms | load IOPS | target | met |")
            print("|---|---|---|---:|---:|---:|---:|---:|---|")
            for f in files:
                _, vol, load_, mode, _ = os.path.basename(f).split(".")
                with open(f) as fh:
                    d = json.load(fh)
                ms = d["ms"]
                iops = "–"
                lf = os.path.join(args.results, f"create.{vol}.load.fio.json")
                if load_ == "load" and os.path.exists(lf):
                    try:
                        iops = f"{load(lf)['jobs'][0]['write']['iops']:.0f}"
                    except (ValueError, KeyError, IndexError):
                        iops = "?"
                med = statistics.median(ms)
                print(f"| {vol[1:].upper()} | {load_} | {'none (store created)' if mode == 'fresh' else 'one held'} | {med:.1f} | {max(ms):.1f} | "
                      f"{statistics.median(d.get('removeMs', [0])):.1f} | {iops} | ≤ 10 | {'yes' if med <= 10 else 'no'} |")
            print()

    if "reserve" in sections:
        reserve_table(args.results, args.create_n)

    merged = "merge" not in sections or merge_table(args.results)

    if "memory" in sections:
        p = lambda n: os.path.join(args.results, f"memory.{n}")
        try:
            with open(p("restart0.json")) as f:
                r0 = json.load(f)
            with open(p("restart1.json")) as f:
                r1 = json.load(f)
            with open(p("live.json")) as f:
                live = json.load(f)
            with open(p("snap.json")) as f:
                snap = json.load(f)
        except (OSError, ValueError) as e:
            print(f"memory: results missing ({e})")
            return 1
        n = snap["exceptions"]
        rss0 = statistics.median(r["rss"] for r in r0["runs"])
        rss1 = statistics.median(r["rss"] for r in r1["runs"])
        maps = [r.get("exceptionMapBytes") for r in r1["runs"] if r.get("exceptionMapBytes") is not None]
        copy = load(p("copy.fio.json"))["jobs"][0]["write"]
        print(f"### Memory and restart ({args.mem_size} volume, {args.mem_chunk} chunks, {n} exceptions made by one sequential 1M write "
              f"of the whole volume after a snapshot, {copy['bw_bytes'] / MiB:.0f} MiB/s; restart = spawn of `cowbd serve` to NBD greeting, "
              f"page cache warm; RSS 1 s after the greeting)")
        print()
        print("| figure | value | target | met |")
        print("|---|---:|---:|---|")
        per = (rss1 - rss0) / n
        print(f"| RSS after restart, no snapshot (median of {len(r0['runs'])}) | {rss0 / MiB:.1f} MiB | | |")
        print(f"| RSS after restart, {n} exceptions (median of {len(r1['runs'])}) | {rss1 / MiB:.1f} MiB | | |")
        print(f"| RSS growth per exception, restarted | {per:.1f} B | ≤ 16 B | {'yes' if per <= 16 else 'no'} |")
        print(f"| RSS growth per exception, live (before vs after the copying write, same process) | {(live['rssAfter'] - live['rssBefore']) / n:.1f} B | | |")
        if maps:
            print(f"| exception maps + allocator (cowbd_cow_exception_map_bytes) per exception | {statistics.median(maps) / n:.1f} B | | |")
        med0, med1 = r0["medianMs"], r1["medianMs"]
        print(f"| restart to serving, no snapshot (median; max) | {med0:.0f} ms; {max(r['ms'] for r in r0['runs']):.0f} ms | | |")
        print(f"| restart to serving, {n} exceptions (median; max) | {med1:.0f} ms; {max(r['ms'] for r in r1['runs']):.0f} ms | ≤ 2000 ms | {'yes' if med1 <= 2000 else 'no'} |")
        print()

    if R.errors:
        for e in R.errors:
            print(f"- {e}")
        return 1
    return 0 if merged else 1


if __name__ == "__main__":
    sys.exit(main())
