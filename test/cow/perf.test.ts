// Figures later issues hold the engine to. Small by default so the suite stays fast;
// COWBD_PERF=1 runs the full sizes (1M exceptions, throughput on 256 MiB) and prints them.
import t from 'tap';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AreaLog, type MetaWrite } from '../../cow/area-log.js';
import { FileDevice } from '../../cow/device.js';
import { encodePoolHeader, encodeSlot, slotOffset } from '../../cow/format.js';
import { SnapshotPool } from '../../cow/snapshot-pool.js';
import { Snapshot } from '../../cow/snapshot.js';
import { CowManager } from '../../cow/manager.js';
import { originOf } from './helpers.js';

const FULL = process.env.COWBD_PERF === '1';
const MiB = 1 << 20;

async function tmp(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-perf-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Writes a store holding n exceptions directly in the on-disk format (data chunks left sparse). */
async function synthesize(dir: string, n: number, cs: number): Promise<{ store: string; origin: string; originSize: number }> {
  const originSize = (n + 16) * cs;
  const origin = join(dir, 'o.vol');
  await writeFile(origin, '');
  await truncate(origin, originSize);
  const path = join(dir, 'o.cows');
  const dev = await FileDevice.open(path, { create: true });
  const poolId = 77;
  const snapId = 99;
  await dev.write(encodePoolHeader({ chunkSize: cs, poolId, originSize, originName: 'o' }), 0);
  let nextMeta = 4;
  const areas: number[] = [];
  const log = new AreaLog(cs, poolId, snapId, () => nextMeta++, (a) => areas.push(a), { area: 2, seq: 0, nonce: 0, count: 0, next: 3 });
  const firstData = 1 + Math.ceil(n / ((cs - 32) / 16)) + 8;
  let out: MetaWrite[] = [];
  for (let i = 0; i < n; i++) {
    log.append(i, firstData + i, out);
    if (out.length > 64) {
      for (const w of out) await dev.write(Buffer.from(w.buf), w.offset);
      out = [];
    }
  }
  log.finish(out);
  for (const w of out) await dev.write(Buffer.from(w.buf), w.offset);
  await dev.write(encodeSlot({ seq: 1, snapId, inUse: true, state: 'valid', policy: 'invalidate', readOnly: false, capacityChunks: 2 * n + 1000, firstArea: 2, createdAt: Date.now(), name: 'big' }), slotOffset(0, 1));
  await dev.sync();
  await dev.close();
  return { store: path, origin, originSize };
}

t.test('restart with many exceptions: time and memory per exception', async (t) => {
  const n = FULL ? 1_000_000 : 200_000;
  const dir = await tmp(t);
  const f = await synthesize(dir, n, 65536);
  global.gc?.();
  const rss0 = process.memoryUsage().rss;
  const t0 = performance.now();
  const originDev = await FileDevice.open(f.origin);
  const { origin } = originOf(originDev);
  const store = await SnapshotPool.open(await FileDevice.open(f.store), origin);
  const ms = performance.now() - t0;
  const rec = store.records[0]!;
  t.equal(rec.map.size, n);
  const perException = store.memoryBytes / n;
  const rssPer = (process.memoryUsage().rss - rss0) / n;
  t.ok(perException <= 16, `exception map + allocator: ${perException.toFixed(2)} bytes per exception`);
  t.ok(ms < 2000, `opened ${n} exceptions in ${ms.toFixed(0)} ms`);
  t.comment(`open ${n} exceptions: ${ms.toFixed(0)} ms; tables ${perException.toFixed(2)} B/exception; RSS delta ${rssPer.toFixed(2)} B/exception`);
  const b = Buffer.alloc(65536);
  await new Snapshot(origin, store, rec).read(b, 12345 * 65536);
  await store.close();
  await originDev.close();
});

t.test('snapshot creation on a sparse 1 TiB volume', async (t) => {
  const dir = await tmp(t);
  await writeFile(join(dir, 'big.vol'), '');
  await truncate(join(dir, 'big.vol'), 2 ** 40);
  const m = await CowManager.open(dir);
  t.teardown(() => m.close());
  await m.attachOrigin('big');
  await m.createSnapshot({ name: 'warm', origin: 'big', size: 64 * MiB });
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    await m.createSnapshot({ name: `s${i}`, origin: 'big', size: 64 * MiB });
    times.push(performance.now() - t0);
  }
  const med = times.sort((a, b) => a - b)[2]!;
  t.comment(`snapshot creation on 1 TiB: median ${med.toFixed(2)} ms (${times.map((x) => x.toFixed(1)).join(', ')})`);
  t.ok(med < 50, `median ${med.toFixed(2)} ms`);
});

t.test('throughput ratios (figures; asserted only with COWBD_PERF=1)', async (t) => {
  const size = (FULL ? 256 : 32) * MiB;
  const dir = await tmp(t);
  const buf = Buffer.alloc(MiB, 0x5a);
  const run = async (name: string, snaps: number): Promise<number> => {
    await writeFile(join(dir, `${name}.vol`), '');
    await truncate(join(dir, `${name}.vol`), size);
    const m = await CowManager.open(dir);
    const o = await m.attachOrigin(name);
    for (let i = 0; i < snaps; i++) await m.createSnapshot({ name: `${name}-s${i}`, origin: name, size: size + 8 * MiB });
    const t0 = performance.now();
    // Queue depth 4, as a kernel NBD client keeps several requests in flight.
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < size) {
        const off = next;
        next += MiB;
        await o.write(buf, off, false);
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    await o.flush();
    const secs = (performance.now() - t0) / 1000;
    let readRatio = 0;
    if (snaps === 1) {
      const rb = Buffer.alloc(MiB);
      const s = m.snapshot(`${name}-s0`)!;
      const t1 = performance.now();
      for (let off = 0; off < size; off += MiB) await s.read(rb, off);
      const snapRead = performance.now() - t1;
      const t2 = performance.now();
      for (let off = 0; off < size; off += MiB) await o.read(rb, off);
      const originRead = performance.now() - t2;
      readRatio = originRead / snapRead;
      t.comment(`snapshot read / origin read throughput: ${readRatio.toFixed(2)}`);
    }
    await m.close();
    return size / MiB / secs;
  };
  const plain = await run('p0', 0);
  const one = await run('p1', 1);
  const four = await run('p4', 4);
  t.comment(`first-write MiB/s: no snapshot ${plain.toFixed(0)}, 1 snapshot ${one.toFixed(0)} (${(one / plain).toFixed(2)}), 4 snapshots ${four.toFixed(0)} (${(four / one).toFixed(2)} of 1)`);
  if (FULL) {
    t.ok(one / plain >= 0.5, 'COW with 1 snapshot >= 0.5 of no snapshot');
    t.ok(four / one >= 0.8, '4 snapshots >= 0.8 of 1');
  } else t.pass('figures printed');
});
