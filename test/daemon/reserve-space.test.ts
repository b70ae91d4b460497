// A snapshot's size is reserved on disk (issue 24), under the real daemon on small tmpfs
// mounts (root only): a full file system fails origin writes with NBD_ENOSPC and leaves
// a reserved snapshot valid, with its point in time intact, across restarts and a kill -9.
// A creation or an extension that does not fit is refused (507 COWBD_NO_SPACE) and
// changes nothing; a sparse snapshot keeps the thin-pool trade-off and is invalidated
// with reason disk-full.
import t from 'tap';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import { call } from '../../daemon/control-client.js';
import { cowbdResult, startDaemon, type Daemon } from '../helpers/daemon.js';
import { NbdClient, fill, nbdErrno } from '../helpers/nbd-client.js';
import { allocatedBytes, freeBytes, tmpfsMounts } from '../helpers/tmpfs.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
/** The data the snapshot must keep: 40 MiB at the origin's start. */
const PATTERN = 40 * MiB;
/** Where the origin's writes into never-written space go. */
const FRESH = 64 * MiB;

t.setTimeout(120_000);
const mounts = tmpfsMounts();
const top = await mkdtemp(join(tmpdir(), 'cowbd-reserve-'));
t.teardown(async () => {
  await mounts.unmountAll();
  await rm(top, { recursive: true, force: true });
});
const dirs = {
  full: join(top, 'full'),
  late: join(top, 'late'),
  sparse: join(top, 'sparse'),
  refuse: join(top, 'refuse'),
  extend: join(top, 'extend'),
};
const skip = (await mounts.mount(dirs.full, '100m')) ?? false;
if (!skip) {
  await mounts.mount(dirs.late, '100m');
  await mounts.mount(dirs.sparse, '100m');
  await mounts.mount(dirs.refuse, '16m');
  await mounts.mount(dirs.extend, '16m');
}

interface Usage {
  state: string;
  capacityBytes: number;
  reservedBytes: number;
  sparse: boolean;
  invalid: { reason: string; usedChunks: number; usedBytes: number } | null;
}
interface Failure {
  statusCode?: number;
  code?: string;
  message: string;
}
const usage = (d: Daemon, name: string) => call<Usage>(d.dataDir, 'GET', `/v1/snapshots/${name}`);
/** The failure of a control call, or 'succeeded'. */
const refusal = (p: Promise<unknown>) =>
  p.then(
    () => 'succeeded' as const,
    (e: Failure) => e,
  );
/** The stores in a cow directory (the origins' change trackers, NAME.cbt, live beside them). */
const stores = async (dir: string) => (await readdir(join(dir, 'cow')).catch(() => [] as string[])).filter((f) => !f.endsWith('.cbt'));
const seedA = (i: number) => 1000 + i;
const seedB = (i: number) => 2000 + i;
const sha = (parts: Buffer[]) => parts.reduce((h, p) => h.update(p), createHash('sha256')).digest('hex');
const PATTERN_SHA = sha(Array.from({ length: PATTERN / MiB }, (_, i) => fill(MiB, seedA(i))));

/** Reads a whole export: the hash of its first PATTERN bytes, and whether the rest is zeros. */
async function content(d: Daemon, name: string): Promise<{ head: string; restZero: boolean }> {
  const c = await NbdClient.connect({ port: d.port, exportName: name });
  const h = createHash('sha256');
  let restZero = true;
  const zeros = Buffer.alloc(4 * MiB);
  // Eight reads in flight, taken in order.
  const n = c.size / (4 * MiB);
  const reads: (Promise<Buffer> | undefined)[] = [];
  for (let i = 0; i < n; i++) {
    while (reads.length < Math.min(n, i + 8)) reads.push(c.read(reads.length * 4 * MiB, 4 * MiB));
    const b = await reads[i]!;
    reads[i] = undefined;
    if (i * 4 * MiB < PATTERN) h.update(b);
    else restZero &&= b.equals(zeros);
  }
  await c.disconnect();
  return { head: h.digest('hex'), restZero };
}

async function writePattern(c: NbdClient, seed: (i: number) => number): Promise<void> {
  for (let i = 0; i < PATTERN / MiB; i++) await c.write(i * MiB, fill(MiB, seed(i)));
  await c.flush();
}

/** Rewrites the pattern with seedB and flushes; resolves to how many requests failed. */
async function rewritePattern(c: NbdClient): Promise<number> {
  let failed = 0;
  for (let i = 0; i < PATTERN / MiB; i++) failed += (await nbdErrno(c.write(i * MiB, fill(MiB, seedB(i))))) ? 1 : 0;
  return failed + ((await nbdErrno(c.flush())) ? 1 : 0);
}

/**
 * Writes `bytes` in 1 MiB pieces from FRESH on, a FLUSH every 4 MiB and at the end, until
 * two requests have failed: the daemon may hold writes behind, so an error can surface on
 * a later write or a FLUSH. Durable: the offsets acknowledged and then flushed without error.
 */
async function fillFresh(c: NbdClient, bytes: number) {
  const errors: { what: string; off: number; errno: number }[] = [];
  const durable: number[] = [];
  let pending: number[] = [];
  const flush = async (off: number) => {
    const e = await nbdErrno(c.flush());
    if (e) errors.push({ what: 'flush', off, errno: e });
    else durable.push(...pending);
    pending = [];
  };
  for (let off = FRESH; off < FRESH + bytes && errors.length < 2; off += MiB) {
    const e = await nbdErrno(c.write(off, fill(MiB, off / MiB)));
    if (e) errors.push({ what: 'write', off, errno: e });
    else pending.push(off);
    if ((off / MiB) % 4 === 3) await flush(off);
  }
  await flush(-1);
  return { errors, durable };
}

/** What the origin acknowledged and flushed before the disk filled, for the restarts. */
let flushed: number[] | undefined;

t.test('a full disk fails the origin with ENOSPC; the reserved snapshot stays valid', { skip }, async (t) => {
  const dataDir = dirs.full;
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  await writePattern(c, seedA);

  const made = await cowbdResult(['snapshot', 'create', 's', '--origin', 'vol', '--size', '50M', '--data-dir', dataDir]);
  t.equal(made.code, 0, `snapshot create s --size 50M succeeds on a 100M disk holding 40M ${made.stderr.trim()}`);
  const store = join(dataDir, 'cow', 'vol.64k.cows');
  const allocated = await allocatedBytes(store);
  t.ok(allocated >= 50 * MiB, `its store has ${(allocated / MiB).toFixed(2)} MiB allocated at creation`);
  t.match(await usage(d, 's'), { state: 'valid', sparse: false, reservedBytes: 50 * MiB, invalid: null }, 'reserved, not sparse');
  t.comment(`free after the snapshot: ${((await freeBytes(dataDir)) / MiB).toFixed(2)} MiB`);

  await writePattern(c, seedB);
  const row = (await call<{ name: string; usedPercent: number | null }[]>(dataDir, 'GET', '/v1/status')).find((r) => r.name === 's');
  const pct = row?.usedPercent ?? 0;
  t.ok(pct >= 80 && pct < 83, `rewriting the 40M copied it into the snapshot: ${pct.toFixed(2)}% used`);
  t.equal(await allocatedBytes(store), allocated, 'into space allocated at creation: the store did not grow');

  const { errors, durable } = await fillFresh(c, 100 * MiB);
  flushed = durable;
  t.comment(`100M into never-written space: ${durable.length} MiB flushed, then ${JSON.stringify(errors)}`);
  t.ok(errors.length > 0, 'the writes do not all fit');
  t.ok(
    errors.some((e) => e.errno === C.NBD_ENOSPC),
    'they fail with NBD_ENOSPC',
  );
  t.ok(errors.length >= 2, 'and the failure is not silent later: the next write or FLUSH fails too');
  t.ok(durable.length > 0 && durable.length < 60, `writes succeed until the disk is full (${durable.length} MiB)`);
  t.ok((await freeBytes(dataDir)) < 2 * MiB, 'the disk is full');

  t.match(await usage(d, 's'), { state: 'valid', invalid: null }, 'the snapshot stays valid');
  t.same(await content(d, 's'), { head: PATTERN_SHA, restZero: true }, 'and reads its point in time: the first 40M, zeros elsewhere');
  let intact = true;
  for (let i = 0; i < PATTERN / MiB; i++) intact &&= (await c.read(i * MiB, MiB)).equals(fill(MiB, seedB(i)));
  for (const off of durable) intact &&= (await c.read(off, MiB)).equals(fill(MiB, off / MiB));
  t.ok(intact, 'the origin reads what was acknowledged and flushed');
  await c.disconnect();
  t.notOk(
    d.logs.some((l) => /invalidated/.test(String(l.msg))),
    'no invalidation was logged',
  );

  t.equal(await d.stop(), 0, 'the daemon stops cleanly');
});

t.test('restarted on the full disk, cleanly or after kill -9, the snapshot is the same', { skip }, async (t) => {
  const dataDir = dirs.full;
  const durable = flushed;
  if (!durable) return t.fail('needs the full disk the test before left');
  const store = join(dataDir, 'cow', 'vol.64k.cows');
  t.ok((await freeBytes(dataDir)) < 2 * MiB, 'the disk is still full');
  for (const how of ['a clean stop', 'kill -9']) {
    const d2 = await startDaemon({ dataDir, logLevel: 'info' });
    t.teardown(() => d2.stop());
    t.match(await usage(d2, 's'), { state: 'valid', invalid: null, reservedBytes: 50 * MiB }, `after ${how}: still valid and reserved`);
    t.same(await content(d2, 's'), { head: PATTERN_SHA, restZero: true }, `after ${how}: the same point in time`);
    const o = await NbdClient.connect({ port: d2.port, exportName: 'vol' });
    let same = true;
    for (const off of durable) same &&= (await o.read(off, MiB)).equals(fill(MiB, off / MiB));
    t.ok(same, `after ${how}: the origin still reads what was flushed`);
    await o.disconnect();
    // The first restarted daemon is killed, so the second starts after a kill -9.
    if (how === 'a clean stop') d2.proc.kill('SIGKILL');
    await d2.stop();
  }
  t.ok((await allocatedBytes(store)) >= 50 * MiB, 'the store keeps its reservation');
});

// The same steps as the sparse case below, reserved: copies needed once the disk is
// full land in the space set aside, and no origin write fails for them.
t.test('copies made after the disk filled land in the reservation', { skip }, async (t) => {
  const dataDir = dirs.late;
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  await writePattern(c, seedA);
  await call(dataDir, 'POST', '/v1/snapshots', { name: 's', origin: 'vol', size: '50M' });
  const { errors } = await fillFresh(c, 100 * MiB);
  t.ok(
    errors.some((e) => e.errno === C.NBD_ENOSPC),
    'the origin fills the disk',
  );
  const failed = await rewritePattern(c);
  t.equal(failed, 0, 'rewriting the 40M with the disk full: every write and the FLUSH succeed');
  let same = true;
  for (let i = 0; i < PATTERN / MiB; i++) same &&= (await c.read(i * MiB, MiB)).equals(fill(MiB, seedB(i)));
  t.ok(same, 'and read back');
  t.match(await usage(d, 's'), { state: 'valid', invalid: null }, 'the snapshot stays valid');
  t.same(await content(d, 's'), { head: PATTERN_SHA, restZero: true }, 'and reads its point in time');
  await c.disconnect();
});

t.test('a sparse snapshot overcommits: a full disk invalidates it, disk-full', { skip }, async (t) => {
  const dataDir = dirs.sparse;
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  await writePattern(c, seedA);
  await call(dataDir, 'POST', '/v1/snapshots', { name: 's', origin: 'vol', size: '50M', sparse: true });
  const store = join(dataDir, 'cow', 'vol.64k.sparse.cows');
  t.ok((await allocatedBytes(store)) < MiB, 'its store reserves nothing');
  t.match(await usage(d, 's'), { state: 'valid', sparse: true, reservedBytes: 0 }, 'sparse, nothing reserved');

  // A sparse store takes space when it copies: the copies come after the disk is full.
  const { errors } = await fillFresh(c, 100 * MiB);
  t.ok(
    errors.some((e) => e.errno === C.NBD_ENOSPC),
    'the origin fills the disk',
  );
  const failed = await rewritePattern(c);
  t.comment(`rewriting the 40M with the disk full: ${failed} requests failed`);
  const u = await usage(d, 's');
  t.equal(u.state, 'invalid', 'the snapshot is invalidated');
  t.equal(u.invalid?.reason, 'disk-full', 'because the file system was full');
  const s = await NbdClient.connect({ port: d.port, exportName: 's' });
  t.equal(await nbdErrno(s.read(0, 4 * KiB)), C.NBD_EIO, 'its reads fail with EIO');
  await s.disconnect();
  await c.disconnect();
});

t.test('a creation that does not fit is refused and changes nothing', { skip }, async (t) => {
  const dataDir = dirs.refuse;
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '64M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  await c.write(0, fill(4 * MiB, 5), true);
  await c.disconnect();
  const before = await stores(dataDir);
  const free = await freeBytes(dataDir);

  const e = await refusal(call(dataDir, 'POST', '/v1/snapshots', { name: 'big', origin: 'vol', size: '32M' }));
  t.match(e, { statusCode: 507, code: 'COWBD_NO_SPACE' }, 'a 32M snapshot on a 16M disk: HTTP 507 COWBD_NO_SPACE');
  const m = /needs ([\d.]+) MiB .* has ([\d.]+) MiB free/.exec(e === 'succeeded' ? '' : e.message);
  t.ok(m && Number(m[1]) >= 32 && Number(m[2]) < 16, `the message names needed and free bytes: ${e === 'succeeded' ? e : e.message}`);
  t.match(await refusal(usage(d, 'big')), { statusCode: 404 }, 'no snapshot of that name exists');
  t.same(await stores(dataDir), before, 'no store file is left behind');
  t.ok(Math.abs((await freeBytes(dataDir)) - free) <= 2 * CHUNK, 'free space is what it was');

  const cli = await cowbdResult(['snapshot', 'create', 'big', '--origin', 'vol', '--size', '32M', '--data-dir', dataDir]);
  t.not(cli.code, 0, 'the CLI fails too');
  t.match(cli.stderr, /needs .* free/, `and says why: ${cli.stderr.trim()}`);
  t.match(
    await call(dataDir, 'POST', '/v1/snapshots', { name: 'fits', origin: 'vol', size: '4M' }),
    { name: 'fits' },
    'one that fits is made',
  );
});

t.test('an extension that does not fit is refused; the snapshot keeps working', { skip }, async (t) => {
  const dataDir = dirs.extend;
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '64M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  await c.write(0, fill(2 * MiB, 7), true);
  await call(dataDir, 'POST', '/v1/snapshots', { name: 's', origin: 'vol', size: '4M' });
  const u0 = await usage(d, 's');
  const free = await freeBytes(dataDir);

  const e = await refusal(call(dataDir, 'POST', '/v1/snapshots/s/extend', { size: '+32M' }));
  t.match(e, { statusCode: 507, code: 'COWBD_NO_SPACE' }, 'growing by 32M on a 16M disk: HTTP 507 COWBD_NO_SPACE');
  t.match(e === 'succeeded' ? '' : e.message, /growing snapshot s needs .* free/, 'the message says what the growth needs');
  const u1 = await usage(d, 's');
  t.match(
    u1,
    { state: 'valid', invalid: null, capacityBytes: u0.capacityBytes, reservedBytes: u0.reservedBytes },
    'capacity unchanged, valid',
  );
  t.ok(Math.abs((await freeBytes(dataDir)) - free) <= 2 * CHUNK, 'free space is what it was');

  await c.write(0, fill(2 * MiB, 8));
  await c.flush();
  t.same(await c.read(0, 2 * MiB), fill(2 * MiB, 8), 'a later origin write that copies works');
  const s = await NbdClient.connect({ port: d.port, exportName: 's' });
  t.same(await s.read(0, 2 * MiB), fill(2 * MiB, 7), 'and the snapshot reads its point in time');
  await s.disconnect();
  await c.disconnect();
  t.equal((await usage(d, 's')).state, 'valid', 'still valid');
  t.match(await call(dataDir, 'POST', '/v1/snapshots/s/extend', { size: '+2M' }), { name: 's' }, 'an extension that fits succeeds');
});
