#!/usr/bin/env python3
"""Turns the fio JSON files written by run.sh into a markdown table.

Files are named ROUND.JOB.TARGET.json. For each job and target it reports the
median over rounds of MiB/s and IOPS, and each target's ratio to the baseline
(the first target whose name starts with "nbdkit"), so new targets such as
cowbd with snapshots only need new result files.
"""

import argparse
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
    rw = job["job options"]["rw"]
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
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": cmd("nproc"),
        "cpu": cpu,
        "kernel": platform.release(),
        "node": cmd("node", "--version"),
        "nbdkit": cmd("nbdkit", "--version"),
        "fio": cmd("fio", "--version"),
        # Other work shows up as spread between rounds; the load (which includes fio and the servers themselves) hints at it.
        "load": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--runtime", default="?")
    ap.add_argument("--size", default="?")
    args = ap.parse_args()
    targets = args.targets.split()
    jobs = args.jobs.split()
    baseline = next((t for t in targets if t.startswith("nbdkit")), None)

    samples = {}  # (job, target) -> list of (MiB/s, IOPS)
    errors = []
    for name in sorted(os.listdir(args.results)):
        if not name.endswith(".json"):
            continue
        _, job, target = name[:-5].split(".", 2)
        data = load(os.path.join(args.results, name))
        for j in data["jobs"]:
            if j.get("error"):
                errors.append(f"{name}: fio error {j['error']}")
                continue
            s = j[side(j)]
            samples.setdefault((job, target), []).append((s["bw_bytes"] / MiB, s["iops"]))

    m = machine()
    print(f"Date: {m['date']}  ")
    print(f"Machine: {m['nproc']} × {m['cpu']}, Linux {m['kernel']}  ")
    print(f"Software: node {m['node']}, {m['nbdkit']}, {m['fio']}  ")
    print(f"Load average at the end: {' '.join(m['load'])}  ")
    print(f"Method: fio ioengine=nbd, one job, {args.runtime} s per run (+1 s ramp), "
          f"volume {args.size}, {args.rounds} interleaved rounds, medians shown")
    print()
    header = ["job", "target", "MiB/s", "MiB/s min–max", "IOPS", "runs"]
    if baseline:
        header += [f"MiB/s vs {baseline}", f"IOPS vs {baseline}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for job in jobs:
        base = samples.get((job, baseline)) if baseline else None
        base_bw = statistics.median(x[0] for x in base) if base else None
        base_iops = statistics.median(x[1] for x in base) if base else None
        for target in targets:
            got = samples.get((job, target), [])
            if not got:
                print(f"| {job} | {target} | – | – | – | 0 |" + (" – | – |" if baseline else ""))
                continue
            bw = statistics.median(x[0] for x in got)
            iops = statistics.median(x[1] for x in got)
            lo = min(x[0] for x in got)
            hi = max(x[0] for x in got)
            row = [job, target, f"{bw:.1f}", f"{lo:.1f}–{hi:.1f}", f"{iops:.0f}", str(len(got))]
            if baseline:
                row += [f"{bw / base_bw:.2f}" if base_bw else "–", f"{iops / base_iops:.2f}" if base_iops else "–"]
            print("| " + " | ".join(row) + " |")
    if errors:
        print()
        for e in errors:
            print(f"- {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
