// Merging a snapshot into its origin (cow/merge.ts) on the memory devices: the origin
// reads as the snapshot from the start, a write to a chunk not yet copied back copies it
// first, another snapshot keeps its own point in time, and power loss at many points
// during a merge with concurrent origin writes leaves, once reopened and resumed, the
// snapshot's content plus what the origin durably got since.
import t from 'tap';
import { SnapshotMerge } from '../../cow/merge.js';
import { Snapshot } from '../../cow/snapshot.js';
import type { SnapshotPool } from '../../cow/snapshot-pool.js';
import type { Origin } from '../../cow/origin.js';
import { SECTOR, VolumeModel, checkSectors, int, makeRig, pattern, reopenRig, rng32, sectorId, seeds, snap, type Rig } from './helpers.js';

t.setTimeout(600_000);

const CS = 4096;
const CHUNKS = 48;
const SECTORS = (CHUNKS * CS) / SECTOR;
const PER_CHUNK = CS / SECTOR;

/** Sector ids a volume reads now. */
async function idsOf(v: { read(b: Buffer, o: number): Promise<void> }): Promise<number[]> {
  const b = Buffer.alloc(CHUNKS * CS);
  await v.read(b, 0);
  return Array.from({ length: SECTORS }, (_v, s) => sectorId(b, s * SECTOR, s));
}

const writeChunk = (o: { write(b: Buffer, off: number, fua: boolean): Promise<void> }, c: number, id: number) =>
  o.write(pattern(c * PER_CHUNK, PER_CHUNK, id), c * CS, false);

/** Starts a merge as the manager does: quiesced, held writes landed, the state durable. */
async function startMerge(
  origin: Origin,
  pool: SnapshotPool,
  s: Snapshot,
  rate = 0,
  resume = false,
  batchBytes?: number,
): Promise<{ m: SnapshotMerge; done: Promise<void> }> {
  let m!: SnapshotMerge;
  let finished!: () => void;
  const done = new Promise<void>((r) => (finished = r));
  await origin.quiesced(async () => {
    await origin.settle();
    if (!resume) {
      s.record.state = 'merging';
      await pool.store.updateSnapshot(s.record);
      pool.refreshLive();
    }
    m = new SnapshotMerge(origin, pool, s.record, {
      rate,
      batchBytes,
      onDone: () => {
        origin.merge = undefined;
        void pool.remove(s.record).then(finished);
      },
      onError: () => {},
    });
    origin.merge = m;
    m.start();
  });
  return { m, done };
}

/** Origin id 1; S taken, origin chunks 0-23 rewritten (id 10+c), S's own writes to 30-33 (id 500+c); T taken, origin chunks 16-39 rewritten (id 100+c). */
async function scene(rig: Rig): Promise<{ s: Snapshot; tSnap: Snapshot; sIds: number[]; tIds: number[] }> {
  const s = await snap(rig, 's', 200);
  for (let c = 0; c < 24; c++) await writeChunk(rig.origin, c, 10 + c);
  for (let c = 30; c < 34; c++) await writeChunk(s, c, 500 + c);
  await rig.origin.flush();
  const tSnap = await snap(rig, 't', 200);
  for (let c = 16; c < 40; c++) await writeChunk(rig.origin, c, 100 + c);
  await rig.origin.flush();
  return { s, tSnap, sIds: await idsOf(s), tIds: await idsOf(tSnap) };
}

t.test('the origin reads as the snapshot at once, and holds it when the merge is done', async (t) => {
  const rig = await makeRig(SECTORS, CS);
  const { s, tSnap, sIds, tIds } = await scene(rig);
  t.equal(sIds[0], 1, 'the snapshot holds the origin before the rewrite');
  t.equal(sIds[30 * PER_CHUNK], 530, 'and its own writes');
  // A tiny rate: the background copy barely starts while the origin is checked.
  const { m, done } = await startMerge(rig.origin, rig.pool, s, 1);
  t.same(await idsOf(rig.origin), sIds, 'the origin reads as the snapshot before any chunk is back');
  t.same(await idsOf(tSnap), tIds, 'the other snapshot keeps its own point in time');
  await writeChunk(rig.origin, 20, 900);
  t.equal(m.mergedChunks >= 1, true, 'a write to a chunk not copied back copies it first');
  await rig.origin.write(pattern(21 * PER_CHUNK, 1, 901), 21 * CS, false);
  const now = await idsOf(rig.origin);
  t.equal(now[20 * PER_CHUNK], 900);
  t.equal(now[21 * PER_CHUNK], 901, 'a partial write lands on the merged chunk');
  t.equal(now[21 * PER_CHUNK + 1], sIds[21 * PER_CHUNK + 1], 'whose rest is the snapshot');
  t.same(await idsOf(tSnap), tIds, 'the other snapshot still reads its own');
  m.setRate(0);
  await done;
  const want = [...sIds];
  for (let i = 0; i < PER_CHUNK; i++) want[20 * PER_CHUNK + i] = 900;
  want[21 * PER_CHUNK] = 901;
  t.same(await idsOf(rig.origin), want, 'merged: the snapshot plus the writes since');
  t.equal(rig.pool.snapshotCount, 1, 'the merged snapshot is gone');
  t.same(await idsOf(tSnap), tIds, 'the other one is intact');
  t.equal(m.mergedChunks, m.totalChunks);
  await rig.origin.flush();
  const re = await reopenRig(rig.originDev.durableImage(), rig.storeDev.durableImage());
  t.same(await idsOf(re.origin), want, 'and all of it is durable');
  const reT = new Snapshot(re.origin, re.pool, re.pool.records.find((r) => r?.name === 't')!);
  t.same(await idsOf(reT), tIds);
});

t.test('a snapshot that never diverged merges to nothing', async (t) => {
  const rig = await makeRig(SECTORS, CS);
  const s = await snap(rig, 's', 20);
  const { m, done } = await startMerge(rig.origin, rig.pool, s);
  await done;
  t.equal(m.totalChunks, 0);
  t.equal(rig.pool.snapshotCount, 0);
});

interface Point {
  t: number;
  originImg: Buffer;
  storeImg: Buffer;
}

for (const seed of seeds(Number(process.env.COWBD_MERGE_CRASH_RUNS ?? 12))) {
  t.test(`power loss during a merge, seed=${seed}`, async (t) => {
    const r = rng32(seed);
    const rig = await makeRig(SECTORS, CS);
    const { s, tIds, sIds } = await scene(rig);
    rig.originDev.yieldTurns = seed % 3;
    rig.storeDev.yieldTurns = (seed >> 1) % 2;
    let clock = 0;
    const model = new VolumeModel('origin', sIds);
    const points: Point[] = [];
    const capture = () => {
      if (points.length < 40 && r() < 0.15)
        points.push({ t: clock++, originImg: rig.originDev.crashImage(r), storeImg: rig.storeDev.crashImage(r) });
    };
    // The batches are small here, so crashes land between and inside many of them. Crash
    // points start once the merge is acknowledged (before, the snapshot is simply valid).
    const { done } = await startMerge(rig.origin, rig.pool, s, 0, false, int(r, 1, 3) * CS);
    rig.originDev.onIo = capture;
    rig.storeDev.onIo = capture;
    const writers = Array.from({ length: 3 }, async (_v, w) => {
      for (let i = 0; i < 12; i++) {
        // Each writer its own chunks: the model orders writes to a sector by issue, which
        // two writes in flight at once to the same sector do not keep.
        const c = int(r, 0, CHUNKS / 3 - 1) * 3 + w;
        const first = c * PER_CHUNK + (r() < 0.5 ? 0 : int(r, 0, PER_CHUNK - 1));
        const count = Math.min(int(r, 1, PER_CHUNK), (c + 1) * PER_CHUNK - first);
        const id = 10_000 + w * 1000 + i;
        const fua = r() < 0.3;
        const recs = model.issueWrite(first, count, id, fua, clock++);
        await rig.origin.write(pattern(first, count, id), first * SECTOR, fua);
        const ack = clock++;
        for (const rec of recs) rec.ack = ack;
        if (r() < 0.3) {
          const f = { issue: clock++, ack: Infinity };
          model.flushes.push(f);
          await rig.origin.flush();
          f.ack = clock++;
        }
      }
    });
    await Promise.all([...writers, done]);
    points.push({ t: clock++, originImg: rig.originDev.crashImage(r), storeImg: rig.storeDev.crashImage(r) });
    const failures: string[] = [];
    for (const [i, p] of points.entries()) {
      const re = await reopenRig(p.originImg, p.storeImg).catch((e: Error) => e);
      if (re instanceof Error) {
        failures.push(`point ${i}: reopen failed: ${re.message}`);
        continue;
      }
      const recS = re.pool.records.find((x) => x?.name === 's');
      const recT = re.pool.records.find((x) => x?.name === 't');
      if (recT?.state !== 'valid') {
        failures.push(`point ${i}: t is ${recT?.state ?? 'gone'}`);
        continue;
      }
      const reT = new Snapshot(re.origin, re.pool, recT);
      let resumed: Promise<void> | undefined;
      if (recS) {
        if (recS.state !== 'merging') {
          failures.push(`point ${i}: s is ${recS.state}, not merging`);
          continue;
        }
        resumed = (await startMerge(re.origin, re.pool, new Snapshot(re.origin, re.pool, recS), 0, true)).done;
      }
      const b = Buffer.alloc(CHUNKS * CS);
      await re.origin.read(b, 0);
      const err = checkSectors(b, 0, (x) => model.crashAllowed(x, p.t));
      if (err) failures.push(`point ${i} (t=${p.t}, s ${recS ? 'merging' : 'merged'}): origin ${err}`);
      if (JSON.stringify(await idsOf(reT)) !== JSON.stringify(tIds)) failures.push(`point ${i}: t changed`);
      if (resumed) {
        await resumed;
        const after = Buffer.alloc(CHUNKS * CS);
        await re.origin.read(after, 0);
        if (!after.equals(b)) failures.push(`point ${i}: the resumed merge changed what the origin read`);
        if (JSON.stringify(await idsOf(reT)) !== JSON.stringify(tIds)) failures.push(`point ${i}: t changed by the resumed merge`);
        if (re.pool.records.some((x) => x?.name === 's')) failures.push(`point ${i}: s left after the resumed merge`);
      }
    }
    t.same(failures.slice(0, 5), [], `${points.length} crash points (reproduce: COWBD_SEED=${seed})`);
  });
}

t.test('an origin whose size is not a whole number of chunks keeps its size', async (t) => {
  // 10.5 chunks: the last chunk's copy reaches past the origin's end.
  const rig = await makeRig(21 * (CS / SECTOR / 2), CS);
  const size = rig.origin.size;
  const s = await snap(rig, 's', 40);
  await rig.origin.write(pattern(0, size / SECTOR, 7), 0, false);
  await rig.origin.flush();
  const { done } = await startMerge(rig.origin, rig.pool, s);
  await done;
  await rig.origin.flush();
  t.equal(rig.originDev.size, size, 'the volume file did not grow');
  const b = Buffer.alloc(size);
  await rig.origin.read(b, 0);
  t.equal(sectorId(b, size - SECTOR, size / SECTOR - 1), 1, "and its last sector is the snapshot's");
});
