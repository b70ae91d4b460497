// A snapshot's size reserved in its store file (cow/reservation.ts), on the memory device
// whose spaceLimit plays a full file system: what is reserved, what a full disk then costs
// (an origin write, never a reserved snapshot), what a sparse store costs instead, and the
// reason an invalid snapshot records.
import t from 'tap';
import { MemDevice } from '../../cow/mem-device.js';
import { SnapshotPool } from '../../cow/snapshot-pool.js';
import { Snapshot } from '../../cow/snapshot.js';
import { decodeSlot, encodeSlot, headerChunks } from '../../cow/format.js';
import { SECTOR, idAt, makeRig, originOf, pattern, snap, type Rig } from './helpers.js';

const CS = 4096;
const HEADER = headerChunks(CS);
/** 64 chunks of origin, every sector tagged 1. */
const ORIGIN_SECTORS = (64 * CS) / SECTOR;
const chunkWrite = (c: number, id: number) => pattern((c * CS) / SECTOR, CS / SECTOR, id);

/** A rig whose pool is sparse (reserves nothing), over the same kind of devices. */
async function sparseRig(): Promise<Rig> {
  const rig = await makeRig(ORIGIN_SECTORS, CS);
  const storeDev = new MemDevice(0);
  const { origin, pools } = originOf(rig.originDev);
  const pool = await SnapshotPool.create(storeDev, origin, { chunkSize: CS, originSize: 64 * CS, originName: 'o', sparse: true });
  pools.add(pool);
  return { originDev: rig.originDev, storeDev, origin, pool };
}

t.test("a snapshot's whole size is allocated before it exists, and given back with it", async (t) => {
  const rig = await makeRig(ORIGIN_SECTORS, CS);
  const a = await snap(rig, 'a', 20);
  t.equal(rig.storeDev.size, (HEADER + 20) * CS, 'header and 20 chunks allocated');
  t.match(rig.pool.space(), { neededBytes: (HEADER + 20) * CS, reservedBytes: (HEADER + 20) * CS });
  t.equal(a.usage().reservedBytes, 20 * CS);
  t.equal(a.usage().sparse, false);
  const b = await snap(rig, 'b', 10);
  t.equal(rig.storeDev.size, (HEADER + 30) * CS, 'and 10 more for the second');
  await rig.origin.write(chunkWrite(0, 2), 0, false);
  await rig.origin.flush();
  t.equal(rig.storeDev.size, (HEADER + 30) * CS, 'a copy lands inside the reservation: the file does not grow');
  await rig.pool.remove(b.record);
  t.equal(rig.storeDev.size, (HEADER + 20) * CS, "the removed snapshot's space is cut off the end");
  t.equal(await idAt(a, 0), 1, 'the one left reads its point in time');
  await rig.pool.remove(a.record);
  t.equal(rig.storeDev.size, HEADER * CS, 'with no snapshot left only the header stays');
});

t.test('a reservation that does not fit changes nothing', async (t) => {
  const rig = await makeRig(ORIGIN_SECTORS, CS);
  rig.storeDev.spaceLimit = (HEADER + 25) * CS;
  await snap(rig, 'a', 20);
  const before = rig.storeDev.size;
  await t.rejects(snap(rig, 'b', 10), {
    id: 'COW_NO_SPACE',
    code: 'ENOSPC',
    message: /snapshot b needs 40\.0 KiB reserved on disk and the file system has 20\.0 KiB free/,
  });
  t.equal(rig.storeDev.size, before, 'the file is as it was');
  t.equal(rig.pool.snapshotCount, 1, 'no snapshot b');
  t.equal(rig.pool.space().neededBytes, before, 'and nothing is still claimed');
  await snap(rig, 'c', 5);
  t.equal(rig.storeDev.size, (HEADER + 25) * CS, 'a snapshot that fits is still made');
  await t.rejects(
    rig.pool.extend(rig.pool.records.find((r) => r?.name === 'c')!, 6),
    { code: 'ENOSPC', message: /growing snapshot c needs/ },
    'so is a growth that does not fit',
  );
  t.equal(rig.pool.records.find((r) => r?.name === 'c')?.capacityChunks, 5, 'which leaves the size as it was');
});

t.test("a reserved store never needs new space for its snapshots' chunks", async (t) => {
  const rig = await makeRig(ORIGIN_SECTORS, CS);
  const s = await snap(rig, 's', 12);
  // The file system is full: not one byte past the reservation.
  rig.storeDev.spaceLimit = rig.storeDev.size;
  for (let c = 0; c < 20; c++) await rig.origin.write(chunkWrite(c, 2), c * CS, false);
  await rig.origin.flush();
  t.equal(s.state, 'invalid', 'the 11th copy did not fit its size');
  t.same(s.usage().invalid, { reason: 'full', usedChunks: 12, usedBytes: 12 * CS }, 'full, not disk-full: it held all 12 chunks');
  for (let c = 0; c < 20; c++) t.equal(await idAt(rig.origin, (c * CS) / SECTOR), 2, `origin chunk ${c} written`);
  const re = await SnapshotPool.open(new MemDevice(0, rig.storeDev.durableImage()), originOf(rig.originDev).origin);
  const rec = re.records.find((r) => r?.name === 's')!;
  t.equal(rec.invalidReason, 'full', 'the reason is in the slot');
  t.equal(rec.usedAtInvalidation, 12, 'and what it held');
});

t.test('ENOSPC on a copy: a reserved store fails the origin write, a sparse one loses its snapshot', async (t) => {
  // A reserved store short of its reservation (as after a restart on a full disk): made
  // without a claim, so only its header and first area exist.
  const rig = await makeRig(ORIGIN_SECTORS, CS);
  const rec = await rig.origin.quiesced(() =>
    rig.pool.createSnapshot({ name: 'r', capacityChunks: 10, policy: 'invalidate', readOnly: false }),
  );
  const r = new Snapshot(rig.origin, rig.pool, rec);
  rig.storeDev.spaceLimit = rig.storeDev.size;
  await t.rejects(rig.origin.write(chunkWrite(0, 3), 0, true), { code: 'ENOSPC' }, 'the origin write fails');
  t.equal(r.state, 'valid', 'the snapshot keeps its point in time');
  t.equal(await idAt(r, 0), 1);
  t.equal(await idAt(rig.origin, 0), 1, 'and the origin was not written');
  rig.storeDev.spaceLimit = Number.POSITIVE_INFINITY;
  await rig.origin.write(chunkWrite(0, 3), 0, true);
  t.equal(await idAt(rig.origin, 0), 3, 'once there is room the write goes through');
  t.equal(await idAt(r, 0), 1, 'and the snapshot still reads the old data');

  const sp = await sparseRig();
  const sparseRec = await sp.origin.quiesced(() =>
    sp.pool.createSnapshot({ name: 'p', capacityChunks: 10, policy: 'invalidate', readOnly: false }),
  );
  const p = new Snapshot(sp.origin, sp.pool, sparseRec);
  t.equal(p.usage().sparse, true);
  t.equal(p.usage().reservedBytes, 0);
  sp.storeDev.spaceLimit = sp.storeDev.size;
  await sp.origin.write(chunkWrite(0, 3), 0, true);
  t.equal(await idAt(sp.origin, 0), 3, 'the origin write goes ahead');
  t.equal(p.state, 'invalid', 'and the sparse snapshot is lost: the thin-pool trade-off');
  t.equal(p.usage().invalid?.reason, 'disk-full');
  await t.rejects(p.read(Buffer.alloc(CS), 0), { code: 'EIO', message: /invalid \(the file system was full\)/ });
});

t.test('a restart re-makes the reservation and gives back what a cut-short creation held', async (t) => {
  const rig = await makeRig(ORIGIN_SECTORS, CS);
  await snap(rig, 'a', 20);
  const need = (HEADER + 20) * CS;
  // A creation cut short after its space was allocated: the file is longer than needed.
  await rig.pool.claim(30, 'snapshot b');
  t.equal(rig.storeDev.size, (HEADER + 50) * CS);
  const reopen = async (img: Buffer, limit = Number.POSITIVE_INFINITY) => {
    const dev = new MemDevice(0, img);
    dev.spaceLimit = limit;
    const errors: string[] = [];
    const pool = await SnapshotPool.open(dev, originOf(rig.originDev).origin, {
      events: { onError: (e, what) => errors.push(`${what}: ${(e as Error).message}`) },
    });
    return { dev, pool, errors };
  };
  const long = await reopen(rig.storeDev.durableImage());
  t.equal(long.dev.size, need, 'the unclaimed tail is cut off');
  t.equal(long.pool.space().reservedBytes, need);

  // A store written before reservation existed: its file ends where its data does.
  const img = rig.storeDev.durableImage().subarray(0, (HEADER + 2) * CS);
  const old = await reopen(Buffer.from(img));
  t.equal(old.dev.size, need, 'an old store is reserved at its first open');
  t.same(old.errors, []);

  const full = await reopen(Buffer.from(img), (HEADER + 5) * CS);
  t.equal(full.pool.snapshotCount, 1, 'on a full disk it opens all the same');
  t.match(full.errors, [/^space reservation: reserved \d+ of the \d+ bytes/], 'and says it is short');
  t.ok(full.pool.space().reservedBytes < full.pool.space().neededBytes);
});

t.test('transient stores reserve too', async (t) => {
  const originDev = new MemDevice(64 * CS, Buffer.alloc(64 * CS, 1));
  const storeDev = new MemDevice(0);
  const { origin, pools } = originOf(originDev);
  const pool = SnapshotPool.transient(storeDev, origin, { chunkSize: CS, originSize: 64 * CS, originName: 'o' });
  pools.add(pool);
  const claim = await pool.claim(8, 'snapshot t');
  await origin.quiesced(() => pool.createSnapshot({ name: 't', capacityChunks: 8, policy: 'invalidate', readOnly: false }));
  claim.done();
  t.equal(storeDev.size, (HEADER + 8) * CS);
});

t.test('slots written before the reason existed read as reason unknown', async (t) => {
  const slot = {
    seq: 3,
    snapId: 7,
    inUse: true,
    state: 'invalid' as const,
    policy: 'invalidate' as const,
    readOnly: false,
    capacityChunks: 16,
    firstArea: 40,
    createdAt: 1,
    name: 's',
  };
  t.match(decodeSlot(encodeSlot(slot)), { invalidReason: 'unknown', usedAtInvalidation: 0 });
  t.match(decodeSlot(encodeSlot({ ...slot, invalidReason: 'disk-full', usedAtInvalidation: 9 })), {
    invalidReason: 'disk-full',
    usedAtInvalidation: 9,
  });
  t.equal(decodeSlot(encodeSlot({ ...slot, state: 'valid', invalidReason: 'full' }))?.invalidReason, undefined, 'a valid slot has none');
});
