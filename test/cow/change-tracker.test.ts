// The changed-chunk tracker alone (over memory devices) and wired into the manager (files):
// marks, checkpoints, ring reuse past GENERATIONS, reopen, trust rules, consistency groups.
import t from 'tap';
import { mkdtemp, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ChangeTracker, type VolumeFileState } from '../../cow/change-tracker.js';
import { MemDevice } from '../../cow/mem-device.js';
import { FileDevice } from '../../cow/device.js';
import { Origin } from '../../cow/origin.js';
import { OriginPools } from '../../cow/origin-copy.js';
import { CowManager } from '../../cow/manager.js';
import { GENERATIONS } from '../../cow/tracker-format.js';
import { FaultDevice, FaultPlan } from '../../cow/fault-device.js';
import { rng32, seeds } from './helpers.js';

const CHUNK = 65536;
const CHUNKS = 64;
const SIZE = CHUNKS * CHUNK;

function vol(state: Partial<VolumeFileState> = {}): { st: VolumeFileState; volumeState: () => Promise<VolumeFileState> } {
  const st = { blocks: 0, mtimeMs: 1000, size: SIZE, ...state };
  return { st, volumeState: async () => ({ ...st }) };
}

const bits = (m: Uint8Array | undefined): number[] => {
  if (!m) return [-1];
  const out: number[] = [];
  for (let i = 0; i < m.length * 8; i++) if (m[i >>> 3]! & (1 << (i & 7))) out.push(i);
  return out;
};

t.test('marks are durable before mark resolves; marked chunks cost nothing', async (t) => {
  const dev = new MemDevice(0);
  const v = vol();
  const tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
  t.equal(tr.trusted, true, 'an empty volume is tracked exactly from the start');
  t.equal(tr.generation, 0);
  t.equal(tr.chunks, CHUNKS);
  t.match(tr.id, /^[0-9a-f]{32}$/);
  const p = tr.mark(CHUNK + 100, 2 * CHUNK);
  t.ok(p instanceof Promise, 'a new chunk waits for its mark');
  const q = tr.mark(CHUNK, 10);
  t.ok(q instanceof Promise, 'a chunk set but not yet durable waits too');
  await Promise.all([p, q]);
  t.equal(tr.mark(CHUNK, 3 * CHUNK), undefined, 'durably marked: no promise');
  // The durable image alone, as after a power loss right now, holds the marks.
  const re = await ChangeTracker.open(new MemDevice(0, dev.durableImage()), { volumeSize: SIZE, volumeState: v.volumeState });
  t.same(bits(await re.changedBetween(0, 1)), [1, 2, 3]);
  t.equal(re.id, tr.id);
});

t.test('zeroing what never held data marks nothing (mkfs discards a new volume)', async (t) => {
  const dev = new MemDevice(0);
  const v = vol();
  let tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
  t.equal(tr.markZeroing(0, SIZE), undefined, 'a whole-volume TRIM of a new volume marks nothing');
  await tr.mark(5 * CHUNK, 10);
  await tr.markZeroing(0, SIZE);
  t.same(bits(await tr.changedBetween(0, 1)), [5], 'only the chunk that held data');
  await tr.checkpoint('s1');
  await tr.markZeroing(4 * CHUNK, 3 * CHUNK);
  t.same(bits(await tr.changedBetween(1, 2)), [5], 'a chunk written in an earlier generation is marked when zeroed');
  // Reopened, the chunks that may hold data are known again.
  await tr.close();
  tr = await ChangeTracker.open(new MemDevice(0, dev.durableImage()), { volumeSize: SIZE, volumeState: v.volumeState });
  await tr.checkpoint('s2');
  t.equal(tr.markZeroing(0, 5 * CHUNK), undefined);
  await tr.markZeroing(5 * CHUNK, CHUNK);
  t.same(bits(await tr.changedBetween(2, 3)), [5]);
  // Untrusted allocation: every zeroed chunk is marked.
  const u = await ChangeTracker.open(new MemDevice(0), { volumeSize: SIZE, volumeState: vol({ blocks: 8 }).volumeState });
  await u.checkpoint('first');
  await u.markZeroing(0, 2 * CHUNK);
  t.same(bits(await u.changedBetween(1, 2)), [0, 1]);
});

t.test('checkpoints, changedBetween and allocatedBefore across ring reuse, reopen and crash', async (t) => {
  for (const seed of seeds(2)) {
    const r = rng32(seed);
    let dev = new MemDevice(0);
    const v = vol();
    let tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
    const model: Array<Set<number>> = [new Set()];
    const check = async (tr: ChangeTracker, what: string): Promise<void> => {
      const g = tr.generation;
      const oldest = Math.max(0, g - GENERATIONS + 1);
      for (let from = 0; from <= g; from++) {
        const got = await tr.changedBetween(from, g + 1);
        if (from < oldest) {
          if (got !== undefined) t.fail(`${what}: changedBetween(${from}) must be unknown`);
          continue;
        }
        const want = new Set<number>();
        for (let k = from; k <= g; k++) for (const c of model[k]!) want.add(c);
        if (bits(got).join() !== [...want].sort((a, b) => a - b).join()) t.fail(`${what}: changedBetween(${from}, ${g + 1}) seed ${seed}`);
      }
      const all = new Set<number>();
      for (const s of model) for (const c of s) all.add(c);
      t.same(
        bits(await tr.allocatedBefore(g + 1)),
        [...all].sort((a, b) => a - b),
        `${what}: allocatedBefore`,
      );
    };
    for (let i = 0; i < 2 * GENERATIONS + 7; i++) {
      const n = 1 + Math.floor(r() * 3);
      await Promise.all(
        Array.from({ length: n }, () => {
          const c = Math.floor(r() * CHUNKS);
          model[tr.generation]!.add(c);
          return tr.mark(c * CHUNK + 512, 4096);
        }),
      );
      t.equal(await tr.checkpoint(`s${i}`), i + 1);
      model.push(new Set());
      if (i % 9 === 8) await check(tr, `after checkpoint ${i + 1}`);
      if (i === 40) {
        // A crash: only what was synced survives, and it is trusted.
        dev = new MemDevice(0, dev.durableImage());
        tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
        t.equal(tr.generation, 41);
        await check(tr, 'after a crash');
      }
    }
    t.equal(tr.checkpointOf('s70'), 71);
    t.equal(tr.checkpointOf('s1'), undefined, 'names are bounded');
    t.equal(await tr.changedBetween(0, 5), undefined, 'folded generations are no longer known');
    const id = tr.id;
    await tr.close();
    tr = await ChangeTracker.open(new MemDevice(0, dev.durableImage()), { volumeSize: SIZE, volumeState: v.volumeState });
    t.equal(tr.id, id, 'a clean close with the volume untouched keeps the chain');
    t.equal(tr.trusted, true);
    await check(tr, 'after a clean close');
  }
});

t.test('untrusted: data without a tracker, and a volume written while untracked', async (t) => {
  const v = vol({ blocks: 8 });
  let dev = new MemDevice(0);
  let tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
  t.equal(tr.trusted, false);
  t.equal(await tr.allocatedBefore(1), undefined, 'allocation unknown');
  t.equal(await tr.changedBetween(0, 1), undefined, 'no checkpoint before tracking began');
  await tr.mark(0, 1);
  const k = await tr.checkpoint('a');
  await tr.mark(5 * CHUNK, 1);
  t.same(bits(await tr.changedBetween(k, k + 1)), [5], 'known from the first checkpoint after tracking began');
  await tr.close();

  // Reopened untouched: still untrusted for allocation, the chain goes on.
  const id = tr.id;
  dev = new MemDevice(0, dev.durableImage());
  tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
  t.equal(tr.id, id);
  t.same(bits(await tr.changedBetween(k, k + 1)), [5]);
  await tr.close();

  // Written while no daemon tracked it: the clean record no longer matches.
  v.st.mtimeMs += 1;
  dev = new MemDevice(0, dev.durableImage());
  tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
  t.not(tr.id, id, 'reset: a new id');
  t.equal(tr.trusted, false);
  t.equal(tr.generation, 0);
  t.equal(await tr.changedBetween(0, 1), undefined, 'nothing is known from before the reset');
  t.equal(tr.checkpointOf('a'), undefined);
  const id2 = tr.id;

  // An unclean stop (no close) keeps the marks whatever the mtime says.
  await tr.mark(7 * CHUNK, 1);
  v.st.mtimeMs += 5;
  tr = await ChangeTracker.open(new MemDevice(0, dev.durableImage()), { volumeSize: SIZE, volumeState: v.volumeState });
  t.equal(tr.id, id2);
  t.same(bits(await tr.changedBetween(1, 1)), [], 'empty range');
  await t.rejects(tr.changedBetween(2, 1), { code: 'EINVAL' });

  // A clean close then a resize is a reset too.
  const t2 = await ChangeTracker.open(new MemDevice(0, dev.durableImage()), { volumeSize: SIZE, volumeState: v.volumeState });
  await t2.close();
});

t.test('a trusted tracker reset by a changed size', async (t) => {
  const v = vol();
  const dev = new MemDevice(0);
  const tr = await ChangeTracker.open(dev, { volumeSize: SIZE, volumeState: v.volumeState });
  await tr.mark(0, 1);
  await tr.close();
  v.st.size = 2 * SIZE;
  v.st.blocks = 16;
  const re = await ChangeTracker.open(new MemDevice(0, dev.durableImage()), { volumeSize: 2 * SIZE, volumeState: v.volumeState });
  t.not(re.id, tr.id);
  t.equal(re.trusted, false);
  t.equal(re.chunks, 2 * CHUNKS);
});

t.test('a mark that cannot be made durable fails the write before its data is written', async (t) => {
  const plan = new FaultPlan();
  const tr = await ChangeTracker.open(new FaultDevice(new MemDevice(0), 'o.cbt', () => plan), {
    volumeSize: SIZE,
    volumeState: vol().volumeState,
  });
  const originDev = new MemDevice(SIZE);
  const o = new Origin('o', originDev, new OriginPools(), { marks: tr });
  plan.set([{ file: '.cbt', op: 'sync' }]);
  let wrote = 0;
  originDev.onIo = (k) => {
    if (k === 'write') wrote++;
  };
  await t.rejects(o.write(Buffer.alloc(4096, 1), 3 * CHUNK, false), { id: 'COW_TRACKER_FAILED', code: 'EIO' });
  // Chunk 3 may hold data now (its write was attempted): zeroing it needs a mark too.
  await t.rejects(o.writeZeroes(3 * CHUNK, 4096, false), { id: 'COW_TRACKER_FAILED', code: 'EIO' });
  t.equal(wrote, 0, 'the volume was not written');
  plan.set([]);
  await t.rejects(
    tr.checkpoint('a'),
    { id: 'COW_TRACKER_FAILED', code: 'EIO' },
    'a failed tracker takes no checkpoint: no snapshot claims a chain it cannot keep',
  );
});

const MiB = 1 << 20;

t.test('manager: a consistency group is one instant; racing writes are in every snapshot or marked after', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cbt-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  for (const n of ['a', 'b']) {
    await writeFile(join(dir, `${n}.vol`), '');
    await truncate(join(dir, `${n}.vol`), 8 * MiB);
  }
  let m = await CowManager.open(dir, { changeTracking: true });
  const a = await m.attachOrigin('a');
  const b = await m.attachOrigin('b');
  const ta = m.tracker('a')!;
  const tb = m.tracker('b')!;
  t.equal(ta.trusted, true);
  t.equal(m.trackerPath('a'), join(dir, 'cow', 'a.cbt'));
  const r = rng32(7);
  const CH = (8 * MiB) / CHUNK;
  let inBoth = 0;
  let inNone = 0;
  for (let round = 0; round < 24; round++) {
    const c = round % CH;
    const data = Buffer.alloc(4096, round + 1);
    // a then b, in order: a group never holds b's write without a's.
    const chain = (async () => {
      for (let i = Math.floor(r() * 40); i > 0; i--) await new Promise<void>((res) => setImmediate(res));
      await a.write(data, c * CHUNK, false);
      await b.write(data, c * CHUNK, false);
    })();
    const [sa, sb] = await m.createSnapshots([
      { name: `a${round}`, origin: 'a', size: 2 * MiB },
      { name: `b${round}`, origin: 'b', size: 2 * MiB },
    ]);
    await chain;
    const got = Buffer.alloc(4096);
    await sa!.read(got, c * CHUNK);
    const hasA = got[0] === round + 1;
    await sb!.read(got, c * CHUNK);
    const hasB = got[0] === round + 1;
    if (hasB && !hasA) t.fail(`round ${round}: b's later write is in the group, a's is not`);
    if (hasA && hasB) inBoth++;
    if (!hasA && !hasB) inNone++;
    for (const [tr, snapName, has] of [
      [ta, `a${round}`, hasA],
      [tb, `b${round}`, hasB],
    ] as const) {
      const k = tr.checkpointOf(snapName)!;
      const before = bits(await tr.changedBetween(k - 1, k)).includes(c);
      const after = bits(await tr.changedBetween(k, tr.generation + 1)).includes(c);
      if (has && !before) t.fail(`round ${round}: a write in ${snapName} is not marked before its checkpoint`);
      if (!has && !after) t.fail(`round ${round}: a write after ${snapName} is not marked after its checkpoint`);
    }
    await m.removeSnapshot(`a${round}`);
    await m.removeSnapshot(`b${round}`);
  }
  t.pass(`24 groups: ${inBoth} held both writes, ${inNone} neither`);
  await t.rejects(
    m.createSnapshots([
      { name: 'x', origin: 'a', size: 2 * MiB },
      { name: 'x', origin: 'b', size: 2 * MiB },
    ]),
    { code: 'EEXIST' },
    'one name twice in a group',
  );
  await t.rejects(
    m.createSnapshots([
      { name: 'y', origin: 'a', size: 2 * MiB },
      { name: 'z', origin: 'b', size: 1 },
    ]),
    'a member that cannot be created fails the group',
  );
  t.equal(m.snapshot('y'), undefined, 'and the ones made are removed');
  const id = ta.id;
  const gen = ta.generation;
  await m.close();
  m = await CowManager.open(dir, { changeTracking: true });
  await m.attachOrigin('a');
  t.equal(m.tracker('a')!.id, id, 'a clean detach keeps the chain');
  t.equal(m.tracker('a')!.generation, gen);
  await m.close();
  // Written while detached: a new chain.
  await writeFile(join(dir, 'a.vol'), Buffer.alloc(4096, 9), { flag: 'r+' });
  m = await CowManager.open(dir, { changeTracking: true });
  await m.attachOrigin('a');
  t.not(m.tracker('a')!.id, id);
  t.equal(m.tracker('a')!.trusted, false);
  await m.close();
});

// Figures for docs/tuning.md, CHANGE_TRACKER; prints, asserts nothing about time.
t.test('hot path cost of tracking (COWBD_TRACKER_PERF=1)', { skip: process.env.COWBD_TRACKER_PERF !== '1' }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cbt-perf-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const VOL = 1 << 30;
  const run = async (label: string, tracked: boolean, fresh: boolean, n: number, depth: number): Promise<number> => {
    const vp = join(dir, `${label}.vol`);
    await writeFile(vp, '');
    await truncate(vp, VOL);
    const dev = await FileDevice.open(vp);
    let tr: ChangeTracker | undefined;
    if (tracked) {
      tr = await ChangeTracker.open(await FileDevice.open(join(dir, `${label}.cbt`), { create: true }), {
        volumeSize: VOL,
        volumeState: async () => ({ ...(await stat(vp)) }),
      });
      if (!fresh) await tr.mark(0, 64 * CHUNK);
    }
    const o = new Origin('o', dev, new OriginPools(), { marks: tr });
    const buf = Buffer.alloc(4096, 7);
    let x = 12345;
    let i = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: depth }, async () => {
        while (i++ < n) {
          x = (Math.imul(x, 1103515245) + 12345) >>> 0;
          const off = fresh ? (x % (VOL / CHUNK)) * CHUNK : (x % 64) * CHUNK + (x % 16) * 4096;
          await o.write(buf, off, false);
        }
      }),
    );
    const us = ((performance.now() - t0) * 1000) / n;
    await o.close();
    await tr?.close();
    await rm(vp);
    return us;
  };
  await run('warm', true, false, 20000, 1);
  for (const [what, fresh, n] of [
    ['already marked', false, 100000],
    ['fresh chunks', true, 3000],
  ] as const) {
    for (const depth of [1, 16]) {
      const a = await run('a', false, fresh, n, depth);
      const b = await run('b', true, fresh, n, depth);
      const a2 = await run('c', false, fresh, n, depth);
      t.comment(`${what}, ${depth} in flight: untracked ${((a + a2) / 2).toFixed(1)} us/write, tracked ${b.toFixed(1)} us/write`);
    }
  }
  t.pass('figures printed');
});
