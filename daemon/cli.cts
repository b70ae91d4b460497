#!/usr/bin/env node
// Entry point, CommonJS on purpose. libuv sizes its threadpool once, at its first
// use, and an ES module entry is too late: the ES module loader reads this very
// file on the threadpool, so a UV_THREADPOOL_SIZE set in an ESM body was ignored
// and the daemon ran on libuv's default 4 threads. A CommonJS file is read
// synchronously, so this runs before the pool exists.
//
// Why 16: each volume's fdatasync and each store's commit may hold a thread for as
// long as the disk takes (seconds under heavy writeback); with 4 threads, four such
// syncs stall every other volume's I/O. On 2 cores, 4, 8 and 16 threads ran first
// writes alike (random 4 KiB: 14.5-16.8k IOPS with each, two runs each).
process.env.UV_THREADPOOL_SIZE ??= '16';
import('./main.js').catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
