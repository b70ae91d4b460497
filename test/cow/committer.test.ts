// cow/committer.ts: group commit. A job's data is synced before its metadata is written,
// its metadata is synced before it applies and resolves; concurrent jobs share syncs;
// a failure poisons the committer.
import t from 'tap';
import { Committer, type CommitterIo, type Job } from '../../cow/committer.js';

/** An io whose syncs complete only when the test says so; every call is logged. */
class Io implements CommitterIo {
  log: string[] = [];
  pending: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  failWrite?: Error;

  async write(buf: Buffer, offset: number): Promise<void> {
    this.log.push(`write ${buf.toString()}@${offset}`);
    if (this.failWrite) throw this.failWrite;
  }

  sync(): Promise<void> {
    this.log.push('sync');
    return new Promise((resolve, reject) => this.pending.push({ resolve, reject }));
  }

  get syncs(): number {
    return this.log.filter((l) => l === 'sync').length;
  }

  /** Completes the oldest sync, then lets the committer run until it waits again. */
  async completeSync(err?: Error): Promise<void> {
    const p = this.pending.shift();
    if (!p) throw new Error('no sync in flight');
    if (err) p.reject(err);
    else p.resolve();
    await ticks();
  }
}

const ticks = async (n = 10): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
};

interface TestJob extends Job {
  name: string;
  applied: boolean;
  settled?: 'resolved' | 'rejected';
  error?: unknown;
}

function job(name: string, io: Io, dataSync = true, exceptions = 1): TestJob {
  const j: TestJob = {
    name,
    dataSync,
    exceptions,
    applied: false,
    encode(out) {
      io.log.push(`encode ${name}`);
      out.push({ offset: name.charCodeAt(0), buf: Buffer.from(name) });
    },
    apply() {
      io.log.push(`apply ${name}`);
      j.applied = true;
    },
  };
  return j;
}

function submit(c: Committer, j: TestJob): Promise<void> {
  const p = c.submit(j);
  p.then(
    () => {
      if (!j.applied) throw new Error(`${j.name} resolved before apply`);
      j.settled = 'resolved';
    },
    (e: unknown) => {
      j.settled = 'rejected';
      j.error = e;
    },
  );
  return p;
}

t.test('a transient committer (no io) applies at once and reports exceptions only', async (t) => {
  const commits: Array<[number, number]> = [];
  const c = new Committer(undefined, (s, n) => commits.push([s, n]));
  const io = new Io();
  const a = job('a', io, true, 3);
  const b = job('b', io, false, 0);
  const pa = c.submit(a);
  t.ok(a.applied, 'applied during submit');
  await pa;
  await c.submit(b);
  t.same(io.log, ['apply a', 'apply b']);
  t.same(commits, [[0, 3]], 'a job with no exceptions is not a commit');
  await c.idle();
  t.pass('idle resolves with nothing to do');
});

t.test('a lone data job: sync, then its metadata, then sync, then apply and resolve', async (t) => {
  const io = new Io();
  const commits: Array<[number, number]> = [];
  const c = new Committer(io, (s, n) => commits.push([s, n]));
  const a = job('a', io, true, 2);
  submit(c, a);
  await ticks();
  t.same(io.log, ['sync'], 'the data sync comes first, no metadata yet');
  await io.completeSync();
  t.same(io.log, ['sync', 'encode a', 'write a@97', 'sync'], 'metadata written after the data sync');
  t.equal(a.settled, undefined, 'not resolved before its metadata is durable');
  t.notOk(a.applied, 'not applied before its metadata is durable');
  await io.completeSync();
  t.same(io.log.slice(4), ['apply a']);
  t.equal(a.settled, 'resolved');
  t.equal(commits.length, 1);
  t.equal(commits[0]![1], 2, 'exceptions reported');
  t.ok(commits[0]![0] >= 0 && commits[0]![0] < 60, 'seconds measured');
  t.equal(io.syncs, 2, 'an idle store pays two syncs for a lone job');
});

t.test('a job without data needs one sync', async (t) => {
  const io = new Io();
  const c = new Committer(io, () => {});
  const a = job('m', io, false);
  submit(c, a);
  await ticks();
  t.same(io.log, ['encode m', 'write m@109', 'sync']);
  await io.completeSync();
  t.same(io.log, ['encode m', 'write m@109', 'sync', 'apply m']);
  t.equal(a.settled, 'resolved');
});

t.test('jobs submitted during a sync share the next syncs, in commit order', async (t) => {
  const io = new Io();
  const commits: number[] = [];
  const c = new Committer(io, (_s, n) => commits.push(n));
  const a = job('a', io);
  submit(c, a);
  await ticks();
  t.same(io.log, ['sync']);
  const later = [job('b', io), job('c', io), job('d', io), job('e', io, false, 5)];
  for (const j of later) submit(c, j);
  await ticks();
  t.equal(io.syncs, 1, 'no new sync while one is in flight');
  let idle = false;
  void c.idle().then(() => (idle = true));

  await io.completeSync();
  // Iteration 2: a's metadata (its data is durable) and e's (no data), then one sync that
  // also makes b, c and d's data durable.
  t.same(io.log.slice(1), ['encode a', 'encode e', 'write a@97', 'write e@101', 'sync']);
  await io.completeSync();
  t.same(io.log.slice(6, 8), ['apply a', 'apply e'], 'applied in commit order');
  t.equal(a.settled, 'resolved');
  t.equal(later[3]!.settled, 'resolved');
  t.equal(later[0]!.settled, undefined, 'b waits for its metadata');
  t.same(io.log.slice(8), ['encode b', 'encode c', 'encode d', 'write b@98', 'write c@99', 'write d@100', 'sync']);
  t.notOk(idle, 'not idle while jobs are in flight');
  await io.completeSync();
  t.same(io.log.slice(15), ['apply b', 'apply c', 'apply d']);
  t.ok(later.every((j) => j.settled === 'resolved'));
  t.equal(io.syncs, 3, 'five jobs, three syncs');
  t.same(commits, [1 + 5, 3], 'one commit per metadata batch, with its exceptions');
  t.ok(idle, 'idle once the loop ends');
  t.equal(c.failed, undefined);
});

t.test('a failed sync rejects every job owed it and poisons the committer', async (t) => {
  const io = new Io();
  const c = new Committer(io, () => {});
  const a = job('a', io);
  submit(c, a);
  await ticks();
  await io.completeSync();
  // a's metadata sync is in flight; b's data rides on it; c arrives meanwhile.
  const b = job('b', io);
  const m = job('c', io, false);
  submit(c, b);
  submit(c, m);
  await ticks();
  const boom = new Error('sync failed');
  const idle = c.idle();
  await io.completeSync(boom);
  await idle;
  t.equal(c.failed, boom, 'failed holds the error');
  for (const j of [a, b, m]) {
    t.equal(j.settled, 'rejected', `${j.name} rejected`);
    t.equal(j.error, boom);
    t.notOk(j.applied, `${j.name} never applied`);
  }
  const d = job('d', io);
  await t.rejects(c.submit(d), boom, 'later submits fail at once');
  t.notOk(d.applied);
  t.equal(io.pending.length, 0, 'and start no sync');
});

t.test('a failed metadata write fails the batch the same way', async (t) => {
  const io = new Io();
  const c = new Committer(io, () => {});
  const boom = new Error('write failed');
  io.failWrite = boom;
  const a = job('a', io, false);
  await t.rejects(submit(c, a), boom);
  t.equal(c.failed, boom);
  t.notOk(a.applied);
  t.equal(io.syncs, 0, 'no sync after the failed write');
  await t.rejects(c.submit(job('b', io, false)), boom);
});

t.test('the committer restarts its loop after going idle', async (t) => {
  const io = new Io();
  const c = new Committer(io, () => {});
  const a = job('a', io, false);
  const pa = submit(c, a);
  await ticks();
  await io.completeSync();
  await pa;
  await c.idle();
  const b = job('b', io, false);
  const pb = submit(c, b);
  await ticks();
  t.equal(io.syncs, 2, 'a new loop started for b');
  await io.completeSync();
  await pb;
  t.equal(b.settled, 'resolved');
});
