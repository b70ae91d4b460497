// A failing disk under the real daemon. Device-mapper's error/flakey targets would be
// the natural tool, but they need the dm module (absent from many CI kernels and
// containers), so the daemon's files are wrapped in cow/fault-device.ts instead,
// armed through the TEST-ONLY COWBD_TEST_FAULTS rules file, which the daemon re-reads
// whenever it changes. Proves, on one daemon that never goes down:
//  - EIO reading the origin: EIO reply, the same connection keeps working;
//  - EIO writing the origin: EIO reply; other writes land;
//  - fdatasync failing on FLUSH (and on a FUA write): EIO reply, the next FLUSH works;
//  - EIO writing a copy into a snapshot store, or syncing it: that snapshot is
//    invalidated (durably: still invalid after a restart), the origin write lands,
//    a snapshot in another store is untouched;
//  - a store whose sync failed (its committer gives up for good) still removes its
//    snapshots, after which a new store of that chunk size works;
//  - each failure is logged with the real error under `err` and the export's name.
import t from 'tap';
import { mkdtemp, rm, writeFile, rename } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import { call } from '../../daemon/control-client.js';
import type { FaultRule } from '../../cow/fault-device.js';
import { startDaemon, waitForLog as logged, type Daemon } from '../helpers/daemon.js';
import { NbdClient, fill, nbdErrno } from '../helpers/nbd-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HEADER = 128 * KiB; // store header region: slots live below, data and metadata above

const dir = await mkdtemp(join(tmpdir(), 'cowbd-faults-'));
const dataDir = join(dir, 'data');
const rulesFile = join(dir, 'faults.json');
t.teardown(() => rm(dir, { recursive: true, force: true }));

/** Arms rules for every I/O that starts from now on (atomic replace: the daemon never reads half a file). */
async function faults(rules: FaultRule[]): Promise<void> {
  await writeFile(`${rulesFile}.tmp`, JSON.stringify(rules));
  await rename(`${rulesFile}.tmp`, rulesFile);
}

interface SnapView {
  name: string;
  state: string;
}
const state = async (d: Daemon, name: string) => (await call<SnapView>(d.dataDir, 'GET', `/v1/snapshots/${name}`)).state;

/** A 'request failed' line carrying the real error (code) and the export's name. */
const failure =
  (exportName: string, command: string, code: string, level = 50) =>
  (l: Record<string, unknown>) =>
    l.msg === 'request failed' &&
    l.export === exportName &&
    l.command === command &&
    l.level === level &&
    (l.err as { code?: string } | undefined)?.code === code;

await faults([]);
process.env.COWBD_TEST_FAULTS = rulesFile; // inherited by the daemons this file starts
const start = (volumes?: { name: string; size: string }[]) => startDaemon({ dataDir, volumes, logLevel: 'info' });

let d = await start([{ name: 'vol0', size: '16M' }]);
t.teardown(() => d.stop());

t.test('fault injection is announced and off until armed', async (t) => {
  t.ok(
    d.logs.some((l) => l.level === 40 && String(l.msg).includes('TEST-ONLY fault injection')),
    'the daemon warns that faults are on',
  );
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await c.write(0, fill(4 * MiB, 1));
  t.same(await c.read(0, 4 * MiB), fill(4 * MiB, 1));
  await c.disconnect();
});

t.test('EIO reading the origin', async (t) => {
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await faults([{ file: 'vol0.vol', op: 'read', from: MiB, to: MiB + 4 * KiB }]);
  t.equal(await nbdErrno(c.read(MiB, 4 * KiB)), C.NBD_EIO, 'a read of the bad range gets EIO');
  t.equal(await nbdErrno(c.read(MiB - 512, 1024)), C.NBD_EIO, 'so does one overlapping it');
  t.same(await c.read(2 * MiB, 64 * KiB), fill(4 * MiB, 1).subarray(2 * MiB, 2 * MiB + 64 * KiB), 'the same connection reads elsewhere');
  t.ok(await logged(d, failure('vol0', 'read', 'EIO')), 'logged at error with the export name and the real error');
  await faults([]);
  t.same(await c.read(MiB, 4 * KiB), fill(4 * MiB, 1).subarray(MiB, MiB + 4 * KiB), 'readable again once the fault clears');
  await c.disconnect();
});

t.test('EIO writing the origin', async (t) => {
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await faults([{ file: 'vol0.vol', op: 'write', from: 3 * MiB, to: 3 * MiB + 4 * KiB }]);
  t.equal(await nbdErrno(c.write(3 * MiB, fill(4 * KiB, 7))), C.NBD_EIO, 'a write of the bad range gets EIO');
  await c.write(3 * MiB + 8 * KiB, fill(4 * KiB, 8));
  t.same(await c.read(3 * MiB + 8 * KiB, 4 * KiB), fill(4 * KiB, 8), 'a write elsewhere on the same connection lands');
  t.ok(await logged(d, failure('vol0', 'write', 'EIO')), 'logged');
  await faults([]);
  await c.disconnect();
});

t.test('fdatasync failing on FLUSH and on a FUA write', async (t) => {
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await c.write(5 * MiB, fill(4 * KiB, 9));
  await faults([{ file: 'vol0.vol', op: 'sync', times: 1 }]);
  t.equal(await nbdErrno(c.flush()), C.NBD_EIO, 'FLUSH gets EIO');
  t.ok(await logged(d, failure('vol0', 'flush', 'EIO')), 'logged');
  await c.flush();
  t.pass('the next FLUSH succeeds');
  await faults([{ file: 'vol0.vol', op: 'sync', times: 1 }]);
  t.equal(await nbdErrno(c.write(5 * MiB, fill(4 * KiB, 10), true)), C.NBD_EIO, 'a FUA write whose sync fails gets EIO');
  await c.write(5 * MiB, fill(4 * KiB, 11), true);
  t.same(await c.read(5 * MiB, 4 * KiB), fill(4 * KiB, 11), 'the next FUA write succeeds');
  await faults([]);
  await c.disconnect();
});

t.test('EIO copying into a snapshot store invalidates that snapshot; the origin write lands', async (t) => {
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  // The origin holds data where we write (chunks of zeros cost no copy).
  await c.write(8 * MiB, fill(2 * MiB, 20), true);
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'wfail', origin: 'vol0', size: '4M' });
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'other', origin: 'vol0', size: '4M', chunkSize: '128K' });
  // Only the 64 KiB store's data region fails: its slots (below 128 KiB) still take the invalid mark.
  await faults([{ file: 'vol0.64k.cows', op: 'write', from: HEADER }]);
  await c.write(8 * MiB, fill(64 * KiB, 21));
  // Held until its copy is made (write-behind): the FLUSH waits for that, under the fault.
  await c.flush();
  t.pass('the origin write and a FLUSH succeeded');
  await faults([]);
  t.same(await c.read(8 * MiB, 64 * KiB), fill(64 * KiB, 21), 'and landed');
  t.equal(await state(d, 'wfail'), 'invalid', 'the snapshot whose copy failed is invalid');
  t.equal(await state(d, 'other'), 'valid', 'the snapshot in another store is not');
  const s = await NbdClient.connect({ port: d.port, exportName: 'wfail' });
  t.equal(await nbdErrno(s.read(8 * MiB, 4 * KiB)), C.NBD_EIO, 'reads of the invalid snapshot fail with EIO');
  await s.disconnect();
  const o = await NbdClient.connect({ port: d.port, exportName: 'other' });
  t.same(await o.read(8 * MiB, 2 * MiB), fill(2 * MiB, 20), 'the other snapshot still reads its point in time');
  await o.disconnect();
  t.ok(
    await logged(
      d,
      (l) =>
        l.snapshot === 'wfail' &&
        l.level === 50 &&
        String(l.msg).includes('invalidated') &&
        l.reason === 'io-error' &&
        String(l.detail).includes('EIO'),
    ),
    'the invalidation is logged with the real error',
  );
  await c.disconnect();
});

t.test('fdatasync failing on a snapshot store invalidates its snapshot; the origin write lands', async (t) => {
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'sfail', origin: 'vol0', size: '4M', chunkSize: '32K' });
  await faults([{ file: 'vol0.32k.cows', op: 'sync', times: 1 }]);
  await c.write(9 * MiB, fill(32 * KiB, 22));
  await c.flush();
  t.pass('the origin write and a FLUSH succeeded');
  await faults([]);
  t.same(await c.read(9 * MiB, 32 * KiB), fill(32 * KiB, 22), 'and landed');
  t.equal(await state(d, 'sfail'), 'invalid', 'the snapshot is invalid');
  t.equal(await state(d, 'other'), 'valid', 'the snapshot in another store is not');
  await c.disconnect();
});

t.test('a store that cannot even take the invalid mark: the origin write that needs it never lands, and says so', async (t) => {
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'dead', origin: 'vol0', size: '4M', chunkSize: '16K' });
  // Every write and sync of this store fails from now on.
  await faults([{ file: 'vol0.16k.cows', op: ['write', 'sync'] }]);
  // Acknowledged while its copy is made (write-behind); landing it would leave a snapshot
  // that reads as valid, with the new data, after a restart: it is dropped instead.
  t.equal(await nbdErrno(c.write(10 * MiB, fill(16 * KiB, 23))), 0, 'held and acknowledged');
  t.equal(await nbdErrno(c.flush()), C.NBD_EIO, 'the next FLUSH fails: the write never landed');
  // The log line travels through the daemon's stdout: it may trail the FLUSH reply.
  t.ok(await logged(d, (l) => l.msg === 'acknowledged origin write lost'), 'and the loss is logged');
  t.equal(await state(d, 'dead'), 'invalid', 'the snapshot is invalid in memory');
  t.equal(
    await nbdErrno(c.write(10 * MiB + 16 * KiB, fill(16 * KiB, 24))),
    C.NBD_EIO,
    'every write it would have needed a copy for fails alike',
  );
  t.same(await c.read(8 * MiB, 64 * KiB), fill(64 * KiB, 21), 'reads of the origin still work');
  const o = await NbdClient.connect({ port: d.port, exportName: 'other' });
  t.same(await o.read(8 * MiB, 2 * MiB), fill(2 * MiB, 20), 'and so do the other exports');
  await o.disconnect();
  await faults([]);
  await c.write(10 * MiB, fill(16 * KiB, 26));
  t.pass('once the store takes the mark, the writes go through');
  t.same(await c.read(10 * MiB, 16 * KiB), fill(16 * KiB, 26));
  await c.disconnect();
});

t.test('a store whose sync failed still removes its snapshots; a new store then works', async (t) => {
  // The 32 KiB store's committer gave up when its sync failed: the removal goes in directly.
  await call(d.dataDir, 'DELETE', '/v1/snapshots/sfail');
  t.notOk(
    (await call<SnapView[]>(d.dataDir, 'GET', '/v1/snapshots')).some((s) => s.name === 'sfail'),
    'removed',
  );
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'fresh', origin: 'vol0', size: '4M', chunkSize: '32K' });
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  const before = await c.read(11 * MiB, 32 * KiB);
  await c.write(11 * MiB, fill(32 * KiB, 27));
  t.equal(await state(d, 'fresh'), 'valid', 'a snapshot in the new store of that chunk size copies and stays valid');
  const f = await NbdClient.connect({ port: d.port, exportName: 'fresh' });
  t.same(await f.read(11 * MiB, 32 * KiB), before, 'and reads its point in time');
  await f.disconnect();
  await c.disconnect();
});

t.test('after a restart: invalid stays invalid, the rest reads as before', async (t) => {
  t.equal(d.proc.exitCode, null, 'the daemon stayed up through every fault');
  t.equal(await d.stop(), 0, 'and stops cleanly');
  t.notOk(
    d.logs.some((l) => l.msg === 'flush failed'),
    'without trying to flush the invalid snapshots',
  );
  d = await start();
  for (const name of ['wfail', 'dead']) t.equal(await state(d, name), 'invalid', `${name} is still invalid`);
  t.equal(await state(d, 'other'), 'valid');
  t.equal(await state(d, 'fresh'), 'valid');
  const o = await NbdClient.connect({ port: d.port, exportName: 'other' });
  t.same(await o.read(8 * MiB, 2 * MiB), fill(2 * MiB, 20), 'the valid snapshot reads its point in time');
  await o.disconnect();
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  t.same(await c.read(8 * MiB, 64 * KiB), fill(64 * KiB, 21), 'the origin kept the write that invalidated wfail');
  t.same(await c.read(9 * MiB, 32 * KiB), fill(32 * KiB, 22), 'and the one that invalidated sfail');
  await c.disconnect();
});
