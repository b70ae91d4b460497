// Rolling back with the real daemon: `cowbd snapshot merge` makes the origin the snapshot at
// once, copies the chunks back in the background and removes the snapshot; it waits while the
// origin has NBD clients, refuses what it cannot do, and resumes after kill -9.
import t, { type Test } from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import { call } from '../../daemon/control-client.js';
import type { CowbdError } from '../../daemon/errors.js';
import type { StatusRow } from '../../daemon/service.js';
import { cowbdResult, startDaemon, waitForLog, type Daemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/raw-client.js';
import { request } from '../helpers/frames.js';

t.setTimeout(120_000);

const MiB = 1 << 20;
const VOL = 48 * MiB;
/** Two merge batches (MERGE_BATCH_BYTES is 16 MiB): at a low rate the merge stops halfway for a while. */
const WRITTEN = 32 * MiB;

async function cli(d: Daemon, ...args: string[]) {
  return cowbdResult([...args, '--data-dir', d.dataDir]);
}

async function ok(t: Test, d: Daemon, ...args: string[]): Promise<string> {
  const r = await cli(d, ...args);
  t.equal(r.code, 0, `cowbd ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function connect(d: Daemon, name: string): Promise<RawClient> {
  const c = await RawClient.connect(d.port);
  await c.go(name);
  return c;
}

async function closeClient(c: RawClient): Promise<void> {
  c.close();
  await c.closed;
}

/** Writes `data` at `offset` in 1 MiB requests. */
async function write(c: RawClient, offset: number, data: Buffer): Promise<void> {
  for (let at = 0; at < data.length; at += MiB) {
    const piece = data.subarray(at, at + MiB);
    c.send(Buffer.concat([request(C.NBD_CMD_WRITE, offset + at, piece.length, 1), piece]));
    const r = await c.simpleReply();
    if (r.error) throw new Error(`write at ${offset + at} failed: ${r.error}`);
  }
}

async function readAll(c: RawClient, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  for (let at = 0; at < length; at += MiB) {
    c.send(request(C.NBD_CMD_READ, at, MiB, 2));
    const r = await c.simpleReply(MiB);
    if (r.error) throw new Error(`read at ${at} failed: ${r.error}`);
    r.data!.copy(out, at);
  }
  return out;
}

async function readExport(d: Daemon, name: string): Promise<Buffer> {
  const c = await connect(d, name);
  try {
    return await readAll(c, VOL);
  } finally {
    await closeClient(c);
  }
}

/** A volume image: `fill` over the first `length` bytes, zeros after. */
function image(fill: number, length = WRITTEN): Buffer {
  const b = Buffer.alloc(VOL);
  b.fill(fill, 0, length);
  return b;
}

async function status(d: Daemon): Promise<StatusRow[]> {
  return call<StatusRow[]>(d.dataDir, 'GET', '/v1/status');
}

async function row(d: Daemon, name: string): Promise<StatusRow | undefined> {
  return (await status(d)).find((r) => r.name === name);
}

async function metrics(d: Daemon): Promise<string> {
  return (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
}

/** The control API's error for a request, or a failure if it succeeds. */
async function refusal(path: string, d: Daemon, method: string, body?: unknown): Promise<CowbdError> {
  try {
    await call(d.dataDir, method, path, body);
  } catch (e) {
    return e as CowbdError;
  }
  throw new Error(`${method} ${path} succeeded`);
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; await new Promise((r) => setTimeout(r, 50))) if (await check()) return;
  throw new Error(`timed out waiting for ${what}`);
}

const mergedLog = (name: string) => (l: Record<string, unknown>) => l.msg === `snapshot ${name} merged into vol0 and removed`;

t.test('merge with no clients: the origin reads as the snapshot at once, and the snapshot goes', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '48M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const o = await connect(d, 'vol0');
  await write(o, 0, image(0xa1).subarray(0, WRITTEN));
  await ok(t, d, 'snapshot', 'create', 'keep', '--origin', 'vol0', '--size', '40M');
  await write(o, 0, Buffer.alloc(4 * MiB, 0xa2));
  await ok(t, d, 'snapshot', 'create', 's1', '--origin', 'vol0', '--size', '40M');
  await write(o, 0, image(0xb1).subarray(0, WRITTEN));
  await closeClient(o);
  // What the snapshot holds, its own writes included, is what the origin becomes.
  const want = image(0xa1);
  want.fill(0xa2, 0, 4 * MiB);
  const s = await connect(d, 's1');
  await write(s, 8 * MiB, Buffer.alloc(MiB, 0xc1));
  await closeClient(s);
  want.fill(0xc1, 8 * MiB, 9 * MiB);

  // Bad input first, each refused with nothing changed.
  await ok(t, d, 'snapshot', 'create', 'tr', '--origin', 'vol0', '--size', '40M', '--transient');
  const tr = await refusal('/v1/snapshots/tr/merge', d, 'POST', {});
  t.equal(tr.statusCode, 400);
  t.equal(tr.code, 'COWBD_MERGE_REFUSED');
  t.match(tr.message, /transient.*cannot be merged/);
  t.equal((await row(d, 'tr'))?.state, 'valid', 'the transient snapshot is untouched');
  t.ok((await readExport(d, 'tr')).equals(image(0xb1)), 'and still served');
  await ok(t, d, 'snapshot', 'remove', 'tr');
  const unknown = await cli(d, 'snapshot', 'merge', 'nosuch');
  t.equal(unknown.code, 2);
  t.equal(unknown.stderr, 'cowbd: no snapshot named "nosuch"\n');
  t.equal((await refusal('/v1/snapshots/nosuch/merge', d, 'POST', {})).statusCode, 404);
  const badRate = await cli(d, 'snapshot', 'merge', 's1', '--rate', 'fast');
  t.equal(badRate.code, 2);
  t.match(badRate.stderr, /invalid size "fast"/);

  // A low rate: a batch is one chunk at least, so the first goes back at once and the
  // second waits 64 s (64 KiB at 1 KiB/s): the progress holds still meanwhile.
  const out = await ok(t, d, 'snapshot', 'merge', 's1', '--rate', '1K');
  t.match(out, /merging snapshot s1 into vol0 \(1KiB\/s\): vol0 reads as s1 now/);
  t.ok((await readExport(d, 'vol0')).equals(want), 'the origin reads as the snapshot while the merge runs');
  await until('a first chunk back', async () => (await row(d, 's1'))?.merge?.mergedChunks === 1);
  const r = (await row(d, 's1'))!;
  t.equal(r.state, 'merging');
  t.same(r.merge, { totalChunks: 512, mergedChunks: 1, percent: 0, rate: 1024 });
  t.match((await cli(d, 'status')).stdout, /s1 +snapshot .* merging 0%/);
  t.match((await cli(d, 'snapshot', 'list')).stdout, /s1 +vol0 .* merging 0%/);
  t.notOk(
    (await call<{ name: string }[]>(d.dataDir, 'GET', '/v1/volumes')).some((v) => v.name === 's1'),
    'a merging snapshot is no volume',
  );
  const s1Gone = await RawClient.connect(d.port);
  await t.rejects(s1Gone.go('s1'), /failed/, 'a merging snapshot is not exported');
  await closeClient(s1Gone);

  const m = await metrics(d);
  t.match(m, /cowbd_snapshot_merge_total_chunks\{snapshot="s1",origin="vol0"\} 512/);
  t.match(m, /cowbd_snapshot_merge_merged_chunks\{snapshot="s1",origin="vol0"\} 1/);
  t.match(m, /cowbd_snapshot_merge_rate_bytes\{snapshot="s1",origin="vol0"\} 1024/);
  t.match(m, /cowbd_snapshot_merge_pending\{snapshot="s1",origin="vol0"\} 0/);
  t.match(m, /cowbd_snapshot_state\{snapshot="s1",origin="vol0",state="merging"\} 1/);
  t.notMatch(m, /cowbd_snapshot_merge_total_chunks\{snapshot="keep"/, 'no merge series for a snapshot not merging');

  // While it runs: a second merge, removing it, a snapshot of the origin: each a conflict.
  const again = await refusal('/v1/snapshots/s1/merge', d, 'POST', {});
  t.equal(again.statusCode, 409);
  t.match(again.message, /s1 is already merging into vol0/);
  const other = await refusal('/v1/snapshots/keep/merge', d, 'POST', {});
  t.equal(other.statusCode, 409);
  t.equal(other.message, 'origin vol0 is already merging snapshot s1');
  const rm1 = await cli(d, 'snapshot', 'remove', 's1');
  t.equal(rm1.code, 2);
  t.match(rm1.stderr, /snapshot s1 is being merged into its origin: it goes away by itself/);
  t.equal((await refusal('/v1/snapshots/s1', d, 'DELETE')).statusCode, 409);
  const snap = await cli(d, 'snapshot', 'create', 's3', '--origin', 'vol0', '--size', '8M');
  t.equal(snap.code, 2);
  t.match(snap.stderr, /origin vol0 is merging snapshot s1: no snapshot of it can be taken/);
  t.same(
    (await status(d)).map((x) => x.name),
    ['vol0', 'keep', 's1'],
    'nothing was created or removed',
  );
  t.equal((await row(d, 's1'))?.merge?.mergedChunks, 1, 'the merge goes on');

  // --rate on a running merge changes its bound: unbounded, it finishes.
  await ok(t, d, 'snapshot', 'merge', 's1', '--rate', '0');
  t.ok(await waitForLog(d, mergedLog('s1'), 15_000), 'the daemon logs the end');
  const done = d.logs.find(mergedLog('s1'))!;
  t.equal(done.chunks, 512);
  t.equal(done.bytes, WRITTEN);
  t.type(done.seconds, 'number');
  t.type(done.mibPerSecond, 'number');
  t.ok(
    d.logs.some((l) => l.msg === 'merge started' && l.chunks === 512 && l.rate === 1024),
    'the start is logged with its chunks and rate',
  );
  t.same(
    (await status(d)).map((x) => x.name),
    ['vol0', 'keep'],
    'the merged snapshot is gone',
  );
  t.ok((await readExport(d, 'vol0')).equals(want), 'the origin holds exactly the snapshot');
  t.ok((await readExport(d, 'keep')).equals(image(0xa1)), 'the other snapshot still reads its own point in time');
  t.notMatch(await metrics(d), /snapshot="s1"/, 'its metric series are gone');
});

t.test('a merge waits for the origin clients to disconnect; --now is refused meanwhile', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '48M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const o = await connect(d, 'vol0');
  await write(o, 0, Buffer.alloc(2 * MiB, 0xd1));
  await ok(t, d, 'snapshot', 'create', 's2', '--origin', 'vol0', '--size', '8M');
  await ok(t, d, 'snapshot', 'create', 'tiny', '--origin', 'vol0', '--size', '1M');
  await write(o, 0, Buffer.alloc(2 * MiB, 0xd2));
  // Too small for those writes: invalid, so it no longer holds a point in time to go back to.
  t.equal((await row(d, 'tiny'))?.state, 'invalid');
  const invalid = await refusal('/v1/snapshots/tiny/merge', d, 'POST', {});
  t.equal(invalid.statusCode, 400);
  t.equal(invalid.message, 'snapshot tiny is invalid: it no longer holds its point in time');
  t.equal((await row(d, 'tiny'))?.state, 'invalid', 'the invalid snapshot is untouched');
  await ok(t, d, 'snapshot', 'remove', 'tiny');

  const out = await ok(t, d, 'snapshot', 'merge', 's2');
  t.equal(out, 'merge of snapshot s2 into vol0 pending: 1 client on vol0; it starts when the last disconnects\n');
  t.ok(await waitForLog(d, (l) => l.msg === 'merge of snapshot s2 pending: 1 client on vol0'));
  const r = (await row(d, 's2'))!;
  t.equal(r.state, 'valid', 'a pending merge leaves a normal snapshot');
  t.same(r.mergePending, { clients: 1, rate: null });
  const st = (await cli(d, 'status')).stdout;
  t.match(st, /s2 +snapshot .* merge pending \(1 client\)/);
  t.match(st, /s2: merge pending: 1 client on vol0/);
  t.match(await metrics(d), /cowbd_snapshot_merge_pending\{snapshot="s2",origin="vol0"\} 1/);
  const now = await refusal('/v1/snapshots/s2/merge', d, 'POST', { now: true });
  t.equal(now.statusCode, 409);
  t.equal(now.code, 'COWBD_MERGE_DEFERRED');
  t.match(now.message, /volume vol0 has 1 NBD client connected: --now merges only when none is/);
  const snapStill = await readExport(d, 's2');
  t.ok(snapStill.subarray(0, 2 * MiB).equals(Buffer.alloc(2 * MiB, 0xd1)), 'the snapshot is still served');
  t.ok((await readAll(o, VOL)).subarray(0, 2 * MiB).equals(Buffer.alloc(2 * MiB, 0xd2)), 'and the origin unchanged');

  await closeClient(o);
  t.ok(await waitForLog(d, mergedLog('s2'), 15_000), 'the merge starts when the last client leaves, and completes');
  t.ok(d.logs.some((l) => l.msg === 'merge started' && l.snapshot === 's2'));
  const want = Buffer.alloc(VOL);
  want.fill(0xd1, 0, 2 * MiB);
  t.ok((await readExport(d, 'vol0')).equals(want), 'the origin is the snapshot');
  t.equal(await row(d, 's2'), undefined);
});

t.test('kill -9 during a merge: it resumes at the next start and finishes', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-merge-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  const d1 = await startDaemon({ volumes: [{ name: 'vol0', size: '48M' }], dataDir, logLevel: 'info' });
  t.teardown(async () => {
    if (d1.proc.exitCode === null && d1.proc.signalCode === null) await d1.stop();
  });
  const o = await connect(d1, 'vol0');
  await write(o, 0, image(0xe1).subarray(0, WRITTEN));
  await ok(t, d1, 'snapshot', 'create', 's1', '--origin', 'vol0', '--size', '40M');
  await write(o, 0, image(0xe2).subarray(0, WRITTEN));
  await closeClient(o);
  await ok(t, d1, 'snapshot', 'merge', 's1', '--rate', '1K');
  await until('a first chunk back', async () => (await row(d1, 's1'))?.merge?.mergedChunks === 1);
  const exited = new Promise((r) => d1.proc.once('exit', r));
  d1.proc.kill('SIGKILL');
  await exited;

  const d2 = await startDaemon({ dataDir, logLevel: 'info' });
  t.teardown(() => d2.stop());
  t.ok(
    d2.logs.some((l) => l.msg === 'merge resumed' && l.snapshot === 's1'),
    'the merge resumes at start',
  );
  t.ok(await waitForLog(d2, mergedLog('s1'), 15_000), 'and finishes');
  t.ok((await readExport(d2, 'vol0')).equals(image(0xe1)), 'the origin is exactly the snapshot');
  t.same(
    (await status(d2)).map((x) => x.name),
    ['vol0'],
  );
});
