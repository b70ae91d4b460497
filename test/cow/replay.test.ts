// Reopening a store whose snapshots map chunks past the allocator's first refs array
// (1024 entries) while their metadata areas sit low in the file: every mapped chunk must
// come back referenced, or the next copies reuse it and overwrite the snapshot's data.
// Found by the kill -9 soak (test/daemon/soak.test.ts): after a restart, a store of
// 16 KiB chunks handed a snapshot's data chunk to another snapshot's metadata area.
import t from 'tap';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileDevice } from '../../cow/device.js';
import { OriginPools } from '../../cow/origin-copy.js';
import { SnapshotPool } from '../../cow/snapshot-pool.js';
import { Origin } from '../../cow/origin.js';
import { Snapshot } from '../../cow/snapshot.js';
import { pattern, sectorId, SECTOR } from './helpers.js';

const CS = 32 * 1024; // 2046 entries an area: one area holds every exception below
const CHUNKS = 1100; // data chunks run past 1024
const STEP = 32; // chunks a write
const SPC = CS / SECTOR;

t.test('a reopened store keeps every chunk its snapshots map, past chunk 1024', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-replay-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const originPath = join(dir, 'o.vol');
  const storePath = join(dir, 'o.32k.cows');
  await writeFile(originPath, Buffer.alloc(0));
  const od = await FileDevice.open(originPath);
  for (let c = 0; c < CHUNKS; c += STEP) await od.write(pattern(c * SPC, STEP * SPC, 1), c * CS);
  await od.sync();
  await od.close();

  const open = async (create: boolean) => {
    const o = await FileDevice.open(originPath);
    const s = await FileDevice.open(storePath, { create });
    const pools = new OriginPools();
    const origin = new Origin('o', o, pools);
    const pool = create
      ? await SnapshotPool.create(s, origin, { chunkSize: CS, originSize: o.size, originName: 'o' })
      : await SnapshotPool.open(s, origin);
    pools.add(pool);
    return {
      origin,
      pool,
      close: async () => {
        await pool.close();
        await origin.close();
      },
    };
  };
  const snap = async (r: Awaited<ReturnType<typeof open>>, name: string) =>
    new Snapshot(
      r.origin,
      r.pool,
      await r.origin.quiesced(() => r.pool.createSnapshot({ name, capacityChunks: 2 * CHUNKS, policy: 'invalidate', readOnly: false })),
    );

  const first = await open(true);
  await snap(first, 'a');
  for (let c = 0; c < CHUNKS; c += STEP) await first.origin.write(pattern(c * SPC, STEP * SPC, 2), c * CS, false);
  await first.close();

  const again = await open(false);
  const recA = again.pool.records.find((r) => r?.name === 'a')!;
  let unreferenced = 0;
  recA.map.forEach((_c, p) => {
    if (again.pool.alloc.refs[p] !== 1) unreferenced++;
  });
  t.equal(unreferenced, 0, `every one of ${recA.map.size} mapped chunks has its reference after the reopen`);
  // Life after the reopen: a new snapshot and a whole new round of copies must not land on a's chunks.
  const a = new Snapshot(again.origin, again.pool, recA);
  await snap(again, 'b');
  for (let c = 0; c < CHUNKS; c += STEP) await again.origin.write(pattern(c * SPC, STEP * SPC, 3), c * CS, false);
  const buf = Buffer.alloc(CHUNKS * CS);
  await a.read(buf, 0);
  let wrong = 0;
  for (let s = 0; s < CHUNKS * SPC; s++) if (sectorId(buf, s * SECTOR, s) !== 1) wrong++;
  t.equal(wrong, 0, 'snapshot a still reads its point in time in every sector');
  await again.close();
});
