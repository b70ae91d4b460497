#!/usr/bin/env node
// Entry point, CommonJS on purpose: libuv sizes its threadpool at first use, and the ES
// module loader uses the pool to read an ESM entry, so only a CommonJS entry runs first.
// 4 threads suit 2 cores; an operator's UV_THREADPOOL_SIZE is kept (docs/tuning.md,
// UV_THREADPOOL_SIZE).
process.env.UV_THREADPOOL_SIZE ??= '4';
import('./main.js').catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
