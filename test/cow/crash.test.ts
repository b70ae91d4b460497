// Randomized crash test. A concurrent random workload runs over fault-injecting memory
// devices; at random device I/Os a crash image is taken (every unsynced write lost,
// applied or torn per sector). Each image is reopened and checked against the model:
//  - the origin holds every write acknowledged with FUA or followed by an acknowledged
//    flush, and otherwise only writes issued;
//  - every snapshot whose creation was acknowledged (and removal not started) exists,
//    is valid, and reads its creation-time content (what the origin may hold of the
//    writes issued before the creation: creation does not flush), its own durable
//    writes, or writes it issued later, sector by sector; removed ones are gone;
//  - the store opens without repair and keeps working: writes after the crash never
//    disturb what snapshots read.
// COWBD_CRASH_ITERATIONS scales the number of workloads (default 40, ~2000 crash points).
import t from 'tap';

t.setTimeout(600_000);
import { Snapshot } from '../../cow/snapshot.js';
import { SECTOR, checkSectors, makeRig, pattern, reopenRig, rng32, seeds, type Rig } from './helpers.js';
import { Workload, type CrashPoint } from './workload.js';

const RUNS = Number(process.env.COWBD_CRASH_ITERATIONS ?? 40);
let totalPoints = 0;

async function checkCrash(w: Workload, cp: CrashPoint, exercise: boolean, seed: number): Promise<string | undefined> {
  let re: Rig;
  try {
    re = await reopenRig(cp.originImg, cp.storeImg);
  } catch (e) {
    return `reopen failed: ${(e as Error).message}`;
  }
  const size = re.origin.size;
  const buf = Buffer.alloc(size);
  await re.origin.read(buf, 0);
  let err = checkSectors(buf, 0, (s) => w.origin.crashAllowed(s, cp.t));
  if (err) return `origin: ${err}`;
  const expected = w.expectedAt(cp.t);
  const byName = new Map(expected.map((e) => [e.info.name, e]));
  const present = new Map<string, Snapshot>();
  for (const rec of re.pool.records) {
    if (!rec) continue;
    if (!byName.has(rec.name)) return `snapshot ${rec.name} exists but must not`;
    present.set(rec.name, new Snapshot(re.origin, re.pool, rec));
  }
  const seen = new Map<string, Buffer>();
  for (const e of expected) {
    const v = present.get(e.info.name);
    if (!v) {
      if (e.must) return `snapshot ${e.info.name} lost`;
      continue;
    }
    if (v.state !== 'valid') {
      // A removal cut short leaves the snapshot invalid, never valid with changed content.
      if (v.state === 'invalid' && !e.must && e.info.removeIssue < cp.t) {
        present.delete(e.info.name);
        continue;
      }
      return `snapshot ${e.info.name} is ${v.state}`;
    }
    const b = Buffer.alloc(size);
    await v.read(b, 0);
    err = checkSectors(b, 0, (s) => e.info.model.crashAllowed(s, cp.t));
    if (err) return `${e.info.name}: ${err}`;
    seen.set(e.info.name, b);
  }
  if (!exercise) return undefined;
  // Life after the crash: overwrite the whole origin and half of each snapshot; the
  // other half of each snapshot must read exactly as it did right after reopening.
  const r = rng32(seed);
  const sectors = size / SECTOR;
  await re.origin.write(pattern(0, sectors, 1_000_000), 0, false);
  const cs = re.pool.chunkSize;
  for (const [name, v] of present) {
    for (let c = 0; c < size / cs; c++) if (r() < 0.5) await v.write(pattern((c * cs) / SECTOR, cs / SECTOR, 2_000_000 + c), c * cs, false);
    const b = Buffer.alloc(size);
    await v.read(b, 0);
    const before = seen.get(name)!;
    for (let c = 0; c < size / cs; c++) {
      const got = b.subarray(c * cs, (c + 1) * cs);
      const fresh = got.readUInt32LE(0) === 2_000_000 + c;
      if (!fresh && !got.equals(before.subarray(c * cs, (c + 1) * cs))) return `${name} chunk ${c} changed after post-crash writes`;
    }
  }
  return undefined;
}

for (const seed of seeds(RUNS)) {
  t.test(`crash seed=${seed}`, async (t) => {
    const chunkSize = seed % 2 ? 4096 : 8192;
    const rig = await makeRig(256, chunkSize);
    rig.originDev.yieldTurns = seed % 3;
    rig.storeDev.yieldTurns = (seed >> 2) % 2;
    const w = new Workload(rig, {
      seed,
      ops: 160,
      chunkSize,
      concurrency: 5,
      maxSnaps: 3,
      capacity: [400, 400],
      checkLive: true,
      crashProb: 0.2,
      maxCrashPoints: 50,
    });
    await w.run();
    w.capture(); // and one at the very end
    t.same(w.errors, [], `seed ${seed}: live reads match model (COWBD_SEED=${seed})`);
    const failures: string[] = [];
    for (let i = 0; i < w.crashes.length; i++) {
      const err = await checkCrash(w, w.crashes[i]!, i % 4 === 0, seed + i);
      if (err) failures.push(`crash point ${i} (t=${w.crashes[i]!.t}): ${err}`);
    }
    totalPoints += w.crashes.length;
    t.same(failures.slice(0, 5), [], `seed ${seed}: ${w.crashes.length} crash points consistent (reproduce: COWBD_SEED=${seed})`);
  });
}

t.teardown(() => {
  console.log(`# crash points checked: ${totalPoints}`);
});
