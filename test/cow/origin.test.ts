// cow/origin.ts through its public face (Origin and Snapshot volumes, the devices under
// them): plain writes with no snapshot, copy before write, write-behind, a lost
// acknowledged write, discard, writeZeroes, and quiesced() around a creation.
import t from 'tap';
import { MemDevice } from '../../cow/mem-device.js';
import { Origin } from '../../cow/origin.js';
import { OriginPools } from '../../cow/origin-copy.js';
import { SECTOR, idAt, makeRig, makeRigWith, pattern, sectorId, snap, type Rig } from './helpers.js';

const CS = 8192;
const SPC = CS / SECTOR;
const CHUNKS = 64;

/** Holds every call of a device method until open(). */
function gate(dev: MemDevice, name: 'write' | 'sync'): { open(): void; waiting(): number } {
  const target = dev as unknown as Record<string, (...a: unknown[]) => Promise<void>>;
  const orig = target[name]!.bind(dev);
  let opened = false;
  const queue: Array<() => void> = [];
  target[name] = (...a: unknown[]) => (opened ? orig(...a) : new Promise<void>((r) => queue.push(r)).then(() => orig(...a)));
  return {
    open() {
      opened = true;
      for (const f of queue.splice(0)) f();
    },
    waiting: () => queue.length,
  };
}

const ticks = async (n = 20): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
};

/** Whether p settles within a few turns of the event loop. */
const settles = async (p: Promise<unknown>): Promise<boolean> => {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  await ticks();
  return done;
};

/** Device calls of both devices, in order: 'origin write', 'store sync', ... */
function trace(rig: Rig): string[] {
  const ev: string[] = [];
  rig.originDev.onIo = (k) => ev.push(`origin ${k}`);
  rig.storeDev.onIo = (k) => ev.push(`store ${k}`);
  return ev;
}

/** The id the volume file itself holds at a sector, bypassing the origin. */
const fileId = (rig: Rig, sector: number): Promise<number> => idAt(rig.originDev, sector);
const durableId = (rig: Rig, sector: number): number => sectorId(rig.originDev.durableImage(), sector * SECTOR, sector);

t.test('no snapshot: a write goes straight to the file, the store is untouched', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  const ev = trace(rig);
  await rig.origin.write(pattern(3 * SPC, SPC, 5), 3 * CS, false);
  t.equal(await fileId(rig, 3 * SPC), 5, 'in the file when acknowledged');
  t.equal(durableId(rig, 3 * SPC), 1, 'not durable before a flush');
  t.same(ev, ['origin write'], 'one pwrite, no store I/O');
  await rig.origin.flush();
  t.equal(durableId(rig, 3 * SPC), 5, 'durable after FLUSH');
  await rig.origin.write(pattern(4 * SPC, SPC, 6), 4 * CS, true);
  t.equal(durableId(rig, 4 * SPC), 6, 'a FUA write is durable when acknowledged');
  t.notOk(
    ev.some((e) => e.startsWith('store')),
    'never any store I/O',
  );
  t.equal(await idAt(rig.origin, 4 * SPC), 6);
  t.equal(await idAt(rig.origin, 5 * SPC), 1, 'untouched sectors read as before');

  const solo = new Origin('solo', new MemDevice(64 * SECTOR), new OriginPools());
  t.equal(solo.size, 64 * SECTOR);
  t.equal(solo.state, 'valid');
  await solo.write(pattern(2, 3, 9), 2 * SECTOR, false);
  t.equal(await idAt(solo, 3), 9, 'an origin with no store at all');
  t.equal(await idAt(solo, 5), 0);
});

t.test('with a snapshot, the first write of a chunk is copied and committed before it lands', async (t) => {
  const rig = await makeRigWith({ writeBehindBytes: 0 }, CHUNKS * SPC, CS);
  const s = await snap(rig, 'a', 1000);
  const ev = trace(rig);
  await rig.origin.write(pattern(3 * SPC, SPC, 7), 3 * CS, false);
  const landed = ev.indexOf('origin write');
  t.ok(landed > 0, 'the origin write happened');
  const before = ev.slice(0, landed);
  t.ok(before.includes('store write'), 'the copy was written to the store first');
  t.ok(before.lastIndexOf('store sync') > before.lastIndexOf('store write'), 'and synced after its last store write');
  t.equal(await fileId(rig, 3 * SPC), 7, 'held nowhere: in the file when acknowledged');
  t.equal(await idAt(rig.origin, 3 * SPC), 7);
  t.equal(await idAt(s, 3 * SPC), 1, 'the snapshot reads the old data');

  // A write of one sector copies its whole chunk.
  await rig.origin.write(pattern(5 * SPC + 3, 1, 8), (5 * SPC + 3) * SECTOR, false);
  const b = Buffer.alloc(CS);
  await s.read(b, 5 * CS);
  for (let i = 0; i < SPC; i++) if (sectorId(b, i * SECTOR, 5 * SPC + i) !== 1) t.fail(`snapshot sector ${5 * SPC + i}`);
  t.equal(await idAt(rig.origin, 5 * SPC + 3), 8);
  t.equal(await idAt(rig.origin, 5 * SPC + 4), 1, 'the rest of the chunk unchanged on the origin');

  // A rewrite of a copied chunk costs no store I/O.
  ev.length = 0;
  await rig.origin.write(pattern(3 * SPC, SPC, 9), 3 * CS, false);
  t.same(ev, ['origin write'], 'no copy the second time');
  t.equal(await idAt(s, 3 * SPC), 1);
  t.equal(await idAt(rig.origin, 3 * SPC), 9);
});

t.test('write-behind: acknowledged while held, visible to origin reads, lands after its copy', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  const s = await snap(rig, 'a', 1000);
  const syncs = gate(rig.storeDev, 'sync');
  t.ok(await settles(rig.origin.write(pattern(3 * SPC, SPC, 7), 3 * CS, false)), 'acknowledged while its copy waits');
  t.equal(await fileId(rig, 3 * SPC), 1, 'not in the file yet');
  t.equal(await idAt(rig.origin, 3 * SPC), 7, 'origin reads see it');
  t.equal(await idAt(s, 3 * SPC), 1, 'the snapshot does not');
  // A failed file read under a held write fails the origin read, and leaves the write held.
  const read = rig.originDev.read;
  rig.originDev.read = () => Promise.reject(new Error('read failed'));
  await t.rejects(rig.origin.read(Buffer.alloc(CS), 3 * CS), /read failed/, 'a read under a held write can fail');
  rig.originDev.read = read;
  t.equal(await idAt(rig.origin, 3 * SPC), 7, 'and the held write still reads');
  const fua = rig.origin.write(pattern(6 * SPC, SPC, 8), 6 * CS, true);
  t.notOk(await settles(fua), 'a FUA write waits for its landing');
  const landed = rig.origin.settle();
  t.notOk(await settles(landed), 'settle waits for the held writes');
  syncs.open();
  await landed;
  await fua;
  t.equal(await fileId(rig, 3 * SPC), 7, 'landed in the file');
  t.equal(durableId(rig, 6 * SPC), 8, 'the FUA write is durable');
  t.equal(await idAt(s, 3 * SPC), 1, 'the snapshot reads its copy');
  t.equal(await idAt(s, 6 * SPC), 1);
  await rig.origin.close();
  t.pass('closes with nothing held');
});

t.test('a held write that cannot land fails the next FLUSH, once', async (t) => {
  const lost: Array<[string, number, number]> = [];
  const rig = await makeRigWith({ onLost: (e, o, l) => lost.push([e.message, o, l]) }, CHUNKS * SPC, CS);
  await snap(rig, 'a', 1000);
  const syncs = gate(rig.storeDev, 'sync');
  t.ok(await settles(rig.origin.write(pattern(3 * SPC, SPC, 7), 3 * CS, false)), 'acknowledged');
  rig.originDev.failWrites = true;
  syncs.open();
  const err = await rig.origin.flush().then(
    () => undefined,
    (e: { code?: string; id?: string; message?: string }) => e,
  );
  t.equal(err?.code, 'EIO', 'FLUSH fails with EIO');
  t.equal(err?.id, 'COW_WRITE_LOST');
  t.match(err?.message, /acknowledged write could not be written/);
  t.equal(lost.length, 1, 'onLost told at once');
  t.same(lost[0]!.slice(1), [3 * CS, CS], 'with the range lost');
  rig.originDev.failWrites = false;
  await rig.origin.flush();
  t.pass('the failure is reported once');
});

t.test('discard without a snapshot punches the whole 4 KiB blocks inside the range', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  await rig.origin.discard(100, 3 * 4096, true);
  t.equal(await fileId(rig, 0), 1, 'the partial first block stays');
  t.equal(await fileId(rig, 7), 1);
  for (let sct = 8; sct < 24; sct++) if ((await fileId(rig, sct)) !== 0) t.fail(`sector ${sct} not punched`);
  t.equal(await fileId(rig, 24), 1, 'the partial last block stays');
  t.equal(await fileId(rig, 23), 0);
  await rig.origin.discard(4096 + 1, 4096, false);
  t.equal(await fileId(rig, 24), 1, 'a range holding no whole block punches nothing');

  const noPunch = await makeRig(CHUNKS * SPC, CS);
  (noPunch.originDev as { punchHoles?: unknown }).punchHoles = undefined;
  await noPunch.origin.discard(0, 4 * CS, false);
  t.equal(await fileId(noPunch, 0), 1, 'a device that cannot punch: discard does nothing');
});

t.test('discard with a snapshot: only whole chunks every snapshot has copied', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  const s = await snap(rig, 'a', 1000);
  await rig.origin.write(pattern(2 * SPC, SPC, 7), 2 * CS, false);
  await rig.origin.write(pattern(5 * SPC, SPC, 7), 5 * CS, false);
  await rig.origin.settle();
  await rig.origin.discard(2 * CS + SECTOR, CS, false);
  t.equal(await fileId(rig, 2 * SPC + 1), 7, 'part of a chunk: nothing discarded');
  await rig.origin.discard(CS, 5 * CS, true);
  for (const c of [1, 3, 4]) t.equal(await fileId(rig, c * SPC), 1, `chunk ${c}: the snapshot reads it from the origin, kept`);
  t.equal(await fileId(rig, 2 * SPC), 0, 'chunk 2: copied, discarded');
  t.equal(await fileId(rig, 3 * SPC - 1), 0, 'all of it');
  t.equal(await fileId(rig, 5 * SPC), 0, 'chunk 5: copied, discarded');
  for (const c of [1, 2, 3, 4, 5]) t.equal(await idAt(s, c * SPC), 1, `the snapshot's view of chunk ${c} is unchanged`);
  await rig.origin.discard(7 * CS, 2 * CS, false);
  t.equal(await fileId(rig, 7 * SPC), 1, 'uncopied chunks are kept');
});

t.test('discard waits for a held write of its range, so the write does not land after it', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  await snap(rig, 'a', 1000);
  // Chunk 4 is copied first, so a discard may punch it.
  await rig.origin.write(pattern(4 * SPC, SPC, 6), 4 * CS, false);
  await rig.origin.settle();
  const syncs = gate(rig.storeDev, 'sync');
  await rig.origin.write(pattern(5 * SPC, SPC, 9), 5 * CS, false); // held: chunk 5 needs a copy
  const d = rig.origin.discard(4 * CS, 2 * CS, false);
  t.notOk(await settles(d), 'the discard waits for the held write');
  syncs.open();
  await d;
  await rig.origin.settle();
  t.equal(await fileId(rig, 4 * SPC), 0, 'chunk 4 discarded');
  t.equal(await fileId(rig, 5 * SPC), 0, 'chunk 5: landed, copied, then discarded');
});

t.test('writeZeroes copies first, as a write does, and covers more than one zero buffer', async (t) => {
  const rig = await makeRigWith({ writeBehindBytes: 0 }, (4 * 1024 * 1024) / SECTOR, CS);
  const s = await snap(rig, 'a', 1000);
  const ev = trace(rig);
  await rig.origin.writeZeroes(2 * CS, 2 * CS, false);
  const landed = ev.indexOf('origin write');
  t.ok(landed > 0 && ev.slice(0, landed).includes('store sync'), 'the copy is committed before the zeros land');
  t.equal(await idAt(rig.origin, 2 * SPC), 0);
  t.equal(await idAt(rig.origin, 4 * SPC - 1), 0);
  t.equal(await idAt(rig.origin, 4 * SPC), 1, 'the range ends where asked');
  t.equal(await idAt(s, 2 * SPC), 1, 'the snapshot keeps the old data');
  t.equal(await idAt(s, 4 * SPC - 1), 1);

  // Longer than the shared 1 MiB zero buffer, FUA: durable zeros through the whole range.
  const from = 8 * CS;
  const len = (1 << 20) + 3 * CS;
  await rig.origin.writeZeroes(from, len, true);
  for (const sct of [from / SECTOR, (from + (1 << 20)) / SECTOR, (from + len) / SECTOR - 1]) {
    t.equal(durableId(rig, sct), 0, `sector ${sct} durable zero`);
    t.equal(await idAt(s, sct), 1, `sector ${sct} old in the snapshot`);
  }
  t.equal(durableId(rig, (from + len) / SECTOR), 1, 'and no further');
});

t.test('writeZeroes after a held write of its range: the zeros win', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  await snap(rig, 'a', 1000);
  // Data is slow to write and zeros are fast: only waiting keeps the zeros last.
  const write = rig.originDev.write.bind(rig.originDev);
  rig.originDev.write = async (b, o) => {
    if (b.some((x) => x !== 0)) await ticks(30);
    return write(b, o);
  };
  const syncs = gate(rig.storeDev, 'sync');
  await rig.origin.write(pattern(4 * SPC, SPC, 9), 4 * CS, false);
  const z = rig.origin.writeZeroes(4 * CS, CS, false);
  t.notOk(await settles(z), 'waits for the held write');
  syncs.open();
  await z;
  await rig.origin.settle();
  t.equal(await fileId(rig, 4 * SPC), 0, 'the file holds zeros, not the earlier write');
  t.equal(await idAt(rig.origin, 4 * SPC), 0);
});

t.test('quiesced: runs after writes in flight, and writes issued meanwhile wait for it', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  const order: string[] = [];
  const writes = gate(rig.originDev, 'write');
  const a = rig.origin.write(pattern(0, SPC, 2), 0, false);
  await ticks();
  let release!: () => void;
  let aSeenByFn = -1;
  const epoch0 = rig.origin.epoch;
  const q = rig.origin.quiesced(async () => {
    order.push('fn start');
    aSeenByFn = await fileId(rig, 0);
    await new Promise<void>((r) => (release = r));
    order.push('fn end');
    return 42;
  });
  await ticks();
  t.same(order, [], 'fn waits for the write in flight');
  writes.open();
  await a;
  await ticks();
  t.same(order, ['fn start']);
  t.equal(aSeenByFn, 2, 'the write in flight was in the file when fn ran');
  const b = rig.origin.write(pattern(SPC, SPC, 3), CS, false).then(() => order.push('B done'));
  t.notOk(await settles(b), 'a write issued during fn waits');
  t.equal(await fileId(rig, SPC), 1, 'and has not reached the file');
  release();
  t.equal(await q, 42, 'quiesced returns what fn returns');
  await b;
  t.same(order, ['fn start', 'fn end', 'B done']);
  t.equal(rig.origin.epoch, epoch0 + 1, 'each creation is a new epoch');

  // Two at once run one after the other.
  const runs: string[] = [];
  const one = rig.origin.quiesced(async () => {
    runs.push('1 start');
    await ticks(5);
    runs.push('1 end');
  });
  const two = rig.origin.quiesced(async () => {
    runs.push('2 start');
  });
  await Promise.all([one, two]);
  t.same(runs, ['1 start', '1 end', '2 start']);
  await t.rejects(
    rig.origin.quiesced(async () => Promise.reject(new Error('fn failed'))),
    /fn failed/,
    'fn failure passes through',
  );
  await rig.origin.write(pattern(2 * SPC, SPC, 4), 2 * CS, false);
  t.equal(await fileId(rig, 2 * SPC), 4, 'writes flow again after a failed fn');
});

t.test('a snapshot created while writes are in flight holds those, not later ones', async (t) => {
  const rig = await makeRig(CHUNKS * SPC, CS);
  const writes = gate(rig.originDev, 'write');
  const a = rig.origin.write(pattern(3 * SPC, SPC, 5), 3 * CS, false);
  await ticks();
  const created = snap(rig, 'mid', 1000);
  await ticks();
  const b = rig.origin.write(pattern(3 * SPC, SPC, 6), 3 * CS, false);
  await ticks();
  writes.open();
  const s = await created;
  await Promise.all([a, b]);
  await rig.origin.settle();
  t.equal(await idAt(s, 3 * SPC), 5, 'the snapshot has the write acknowledged before it');
  t.equal(await idAt(rig.origin, 3 * SPC), 6, 'the origin has the later write');
  t.equal(await fileId(rig, 3 * SPC), 6);
});
