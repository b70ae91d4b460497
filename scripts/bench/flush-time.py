# Seconds one NBD_CMD_FLUSH takes on a fresh connection to URI: what the writes just
# acknowledged still cost to be durable (the page cache's writeback, and for cowbd the
# chunk copies of writes it holds; see docs/cow-design.md).
# Run with /usr/bin/python3: python3-libnbd is installed for the system interpreter.
import sys
import time

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
t = time.monotonic()
h.flush()
print(f"{time.monotonic() - t:.3f}")
h.shutdown()
