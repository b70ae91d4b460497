#!/usr/bin/env node
// Entry point. The threadpool must be sized before the first fs call, so the
// real work lives in main.ts and is loaded after the environment is set.
process.env.UV_THREADPOOL_SIZE ??= '16';
await import('./main.js');
