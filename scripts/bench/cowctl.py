#!/usr/bin/env python3
"""The bench's side of cowbd: control API calls, timed snapshot creations, timed
restarts and a random-write iolog. Standard library only (no curl needed).

  cowctl.py call SOCK METHOD PATH [JSON]       print the reply body; exit 1 on HTTP >= 400
  cowctl.py create-times SOCK ORIGIN STORE N [--sparse]
                                               create and remove N snapshots one by one,
                                               timing each POST /v1/snapshots (and DELETE); prints JSON;
                                               --sparse asks for sparse stores (nothing reserved)
  cowctl.py restart N OUT -- CMD...            start the daemon CMD N times (it must listen on
                                               --listen HOST:PORT), time spawn -> NBD greeting,
                                               read VmRSS after 1 s idle, SIGTERM and wait; JSON to OUT
  cowctl.py iolog OUT SIZE CHUNK N             fio v2 iolog: N 4 KiB writes, each in a distinct
                                               CHUNK-sized chunk picked at random (fixed seed)
  cowctl.py merge SOCK NAME [--rate R] [--wait]
                                               POST /v1/snapshots/NAME/merge (rate as the API takes it,
                                               e.g. "0" or "64M"; absent = the daemon's default), then
                                               wait until it runs (a merge may be deferred while the
                                               origin has clients); --wait: until NAME is gone (404).
                                               Prints JSON: the snapshot before, seconds to running and
                                               to gone (from the POST)
  cowctl.py merge-wait SOCK NAME               wait until NAME is gone (404); JSON: seconds waited
  cowctl.py progress SOCK NAME                 JSON: NAME's state and merge progress, or {"gone": true}
"""

import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=120):
        super().__init__("cowbd", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def call(sock, method, path, body=None):
    """One request on a new connection, as the CLI makes it. Returns (status, body, seconds)."""
    payload = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", "content-length": str(len(payload))} if payload else {}
    t0 = time.perf_counter()
    c = UnixHTTPConnection(sock)
    try:
        c.request(method, path, body=payload, headers=headers)
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    secs = time.perf_counter() - t0
    return r.status, data.decode(), secs


def cmd_call(args):
    sock, method, path = args[:3]
    body = json.loads(args[3]) if len(args) > 3 else None
    status, text, _ = call(sock, method, path, body)
    print(text)
    if status >= 400:
        print(f"cowctl: {method} {path}: HTTP {status}: {text}", file=sys.stderr)
        return 1
    return 0


def cmd_create_times(args):
    sparse = "--sparse" in args
    args = [a for a in args if a != "--sparse"]
    sock, origin, store, n = args[0], args[1], args[2], int(args[3])
    body = {"origin": origin, "size": store}
    if sparse:
        body["sparse"] = True
    times, removals = [], []
    for i in range(n):
        name = f"bench-create-{os.getpid()}-{i}"
        status, text, secs = call(sock, "POST", "/v1/snapshots", {"name": name, **body})
        if status >= 400:
            print(f"cowctl: create {name}: HTTP {status}: {text}", file=sys.stderr)
            return 1
        times.append(secs * 1000)
        status, text, secs = call(sock, "DELETE", f"/v1/snapshots/{name}")
        if status >= 400:
            print(f"cowctl: remove {name}: HTTP {status}: {text}", file=sys.stderr)
            return 1
        removals.append(secs * 1000)
        time.sleep(0.2)
    print(json.dumps({"ms": times, "removeMs": removals, "sparse": sparse}))
    return 0


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def greeting(port, deadline):
    """Connects until the server sends NBD's greeting; returns when it has."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                got = b""
                while len(got) < 8:
                    b = s.recv(8 - len(got))
                    if not b:
                        break
                    got += b
                if got == b"NBDMAGIC":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no NBD greeting on port {port}")
        time.sleep(0.005)


def cmd_restart(args):
    n, out = int(args[0]), args[1]
    cmd = args[args.index("--") + 1:]
    listen = cmd[cmd.index("--listen") + 1]
    port = int(listen.rsplit(":", 1)[1])
    metrics_port = None
    if "--metrics-listen" in cmd and cmd[cmd.index("--metrics-listen") + 1] != "off":
        metrics_port = int(cmd[cmd.index("--metrics-listen") + 1].rsplit(":", 1)[1])
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            greeting(port, time.monotonic() + 120)
            ms = (time.perf_counter() - t0) * 1000
            time.sleep(1)
            run = {"ms": ms, "rss": rss_bytes(p.pid)}
            if metrics_port:
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
                m = re.search(r"^cowbd_cow_exception_map_bytes (\S+)$", text, re.M)
                run["exceptionMapBytes"] = float(m.group(1)) if m else None
            runs.append(run)
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    with open(out, "w") as f:
        json.dump({"runs": runs, "medianMs": statistics.median(r["ms"] for r in runs)}, f)
    return 0


def cmd_iolog(args):
    out, size, chunk, n = args[0], int(args[1]), int(args[2]), int(args[3])
    chunks = size // chunk
    if n > chunks:
        raise SystemExit(f"cowctl: {n} writes into distinct chunks, but the volume has only {chunks} chunks")
    r = random.Random(6)
    with open(out, "w") as f:
        f.write("fio version 2 iolog\nbench add\nbench open\n")
        for c in r.sample(range(chunks), n):
            f.write(f"bench write {c * chunk + r.randrange(chunk // 4096) * 4096} 4096\n")
        f.write("bench close\n")
    return 0


def snapshot(sock, name):
    """GET /v1/snapshots/NAME: the usage, or None once it is gone (404)."""
    status, text, _ = call(sock, "GET", f"/v1/snapshots/{name}")
    if status == 404:
        return None
    if status >= 400:
        raise SystemExit(f"cowctl: GET /v1/snapshots/{name}: HTTP {status}: {text}")
    return json.loads(text)


def progress(usage):
    if usage is None:
        return {"gone": True}
    m = usage.get("merge") or {}
    return {"gone": False, "state": usage.get("state"), "mergedChunks": m.get("mergedChunks"), "totalChunks": m.get("totalChunks")}


def cmd_progress(args):
    print(json.dumps(progress(snapshot(args[0], args[1]))))
    return 0


def cmd_merge(args):
    wait = "--wait" in args
    rate = args[args.index("--rate") + 1] if "--rate" in args else None
    sock, name = args[0], args[1]
    t0 = time.perf_counter()
    before = snapshot(sock, name)
    get_seconds = time.perf_counter() - t0
    if before is None:
        print(f"cowctl: no snapshot {name}", file=sys.stderr)
        return 1
    body = {} if rate is None else {"rate": rate}
    t0 = time.perf_counter()
    status, text, _ = call(sock, "POST", f"/v1/snapshots/{name}/merge", body)
    if status >= 400:
        print(f"cowctl: merge {name}: HTTP {status}: {text}", file=sys.stderr)
        return 1
    out = {"before": before, "getSeconds": get_seconds, "reply": json.loads(text) if text.strip().startswith("{") else text, "rate": rate}
    # Polled often enough that the poll adds little to a merge of a few seconds.
    last = None
    while True:
        u = snapshot(sock, name)
        if u is not None:
            last = progress(u)
        if u is None or str(u.get("state", "")).startswith("merging"):
            out.setdefault("runningSeconds", time.perf_counter() - t0)
            out.setdefault("running", last)
        if u is None or not wait and "runningSeconds" in out:
            break
        if time.perf_counter() - t0 > 3600:
            print(f"cowctl: merge {name} still not done after an hour: {last}", file=sys.stderr)
            return 1
        time.sleep(0.02)
    if wait:
        out["seconds"] = time.perf_counter() - t0
        out["last"] = last
    print(json.dumps(out))
    return 0


def cmd_merge_wait(args):
    sock, name = args[0], args[1]
    t0 = time.perf_counter()
    while snapshot(sock, name) is not None:
        if time.perf_counter() - t0 > 3600:
            print(f"cowctl: {name} still there after an hour", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
    return 0


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmds = {"call": cmd_call, "create-times": cmd_create_times, "restart": cmd_restart, "iolog": cmd_iolog, "merge": cmd_merge, "merge-wait": cmd_merge_wait,
            "progress": cmd_progress}
    f = cmds.get(sys.argv[1])
    if not f:
        print(__doc__, file=sys.stderr)
        return 2
    return f(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
