// Origin writes held while their chunks are copied (cow/write-behind.ts): acknowledged
// before the copy is durable, never in the volume file before it, visible to origin
// reads and to snapshots created after them, waited for by FLUSH and FUA, bounded.
import t from 'tap';
import { MAX_HELD_WRITES, WriteBehind } from '../../cow/write-behind.js';
import { SECTOR, idAt, makeRig, pattern, sectorId, snap as snapOf, type Rig } from './helpers.js';

const CS = 4096;
const SPC = CS / SECTOR;

const snap = (rig: Rig, name: string) => snapOf(rig, name, 1000);

/** Holds every call of fn until open() (a gate on a device method). */
function gate<A extends unknown[]>(obj: { [k: string]: unknown }, name: string): { open(): void; waiting(): number } {
  const orig = (obj[name] as (...a: A) => Promise<void>).bind(obj);
  let opened = false;
  const queue: Array<() => void> = [];
  obj[name] = (...a: A) => (opened ? orig(...a) : new Promise<void>((r) => queue.push(r)).then(() => orig(...a)));
  return {
    open() {
      opened = true;
      for (const f of queue.splice(0)) f();
    },
    waiting: () => queue.length,
  };
}

const settled = async <T>(p: Promise<T>): Promise<boolean> => {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  for (let i = 0; i < 20; i++) await new Promise<void>((r) => setImmediate(r));
  return done;
};

t.test('acknowledged before its copy is durable, in the file only after', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  const s = await snap(rig, 'a');
  const syncs = gate(rig.storeDev as unknown as { [k: string]: unknown }, 'sync');
  t.ok(await settled(rig.origin.write(pattern(3 * SPC, SPC, 7), 3 * CS, false)), 'acknowledged while the copy waits for its sync');
  t.equal(rig.origin.behind.heldBytes, CS);
  t.equal(await idAt(rig.origin, 3 * SPC), 7, 'origin reads see the held write');
  const raw = Buffer.alloc(SECTOR);
  await rig.originDev.read(raw, 3 * CS);
  t.equal(sectorId(raw, 0, 3 * SPC), 1, 'the volume file still holds the old data');
  t.equal(await idAt(s, 3 * SPC), 1, 'the snapshot reads the old data');
  const flushed = rig.origin.flush();
  t.notOk(await settled(flushed), 'FLUSH waits for the held write');
  syncs.open();
  await flushed;
  t.equal(rig.origin.behind.heldBytes, 0);
  t.equal(sectorId(rig.originDev.durableImage(), 3 * CS, 3 * SPC), 7, 'durable in the file after FLUSH');
  t.equal(await idAt(s, 3 * SPC), 1, 'the snapshot still reads the old data, from its copy');
  t.equal(rig.pool.stats.copies, 1);
});

t.test('FUA writes and writes over the bound wait for their own landing', async (t) => {
  const rig = await makeRig(64 * SPC, CS, 1, { writeBehindBytes: 2 * CS });
  await snap(rig, 'a');
  const syncs = gate(rig.storeDev as unknown as { [k: string]: unknown }, 'sync');
  t.notOk(await settled(rig.origin.write(pattern(1 * SPC, SPC, 5), 1 * CS, true)), 'FUA: not before the copy and the write are durable');
  t.ok(await settled(rig.origin.write(pattern(2 * SPC, SPC, 5), 2 * CS, false)), 'first held write');
  t.ok(await settled(rig.origin.write(pattern(4 * SPC, SPC, 5), 4 * CS, false)), 'second held write fills the bound');
  const over = rig.origin.write(pattern(6 * SPC, SPC, 5), 6 * CS, false);
  t.notOk(await settled(over), 'a third waits: the bound is 2 chunks');
  t.equal(rig.origin.behind.heldBytes, 2 * CS, 'never more than the bound held');
  syncs.open();
  await over;
  await rig.origin.flush();
  for (const c of [1, 2, 4, 6]) t.equal(sectorId(rig.originDev.durableImage(), c * CS, c * SPC), 5);
});

t.test('a bound of 0 makes every write wait for its copies, as before write-behind', async (t) => {
  const rig = await makeRig(64 * SPC, CS, 1, { writeBehindBytes: 0 });
  await snap(rig, 'a');
  await rig.origin.write(pattern(0, SPC, 9), 0, false);
  t.equal(rig.pool.stats.copies, 1, 'copied before the write returned');
  t.equal(rig.origin.behind.count, 0);
});

t.test('a snapshot created while writes are held sees them; later writes copy them for it', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  const a = await snap(rig, 'a');
  const originWrites = gate(rig.originDev as unknown as { [k: string]: unknown }, 'write');
  // Held: copied for a (committed), but not yet in the volume file.
  await rig.origin.write(pattern(5 * SPC, 2, 11), 5 * CS, false);
  await rig.origin.write(pattern(5 * SPC + 4, 2, 12), 5 * CS + 4 * SECTOR, false);
  for (let i = 0; i < 20 && originWrites.waiting() < 2; i++) await new Promise<void>((r) => setImmediate(r));
  t.equal(originWrites.waiting(), 2, 'both held writes wait for the file');
  const b = await snap(rig, 'b');
  t.equal(await idAt(b, 5 * SPC), 11, 'b sees the first held write');
  t.equal(await idAt(b, 5 * SPC + 4), 12, 'and the second');
  t.equal(await idAt(b, 5 * SPC + 2), 1, 'and the file between them');
  t.equal(await idAt(a, 5 * SPC), 1, 'a does not');
  // A write to the same chunk after b: b needs a copy holding the held writes.
  const later = rig.origin.write(pattern(5 * SPC, SPC, 13), 5 * CS, false);
  t.notOk(await settled(later), 'waits until the older held writes are in the file');
  originWrites.open();
  await later;
  await rig.origin.flush();
  t.equal(await idAt(rig.origin, 5 * SPC), 13);
  t.equal(await idAt(b, 5 * SPC), 11, 'b kept its view of the chunk');
  t.equal(await idAt(b, 5 * SPC + 4), 12);
  t.equal(await idAt(a, 5 * SPC + 4), 1, 'a kept its own');
});

t.test('zeroing and discarding after held writes keep their order', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  await snap(rig, 'a');
  const syncs = gate(rig.storeDev as unknown as { [k: string]: unknown }, 'sync');
  await rig.origin.write(pattern(8 * SPC, SPC, 21), 8 * CS, false);
  const z = rig.origin.writeZeroes(8 * CS, CS, false);
  t.notOk(await settled(z), 'zeroing waits for the held write it follows');
  syncs.open();
  await z;
  await rig.origin.flush();
  const b = Buffer.alloc(CS);
  await rig.origin.read(b, 8 * CS);
  t.ok(b.equals(Buffer.alloc(CS)), 'zeros, not the earlier write');
});

t.test(
  "a write handed over with keep is held in the caller's buffer and given back once, after landing and the reads it pinned",
  async (t) => {
    const rig = await makeRig(64 * SPC, CS);
    await snap(rig, 'a');
    let gaveBack = 0;
    let keeps = 0;
    const keep = () => {
      keeps++;
      return () => gaveBack++;
    };
    const syncs = gate(rig.storeDev as unknown as { [k: string]: unknown }, 'sync');
    const buf = pattern(3 * SPC, SPC, 7);
    t.ok(await settled(rig.origin.write(buf, 3 * CS, false, keep)), 'acknowledged while the copy waits');
    t.equal(keeps, 1, 'the buffer was taken over');
    const [h] = rig.origin.behind.overlapping(3 * CS, 4 * CS);
    t.equal(h!.data, buf, 'held without a copy');
    t.equal(rig.origin.behind.heldBytes, CS, 'and counted against the bound like a copy');
    // A read that pins the held write across its file read keeps the buffer out.
    const fileReads = gate(rig.originDev as unknown as { [k: string]: unknown }, 'read');
    const read = idAt(rig.origin, 3 * SPC);
    syncs.open();
    await rig.origin.settle();
    t.equal(gaveBack, 0, 'landed, but a read still copies from it');
    fileReads.open();
    t.equal(await read, 7, 'the read saw the held write');
    t.equal(gaveBack, 1, 'given back once the read is done');
    await rig.origin.flush();
    t.equal(sectorId(rig.originDev.durableImage(), 3 * CS, 3 * SPC), 7, 'durable after FLUSH');
    t.equal(gaveBack, 1, 'exactly once');

    const fua = pattern(9 * SPC, SPC, 8);
    await rig.origin.write(fua, 9 * CS, true, keep);
    t.equal(keeps, 1, 'a FUA write waits for its landing: the caller keeps its buffer');
  },
);

t.test('the table is bounded by the number of writes too, so its backlog is bounded in time', async (t) => {
  const wb = new WriteBehind(1 << 30, 2);
  t.equal(new WriteBehind(1 << 30).maxWrites, MAX_HELD_WRITES);
  t.ok(wb.hasRoom(CS));
  const a = wb.hold(Buffer.alloc(CS, 1), 0, 0, true);
  wb.hold(Buffer.alloc(CS, 2), CS, 0, true);
  t.notOk(wb.hasRoom(CS), 'two held: no room, whatever the bytes');
  t.equal(wb.heldBytes, 2 * CS);
  wb.release(a);
  t.ok(wb.hasRoom(CS), 'room again once one has landed');
});
