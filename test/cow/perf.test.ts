// Figures later issues hold the engine to. Small by default so the suite stays fast;
// COWBD_PERF=1 runs the full size (1M exceptions). The throughput ratios are measured by
// the benchmark (scripts/bench/engine.ts, `npm run bench`).
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
  const log = new AreaLog(
    cs,
    poolId,
    snapId,
    () => nextMeta++,
    (a) => areas.push(a),
    { area: 2, seq: 0, nonce: 0, count: 0, next: 3 },
  );
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
  await dev.write(
    encodeSlot({
      seq: 1,
      snapId,
      inUse: true,
      state: 'valid',
      policy: 'invalidate',
      readOnly: false,
      capacityChunks: 2 * n + 1000,
      firstArea: 2,
      createdAt: Date.now(),
      name: 'big',
    }),
    slotOffset(0, 1),
  );
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
  t.comment(
    `open ${n} exceptions: ${ms.toFixed(0)} ms; tables ${perException.toFixed(2)} B/exception; RSS delta ${rssPer.toFixed(2)} B/exception`,
  );
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
