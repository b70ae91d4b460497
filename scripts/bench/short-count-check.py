#!/usr/bin/env python3
"""Checks for scripts/bench/short-count.sh (run with /usr/bin/python3, which has libnbd).

  ref URI IOLOG OUT           hash every chunk the iolog writes, as URI reads it now
  snap URI IOLOG REF          print how many of those chunks of URI (a snapshot) differ from REF, then the first ten
  origin URI IOLOG PATTERN    print how many of the iolog's blocks of URI do not hold the hex PATTERN, then the first ten
"""
import hashlib, json, sys
import nbd

CHUNK, BLOCK = 65536, 4096


def offsets(iolog):
    return [int(l.split()[2]) for l in open(iolog) if l.startswith("bench write")]


def main():
    mode, uri, iolog = sys.argv[1:4]
    h = nbd.NBD()
    h.connect_uri(uri)
    if mode == "ref" or mode == "snap":
        got = {str(o // CHUNK): hashlib.sha1(h.pread(CHUNK, o // CHUNK * CHUNK)).hexdigest() for o in offsets(iolog)}
        if mode == "ref":
            json.dump(got, open(sys.argv[4], "w"))
        else:
            ref = json.load(open(sys.argv[4]))
            bad = sorted(int(c) for c in got if got[c] != ref[c])
            print(len(bad), bad[:10])
    else:
        pat = bytes.fromhex(sys.argv[4])
        want = (pat * (BLOCK // len(pat) + 1))[:BLOCK]
        bad = sorted(o // CHUNK for o in offsets(iolog) if h.pread(BLOCK, o) != want)
        print(len(bad), bad[:10])
    h.shutdown()


main()
