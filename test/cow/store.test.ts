// Unit tests of the exception store: format, accounting, invalidation, overflow,
// extend, remove and restart, shared copies.
import t from 'tap';

t.setTimeout(600_000);
import { ChunkMap, ABSENT } from '../../cow/chunk-map.js';
import { MemDevice } from '../../cow/mem-device.js';
import { SnapshotPool } from '../../cow/snapshot-pool.js';
import { Snapshot } from '../../cow/snapshot.js';
import {
  decodeAreaHeader,
  decodePoolHeader,
  decodeSlot,
  encodeAreaHeader,
  encodePoolHeader,
  encodeSlot,
  entriesPerArea,
  validChunkSize,
  HEADER_BYTES,
  SLOT_BYTES,
} from '../../cow/format.js';
import { SECTOR, idAt, makeRig, originOf, pattern, reopenRig, snap, type Rig } from './helpers.js';

async function reopen(rig: Rig): Promise<{ rig: Rig; snaps: Map<string, Snapshot> }> {
  await rig.pool.idle();
  const re = await reopenRig(rig.originDev.durableImage(), rig.storeDev.durableImage());
  const snaps = new Map<string, Snapshot>();
  for (const r of re.pool.records) if (r) snaps.set(r.name, new Snapshot(re.origin, re.pool, r));
  return { rig: re, snaps };
}

const codeOf = (p: Promise<unknown>): Promise<string | undefined> =>
  p.then(
    () => undefined,
    (e: { code?: string }) => e.code,
  );

t.test('format round trips and rejects damage', async (t) => {
  t.ok(validChunkSize(4096) && validChunkSize(1 << 20) && validChunkSize(65536));
  t.notOk(validChunkSize(2048) || validChunkSize(3 << 12) || validChunkSize(2 << 20));
  const h = encodePoolHeader({ chunkSize: 65536, poolId: 7, originSize: 1 << 30, originName: 'vol' });
  t.same(decodePoolHeader(h), { chunkSize: 65536, poolId: 7, originSize: 1 << 30, originName: 'vol' });
  const bad = Buffer.from(h);
  bad[40] = bad[40]! ^ 1;
  t.equal(decodePoolHeader(bad), 'bad header checksum');
  const slot = {
    seq: 3,
    snapId: 9,
    inUse: true,
    state: 'overflow' as const,
    policy: 'overflow' as const,
    readOnly: true,
    capacityChunks: 256,
    firstArea: 5,
    createdAt: 1700000000000,
    name: 'snap-1',
  };
  t.same(decodeSlot(encodeSlot(slot)), slot);
  const torn = encodeSlot(slot);
  torn.fill(0, 256);
  t.equal(decodeSlot(torn), undefined, 'a torn slot copy does not parse');
  const a = Buffer.alloc(32);
  encodeAreaHeader({ snapId: 1, seq: 2, nonce: 3, next: 4, poolId: 5 }, a);
  t.same(decodeAreaHeader(a), { snapId: 1, seq: 2, nonce: 3, next: 4, poolId: 5 });
  t.equal(entriesPerArea(65536), 4094);
  t.equal(HEADER_BYTES % SLOT_BYTES, 0);
});

t.test('chunk map: sets, deletes, grows, stays under 16 bytes per entry', async (t) => {
  const m = new ChunkMap();
  const ref = new Map<number, number>();
  let x = 12345;
  let delMismatch = 0;
  for (let i = 0; i < 200000; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const k = x % 300000;
    if (i % 7 === 0) {
      if (m.delete(k) !== ref.delete(k)) delMismatch++;
    } else {
      m.set(k, i);
      ref.set(k, i);
    }
  }
  t.equal(delMismatch, 0);
  t.equal(m.size, ref.size);
  let bad = 0;
  for (const [k, v] of ref) if (m.get(k) !== v) bad++;
  for (let k = 300000; k < 300100; k++) if (m.get(k) !== ABSENT) bad++;
  t.equal(bad, 0, 'every key maps as in a Map');
  const big = new ChunkMap();
  let worst = 0;
  for (let i = 0; i < 1_000_000; i++) {
    big.set(i, i);
    if (i > 1000) worst = Math.max(worst, big.bytes / big.size);
  }
  t.ok(worst <= 16, `worst ${worst.toFixed(2)} bytes per exception while growing to 1M`);
});

t.test('first origin write copies once; snapshot keeps old data; restart keeps it', async (t) => {
  const rig = await makeRig(256, 4096);
  const s1 = await snap(rig, 'a', 100);
  const s2 = await snap(rig, 'b', 100);
  await rig.origin.write(pattern(0, 16, 50), 0, false);
  await rig.origin.settle();
  t.equal(rig.pool.stats.copies, 2, 'two chunks copied once, shared by both snapshots');
  t.equal(s1.usage().usedChunks, 2 + 2, 'each snapshot is charged its 2 chunks plus 2 metadata');
  t.equal(s2.usage().usedChunks, 4);
  t.equal(await idAt(rig.origin, 3), 50);
  t.equal(await idAt(s1, 3), 1);
  t.equal(await idAt(s2, 15), 1);
  await rig.origin.write(pattern(0, 16, 51), 0, false);
  t.equal(rig.pool.stats.copies, 2, 'no second copy');
  // A snapshot write to a shared chunk diverges it: the other snapshot is untouched.
  await s1.write(pattern(2, 1, 60), 2 * SECTOR, false);
  t.equal(await idAt(s1, 2), 60);
  t.equal(await idAt(s2, 2), 1);
  t.equal(await idAt(s1, 3), 1, 'rest of the diverged chunk kept');
  t.equal(s1.usage().usedChunks, 4, 'divergence does not change the charge');
  const { snaps } = await reopen(rig);
  t.equal(await idAt(snaps.get('a')!, 2), 60);
  t.equal(await idAt(snaps.get('b')!, 2), 1);
  t.equal(await idAt(snaps.get('a')!, 3), 1);
  t.equal(snaps.get('a')!.usage().usedChunks, 4);
});

t.test('full-chunk snapshot write does not read the origin', async (t) => {
  const rig = await makeRig(64, 4096);
  const s = await snap(rig, 'a', 100);
  let reads = 0;
  const orig = rig.originDev.read.bind(rig.originDev);
  rig.originDev.read = (b, o) => {
    reads++;
    return orig(b, o);
  };
  await s.write(pattern(8, 8, 70), 8 * SECTOR, false);
  t.equal(reads, 0);
  await s.write(pattern(17, 1, 71), 17 * SECTOR, false);
  t.equal(reads, 1, 'a partial write copies the chunk first');
  t.equal(await idAt(s, 16), 1);
  t.equal(await idAt(s, 17), 71);
});

t.test('invalidate policy: origin write that does not fit invalidates, persists', async (t) => {
  const rig = await makeRig(256, 4096);
  const invalidated: string[] = [];
  (rig.pool as unknown as { events: { onInvalidated: (r: { name: string }) => void } }).events.onInvalidated = (r) =>
    invalidated.push(r.name);
  const s = await snap(rig, 'small', 4); // 2 metadata + 2 data chunks
  await rig.origin.write(pattern(0, 16, 80), 0, false);
  t.equal(s.state, 'valid');
  await rig.origin.write(pattern(16, 8, 81), 16 * SECTOR, false);
  t.equal(s.state, 'invalid', 'third chunk does not fit');
  t.same(invalidated, ['small']);
  t.equal(await idAt(rig.origin, 16), 81, 'the origin write proceeded');
  t.equal(await codeOf(s.read(Buffer.alloc(SECTOR), 0)), 'EIO');
  t.equal(await codeOf(s.write(Buffer.alloc(SECTOR), 0, false)), 'EIO');
  const { snaps } = await reopen(rig);
  t.equal(snaps.get('small')!.state, 'invalid', 'stays invalid across restart');
  t.equal(await codeOf(snaps.get('small')!.read(Buffer.alloc(SECTOR), 0)), 'EIO');
});

t.test('overflow policy: own writes get ENOSPC, reads go on, extend recovers', async (t) => {
  const rig = await makeRig(256, 4096);
  const s = await snap(rig, 'po', 4, 'overflow');
  await s.write(pattern(0, 8, 90), 0, false);
  await s.write(pattern(8, 8, 91), 8 * SECTOR, false);
  t.equal(await codeOf(s.write(pattern(16, 8, 92), 16 * SECTOR, false)), 'ENOSPC');
  t.equal(s.state, 'overflow');
  t.equal(await codeOf(s.write(pattern(0, 1, 93), 0, false)), 'ENOSPC', 'all own writes refused once overflowed');
  t.equal(await idAt(s, 0), 90, 'reads still served');
  t.equal(await idAt(s, 20), 1);
  {
    const { snaps } = await reopen(rig);
    t.equal(snaps.get('po')!.state, 'overflow', 'overflow persists');
  }
  await rig.pool.extend(s.record, 8);
  t.equal(s.state, 'valid', 'extend clears overflow');
  await s.write(pattern(16, 8, 92), 16 * SECTOR, false);
  t.equal(await idAt(s, 16), 92);
  t.equal(s.usage().capacityChunks, 8);
  // Origin writes that do not fit invalidate even an overflow-policy snapshot.
  await rig.origin.write(pattern(32, 64, 94), 32 * SECTOR, false);
  await rig.origin.settle();
  t.equal(s.state, 'invalid');
  const { snaps } = await reopen(rig);
  t.equal(snaps.get('po')!.state, 'invalid');
  t.equal(snaps.get('po')!.usage().capacityChunks, 8, 'extended size persists');
});

t.test('read-only snapshots refuse writes with EPERM', async (t) => {
  const rig = await makeRig(64, 4096);
  const s = await snap(rig, 'ro', 10, 'invalidate', true);
  t.equal(await codeOf(s.write(Buffer.alloc(SECTOR), 0, false)), 'EPERM');
  t.equal(await codeOf(s.discard(0, 4096, false)), 'EPERM');
});

t.test('discard and zeroes: snapshot-only, zero exceptions cost no data chunk', async (t) => {
  const rig = await makeRig(256, 4096);
  const a = await snap(rig, 'a', 100);
  const b = await snap(rig, 'b', 100);
  await a.write(pattern(0, 8, 100), 0, false);
  t.equal(a.usage().usedChunks, 3);
  await a.discard(0, 8192, false);
  t.equal(await idAt(a, 0), 0);
  t.equal(await idAt(a, 9), 0);
  t.equal(a.usage().usedChunks, 2, 'zeroed chunks hold no data');
  t.equal(await idAt(b, 0), 1, 'other snapshot untouched');
  t.equal(await idAt(rig.origin, 0), 1, 'origin untouched');
  await a.writeZeroes(100, 300, false); // partial chunk: a real write
  t.equal(await idAt(b, 0), 1);
  // Origin discard skips chunks a snapshot still reads from the origin...
  await rig.origin.discard(0, 256 * SECTOR, false);
  t.equal(await idAt(a, 40), 1);
  t.equal(await idAt(b, 40), 1);
  t.equal(await idAt(rig.origin, 40), 1, 'chunk 5 is needed: not discarded');
  // ...and origin write-zeroes copies first.
  await rig.origin.writeZeroes(40 * SECTOR, 8 * SECTOR, false);
  t.equal(await idAt(rig.origin, 40), 0);
  t.equal(await idAt(b, 40), 1);
  // Chunk 5 now copied for both: an origin discard may drop it.
  await rig.origin.write(pattern(40, 8, 101), 40 * SECTOR, false);
  await rig.origin.discard(40 * SECTOR, 8 * SECTOR, false);
  t.equal(await idAt(rig.origin, 40), 0, 'discarded');
  t.equal(await idAt(b, 40), 1);
  const { snaps } = await reopen(rig);
  t.equal(await idAt(snaps.get('a')!, 0), 0);
  t.equal(snaps.get('a')!.usage().usedChunks, a.usage().usedChunks);
});

t.test('remove frees space at once and leaves the others alone', async (t) => {
  const rig = await makeRig(512, 4096);
  const a = await snap(rig, 'a', 300);
  await rig.origin.write(pattern(0, 256, 110), 0, false); // 32 chunks for a
  const b = await snap(rig, 'b', 300);
  await rig.origin.write(pattern(256, 256, 111), 256 * SECTOR, false); // 32 more, shared
  await b.write(pattern(0, 8, 112), 0, false);
  const before = rig.pool.fileChunks;
  await rig.pool.remove(a.record);
  t.equal(await codeOf(a.read(Buffer.alloc(SECTOR), 0)), 'EIO');
  t.equal(await idAt(b, 300), 1, 'b still reads its copy of the shared chunks');
  t.equal(await idAt(b, 0), 112);
  t.equal(await idAt(b, 100), 110);
  // a's 32 private chunks and its metadata are free: the next copies reuse them, so the file does not grow.
  const c = await snap(rig, 'c', 300);
  await rig.origin.write(pattern(0, 256, 113), 0, false);
  t.equal(rig.pool.fileChunks, before, 'freed chunks reused');
  t.equal(await idAt(c, 10), 110);
  await rig.pool.remove(b.record);
  await rig.pool.remove(c.record);
  t.ok(rig.pool.fileChunks < before, `file truncated (${rig.pool.fileChunks} < ${before} chunks)`);
  const { rig: re } = await reopen(rig);
  t.equal(re.pool.snapshotCount, 0);
});

t.test('creation is atomic: acknowledged writes in, later ones out', async (t) => {
  const rig = await makeRig(256, 4096);
  rig.originDev.yieldTurns = 2;
  const early = rig.origin.write(pattern(0, 8, 120), 0, false);
  // The quiesce itself, as the manager runs it once the space is reserved.
  const creating = rig.origin.quiesced(() =>
    rig.pool.createSnapshot({ name: 'a', capacityChunks: 100, policy: 'invalidate', readOnly: false }),
  );
  const late = rig.origin.write(pattern(0, 8, 121), 0, false); // issued during creation
  await early;
  const s = new Snapshot(rig.origin, rig.pool, await creating);
  await late;
  t.equal(await idAt(s, 0), 120, 'write acknowledged before creation is in the snapshot');
  t.equal(await idAt(rig.origin, 0), 121);
});

t.test('transient store: works, nothing persisted', async (t) => {
  const originDev = new MemDevice(64 * SECTOR, Buffer.alloc(64 * SECTOR, 1));
  const storeDev = new MemDevice(0);
  const { origin, pools } = originOf(originDev);
  const store = SnapshotPool.transient(storeDev, origin, { chunkSize: 4096, originSize: 64 * SECTOR, originName: 'o' });
  pools.add(store);
  const rec = await origin.quiesced(() => store.createSnapshot({ name: 't', capacityChunks: 4, policy: 'invalidate', readOnly: false }));
  const s = new Snapshot(origin, store, rec);
  t.equal(s.usage().usedChunks, 0, 'no metadata chunks');
  await origin.write(Buffer.alloc(4096, 2), 0, false);
  const b = Buffer.alloc(4096);
  await s.read(b, 0);
  t.equal(b[0], 1);
  t.equal(storeDev.unsyncedWrites, 1, 'one copy, never synced');
  await t.rejects(SnapshotPool.open(new MemDevice(0, storeDev.durableImage()), origin), 'nothing to reopen');
});

t.test('chunk sizes from 4 KiB to 1 MiB', async (t) => {
  for (const cs of [4096, 65536, 1 << 20]) {
    const rig = await makeRig((2 << 20) / SECTOR, cs);
    const s = await snap(rig, 'a', 20);
    await rig.origin.write(pattern(3, 2, 130), 3 * SECTOR, true);
    t.equal(await idAt(s, 3), 1, `chunk ${cs}`);
    const { snaps } = await reopen(rig);
    t.equal(await idAt(snaps.get('a')!, 4), 1);
    t.equal(snaps.get('a')!.usage().usedChunks, 3);
  }
  await t.rejects(makeRig(64, 2048), { code: 'EINVAL' });
});

t.test('a snapshot write that fails in one chunk returns only once its other chunks have settled', async (t) => {
  const CS = 4096;
  const rig = await makeRig(64, CS);
  // Two chunks of metadata (area and next) plus one data chunk: the second chunk does not fit.
  const s = await snap(rig, 's', 3, 'overflow');
  rig.storeDev.yieldTurns = 4;
  await t.rejects(s.write(Buffer.alloc(2 * CS, 7), 0, false), { code: 'ENOSPC' });
  t.not(s.record.map.get(0), ABSENT, 'the chunk that fit is committed before the error is reported');
  await rig.origin.quiesced(async () => {});
  const removal = rig.pool.remove(s.record);
  await removal;
  t.equal(rig.pool.snapshotCount, 0, 'the removal is not overtaken by a straggling commit');
  const re = await reopenRig(rig.originDev.durableImage(), rig.storeDev.durableImage());
  t.equal(re.pool.snapshotCount, 0, 'and the store reopens without it');
});

t.test('failures nobody waits for reach the pool events: a hole punch, an overflow mark', async (t) => {
  const CS = 4096;
  const originDev = new MemDevice(64 * CS, Buffer.alloc(64 * CS, 5));
  const storeDev = new MemDevice(0);
  const { origin, pools } = originOf(originDev);
  const errors: string[] = [];
  const events = { onError: (e: unknown, what: string) => errors.push(`${what}: ${(e as Error).message}`) };
  // Only a sparse store punches holes: a reserved one keeps its space.
  const pool = await SnapshotPool.create(storeDev, origin, { chunkSize: CS, originSize: 64 * CS, originName: 'o', events, sparse: true });
  pools.add(pool);
  const rec = await origin.quiesced(() => pool.createSnapshot({ name: 'a', capacityChunks: 8, policy: 'invalidate', readOnly: false }));
  await origin.write(Buffer.alloc(CS, 6), 0, false);
  await origin.flush();
  storeDev.punchHoles = () => Promise.reject(new Error('punch refused'));
  await pool.remove(rec);
  t.same(errors, ['hole punch: punch refused'], 'the failed punch is reported');
  t.equal(pool.snapshotCount, 0, 'the removal itself stands');

  const full = await origin.quiesced(() => pool.createSnapshot({ name: 'b', capacityChunks: 3, policy: 'overflow', readOnly: false }));
  const s = new Snapshot(origin, pool, full);
  await s.write(Buffer.alloc(CS, 7), 0, false);
  storeDev.failWrites = true;
  await t.rejects(s.write(Buffer.alloc(CS, 7), CS, false), { code: 'ENOSPC' });
  await pool.idle().catch(() => {});
  t.equal(s.state, 'overflow');
  t.match(errors[1], /^overflow mark: /, 'the failed overflow mark is reported');
});
