// Seeded NBD fuzzer against the real daemon (dist/, so build first: npm run fuzz does).
//
//   npm run fuzz -- --cases 1000000 --seed 42 [--concurrency 16] [--timeout 5000]
//                   [--warmup 2000] [--rss-bound 128] [--in-process] [--replay FILE]
//                   [--regressions DIR]
//
// Prints progress every 10000 cases, then cases/s, the daemon's RSS and fd count after
// warm-up and at the end, and the canary's figures. Failing cases are written to
// test/fuzz/regressions/ (seed, case index, the bytes in hex), which the tap test
// replays. Exit status 1 on any failure, a canary error, an fd leak or RSS growth
// above --rss-bound MiB.
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from '../test/helpers/daemon.js';
import { campaign, summary } from '../test/fuzz/campaign.js';
import { runCase } from '../test/fuzz/driver.js';
import { loadCase, type SavedCase } from '../test/fuzz/fuzzer.js';
import { startFuzzDaemon, startFuzzInProcess } from '../test/fuzz/target.js';

const { values } = parseArgs({
  options: {
    cases: { type: 'string', default: '100000' },
    seed: { type: 'string' },
    concurrency: { type: 'string', default: '16' },
    timeout: { type: 'string', default: '5000' },
    warmup: { type: 'string', default: '2000' },
    'rss-bound': { type: 'string', default: '128' },
    'max-failures': { type: 'string', default: '20' },
    'in-process': { type: 'boolean', default: false },
    replay: { type: 'string' },
    regressions: { type: 'string' },
  },
});

const seed = values.seed !== undefined ? Number(values.seed) >>> 0 : (Date.now() & 0x7fffffff) >>> 0;
const cases = Number(values.cases);
const log = (s: string) => console.log(`[fuzz] ${s}`);

let errorLines = 0;
const firstErrors: string[] = [];
const target = values['in-process']
  ? await startFuzzInProcess()
  : await startFuzzDaemon({
      // Keep nothing in memory: count error lines, remember a few.
      keepLog: (rec) => {
        if (Number(rec.level) >= 50) {
          errorLines++;
          if (firstErrors.length < 5) firstErrors.push(JSON.stringify(rec));
        }
        return false;
      },
    });

let failed = false;
try {
  if (values.replay) {
    const saved = JSON.parse(readFileSync(values.replay, 'utf8')) as SavedCase;
    const message = await runCase(target, loadCase(saved), Number(values.timeout));
    log(message ? `replay FAILED: ${message}` : 'replay passed');
    failed = !!message;
  } else {
    log(
      `seed ${seed}, ${cases} cases, concurrency ${values.concurrency}, target ${values['in-process'] ? 'in-process' : `daemon pid ${target.pid}`}`,
    );
    const r = await campaign(target, {
      seed,
      cases,
      warmup: Math.min(Number(values.warmup), Math.floor(cases / 2)),
      concurrency: Number(values.concurrency),
      timeoutMs: Number(values.timeout),
      regressionsDir: values.regressions ?? join(ROOT, 'test', 'fuzz', 'regressions'),
      maxFailures: Number(values['max-failures']),
      log,
    });
    for (const line of summary(r)) log(line);
    for (const f of r.failures.slice(0, 20)) log(`FAILED case ${f.index} (${f.kind}): ${f.message}${f.file ? ` -> ${f.file}` : ''}`);
    for (const e of r.canaryFailures.slice(0, 5)) log(`CANARY: ${e}`);
    const rssGrowthMiB = (r.end.rssKiB - r.warm.rssKiB) / 1024;
    if (r.end.fds > r.warm.fds) log(`FD LEAK: ${r.end.fds - r.warm.fds} more fds than after warm-up`);
    if (rssGrowthMiB > Number(values['rss-bound'])) log(`RSS grew by ${rssGrowthMiB.toFixed(1)} MiB (bound ${values['rss-bound']})`);
    if (errorLines) log(`daemon logged ${errorLines} error line(s), e.g. ${firstErrors[0]}`);
    failed =
      r.failures.length > 0 ||
      !!r.aborted ||
      r.canaryFailures.length > 0 ||
      r.end.fds > r.warm.fds ||
      rssGrowthMiB > Number(values['rss-bound']) ||
      errorLines > 0;
  }
} finally {
  const dead = target.dead();
  await target.stop();
  if (dead) {
    log(dead);
    failed = true;
  }
}
log(failed ? 'FAILED' : 'passed');
process.exit(failed ? 1 : 0);
