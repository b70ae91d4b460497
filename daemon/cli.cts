#!/usr/bin/env node
// Entry point, CommonJS on purpose. libuv sizes its threadpool once, at its first
// use, and an ES module entry is too late: the ES module loader reads this very
// file on the threadpool, so a UV_THREADPOOL_SIZE set in an ESM body was ignored
// and the daemon ran on libuv's default 4 threads. A CommonJS file is read
// synchronously, so this runs before the pool exists.
//
// Why 4 (libuv's default, set here so the choice is ours and a change to it takes
// effect): on 2 cores, random 4 KiB first writes with a snapshot, three hand-offs to
// the pool each, ran at 6.3-9.7k IOPS on 4 threads against 4.9-6.5k on 16 (rounds 2-4
// of four; three runs and two). Likely fewer idle threads to wake per hand-off and
// fewer spinning on one file's inode lock (not measured apart). What 16 bought was
// room for syncs (each volume's fdatasync and each store's commit can hold a thread
// for as long as the disk takes); cow/device.ts now lets at most half the pool sync
// at once instead. An operator's UV_THREADPOOL_SIZE is kept.
process.env.UV_THREADPOOL_SIZE ??= '4';
import('./main.js').catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
