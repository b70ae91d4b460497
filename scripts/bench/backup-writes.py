#!/usr/bin/python3
# Writes random data to an NBD export through libnbd, for the backup benchmark:
#   backup-writes.py URI fill BYTES STRIDE      BYTES of random data in 1 MiB pieces, one every STRIDE bytes
#   backup-writes.py URI scatter N CHUNK SEED   N distinct CHUNK-sized pieces at seeded random chunk offsets
import os, random, sys
import nbd

uri, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
if mode == "fill":
    total, stride = int(sys.argv[3]), int(sys.argv[4])
    piece = 1 << 20
    off = 0
    done = 0
    while done < total and off + piece <= size:
        h.pwrite(os.urandom(piece), off)
        done += piece
        off += stride
elif mode == "scatter":
    n, chunk, seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    rnd = random.Random(seed)
    for i in sorted(rnd.sample(range(size // chunk), n)):
        h.pwrite(os.urandom(chunk), i * chunk)
else:
    sys.exit(f"unknown mode {mode}")
h.flush()
h.shutdown()
