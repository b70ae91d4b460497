// Power loss and the change tracker. A random concurrent workload of origin writes, trims,
// zeroes and snapshot creations (each a checkpoint) runs over memory devices; at random
// device I/Os crash images of the origin and the tracker are taken (unsynced writes lost,
// applied or torn per sector). Each tracker image is reopened and, for every checkpoint k
// it still keeps, every chunk where the crashed origin differs from the origin as it was
// at checkpoint k must be in changedBetween(k, generation + 1); allocatedBefore must cover
// every chunk that is not zero. The origin is flushed before each creation, so its content
// at a checkpoint is durable and exactly known.
// COWBD_TRACKER_CRASH_RUNS scales the number of workloads (default 8).
import t from 'tap';
import { crc32 } from 'node:zlib';
import { ChangeTracker } from '../../cow/change-tracker.js';
import { MemDevice } from '../../cow/mem-device.js';
import { GENERATIONS } from '../../cow/tracker-format.js';
import { int, makeRig, pattern, rng32, seeds, SECTOR } from './helpers.js';

t.setTimeout(600_000);

const RUNS = Number(process.env.COWBD_TRACKER_CRASH_RUNS ?? 8);
const CHUNK = 65536;
const CHUNKS = 128;
const SIZE = CHUNKS * CHUNK;
let totalPoints = 0;

/** A crash image: the origin as one crc32 per chunk (and which chunks are not zero), the tracker whole. */
interface Point {
  crcs: Uint32Array;
  nonZero: Uint8Array;
  tracker: Buffer;
}

function chunkCrcs(img: Buffer): Uint32Array {
  const out = new Uint32Array(CHUNKS);
  for (let c = 0; c < CHUNKS; c++) out[c] = crc32(img.subarray(c * CHUNK, (c + 1) * CHUNK));
  return out;
}

const hasBit = (m: Uint8Array, i: number): boolean => (m[i >>> 3]! & (1 << (i & 7))) !== 0;

async function check(p: Point, contentAt: Map<number, Uint32Array>): Promise<string | undefined> {
  const tr = await ChangeTracker.open(new MemDevice(0, p.tracker), {
    volumeSize: SIZE,
    volumeState: async () => ({ blocks: 1, mtimeMs: 0, size: SIZE }),
  });
  if (!tr.trusted) return 'tracker lost its trust';
  const g = tr.generation;
  const all = await tr.allocatedBefore(g + 1);
  if (!all) return 'allocatedBefore unknown';
  for (let c = 0; c < CHUNKS; c++) {
    if (p.nonZero[c] && !hasBit(all, c)) return `chunk ${c} holds data but is not in allocatedBefore(${g + 1})`;
  }
  for (let k = tr.oldest; k <= g; k++) {
    const then = contentAt.get(k);
    if (!then) continue;
    const changed = await tr.changedBetween(k, g + 1);
    if (!changed) return `changedBetween(${k}) unknown, oldest ${tr.oldest}`;
    for (let c = 0; c < CHUNKS; c++) {
      if (p.crcs[c] !== then[c] && !hasBit(changed, c))
        return `chunk ${c} changed since checkpoint ${k} but is not in changedBetween(${k}, ${g + 1})`;
    }
  }
  return undefined;
}

for (const seed of seeds(RUNS)) {
  t.test(`tracker crash seed=${seed}`, async (t) => {
    const r = rng32(seed);
    const crashR = rng32(seed ^ 0x5eed);
    const trackerDev = new MemDevice(0);
    trackerDev.yieldTurns = seed % 3;
    const tracker = await ChangeTracker.open(trackerDev, {
      volumeSize: SIZE,
      volumeState: async () => ({ blocks: 0, mtimeMs: 0, size: SIZE }),
    });
    const rig = await makeRig(SIZE / SECTOR, 8192, 0, { marks: tracker });
    rig.originDev.yieldTurns = (seed >> 1) % 3;
    // Generation 0 starts on an all-zero origin.
    const contentAt = new Map<number, Uint32Array>([[0, chunkCrcs(Buffer.alloc(SIZE))]]);
    const points: Point[] = [];
    const capture = (): void => {
      const img = rig.originDev.crashImage(crashR);
      const nonZero = new Uint8Array(CHUNKS);
      for (let c = 0; c < CHUNKS; c++) nonZero[c] = img.subarray(c * CHUNK, (c + 1) * CHUNK).some((x) => x !== 0) ? 1 : 0;
      points.push({ crcs: chunkCrcs(img), nonZero, tracker: trackerDev.crashImage(crashR) });
    };
    // Spread over the whole run (about 1500 device I/Os), so crashes also hit slot reuse.
    const hook = (): void => {
      if (points.length < 40 && crashR() < 0.03) capture();
    };
    // And at every tracker I/O of the first checkpoints that reuse a slot: base, header, clear.
    let inCheckpoint = false;
    let reusePoints = 0;
    rig.originDev.onIo = hook;
    rig.storeDev.onIo = hook;
    trackerDev.onIo = () => {
      if (inCheckpoint && tracker.generation >= GENERATIONS - 1 && reusePoints < 12) {
        reusePoints++;
        capture();
      } else hook();
    };
    const inflight = new Set<Promise<void>>();
    const live: string[] = [];
    const busy: Array<[number, number]> = [];
    let next = 2;
    let snaps = 0;
    for (let i = 0; i < 260 || tracker.generation <= GENERATIONS + 8; i++) {
      while (inflight.size >= 5) await Promise.race(inflight);
      const x = r();
      if (x < 0.18) {
        await Promise.all(inflight);
        await rig.origin.flush();
        const name = `s${snaps++}`;
        await rig.origin.quiesced(async () => {
          const now = Buffer.alloc(SIZE);
          await rig.origin.read(now, 0);
          inCheckpoint = true;
          const k = await tracker.checkpoint(name).finally(() => (inCheckpoint = false));
          contentAt.set(k, chunkCrcs(now));
          await rig.pool.createSnapshot({ name, capacityChunks: 1100, policy: 'invalidate', readOnly: false });
        });
        live.push(name);
        if (live.length > 3) {
          const old = live.shift()!;
          const rec = rig.pool.records.find((x) => x?.name === old)!;
          await rig.pool.remove(rec);
        }
        continue;
      }
      const first = int(r, 0, SIZE / SECTOR - 1);
      const count = Math.min(SIZE / SECTOR - first, int(r, 1, 300));
      // Overlapping requests in flight at once have no defined outcome (as on a disk).
      if (busy.some(([a, b]) => first < b && a < first + count)) continue;
      const span: [number, number] = [first, first + count];
      busy.push(span);
      const y = r();
      const fua = r() < 0.2;
      if (y >= 0.85) {
        // Alone: MemDevice lets a sync in flight write back data a concurrent punch removed,
        // which no real file system does.
        await Promise.all(inflight);
        await rig.origin.discard(first * SECTOR, count * SECTOR, fua);
        busy.splice(busy.indexOf(span), 1);
        continue;
      }
      const p =
        y < 0.7
          ? rig.origin.write(pattern(first, count, next++), first * SECTOR, fua)
          : rig.origin.writeZeroes(first * SECTOR, count * SECTOR, fua);
      const q: Promise<void> = p.finally(() => {
        inflight.delete(q);
        busy.splice(busy.indexOf(span), 1);
      });
      inflight.add(q);
    }
    await Promise.all(inflight);
    capture();
    t.ok(reusePoints >= 6, `${reusePoints} crash points inside checkpoints that reuse a slot`);
    t.ok(tracker.generation > GENERATIONS, `${tracker.generation} checkpoints: the ring of slots was reused`);
    const failures: string[] = [];
    for (let i = 0; i < points.length; i++) {
      const err = await check(points[i]!, contentAt).catch((e: unknown) => `reopen: ${(e as Error).message}`);
      if (err) failures.push(`point ${i}: ${err}`);
    }
    totalPoints += points.length;
    t.same(failures.slice(0, 5), [], `${points.length} crash points (reproduce: COWBD_SEED=${seed})`);
  });
}

t.teardown(() => {
  console.log(`# tracker crash points checked: ${totalPoints}`);
});
