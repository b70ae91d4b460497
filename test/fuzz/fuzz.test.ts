// Seeded fuzzing of the real daemon over real sockets (test/fuzz/fuzzer.ts makes the
// cases, driver.ts judges them). A canary connection does verified I/O throughout;
// the daemon must not crash, hang, log errors or leak fds or memory. Saved
// regressions (test/fuzz/regressions/) are replayed first. Longer runs:
// npm run fuzz -- --cases 1000000 --seed N.
import t from 'tap';
import { join } from 'node:path';
import { ROOT } from '../helpers/daemon.js';
import { mib } from '../helpers/proc.js';
import { campaign, loadRegressions, replayRegressions, summary } from './campaign.js';
import { startFuzzDaemon } from './target.js';

const CASES = Number(process.env.COWBD_FUZZ_CASES ?? 5000);
const SEED = Number(process.env.COWBD_FUZZ_SEED ?? 20240611);
/** RSS may grow this much past the post-warm-up baseline (buffer pools and GC heap settle). */
const RSS_BOUND_MIB = 96;
const REGRESSIONS = join(ROOT, 'test', 'fuzz', 'regressions');

t.test('fuzzing the daemon', async (t) => {
  const target = await startFuzzDaemon({ keepLog: (rec) => Number(rec.level) >= 50 });
  t.teardown(() => target.stop());

  const saved = loadRegressions(REGRESSIONS);
  const replayed = await replayRegressions(target, REGRESSIONS, 5000);
  t.same(replayed, [], `${saved.length} saved regression cases replay cleanly`);

  const r = await campaign(target, {
    seed: SEED,
    cases: CASES,
    warmup: Math.min(1000, Math.floor(CASES / 4)),
    concurrency: 16,
    timeoutMs: 5000,
    // A failure here is left for a human: write it where `git status` shows it.
    regressionsDir: REGRESSIONS,
    maxFailures: 10,
    log: (line) => t.comment(line),
  });
  for (const line of summary(r)) t.comment(line);
  t.equal(r.aborted, undefined, 'the daemon stayed up');
  t.same(
    r.failures.map((f) => `case ${f.index} (${f.kind}): ${f.message}`),
    [],
    `seed ${SEED}: every case answered or closed in time`,
  );
  t.equal(r.cases, CASES, 'every case ran');
  t.ok(r.canaryOps > 100, `the canary was served throughout (${r.canaryOps} ops)`);
  t.same(r.canaryFailures, [], 'every canary write and read answered correctly and in time');
  t.ok(r.end.fds <= r.warm.fds, `fd count back to the baseline (${r.warm.fds} -> ${r.end.fds})`);
  t.equal(r.connectionsEnd, r.connectionsWarm, 'connection gauge back to the baseline');
  const growth = (r.end.rssKiB - r.warm.rssKiB) / 1024;
  t.ok(growth < RSS_BOUND_MIB, `RSS ${mib(r.warm.rssKiB)} -> ${mib(r.end.rssKiB)} MiB, growth under ${RSS_BOUND_MIB} MiB`);
  t.same(
    target.daemon!.logs.map((l) => l.msg),
    [],
    'no error lines in the daemon log',
  );
  t.equal(await target.daemon!.stop(), 0, 'the daemon exits 0 on SIGTERM');
});
