// Chunks a backup has read are released from its snapshot: origin writes there stop
// copying for it (as qemu's backup job stops copy-before-write for blocks it has copied),
// while every chunk not released keeps the snapshot's point in time.
import t from 'tap';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CowManager } from '../../cow/manager.js';

const CHUNK = 65536;

t.test('released chunks are not copied; the others keep the point in time', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-release-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'vol.vol'), '');
  await truncate(join(dir, 'vol.vol'), 16 * CHUNK);
  const m = await CowManager.open(dir);
  t.teardown(() => m.close());
  const o = await m.attachOrigin('vol');
  const old = Buffer.alloc(16 * CHUNK, 0x11);
  await o.write(old, 0, false);
  const s = await m.createSnapshot({ name: 'bk', origin: 'vol', size: 16 * CHUNK, readOnly: true });
  const w = await m.createSnapshot({ name: 'rw', origin: 'vol', size: 16 * CHUNK });
  t.throws(() => m.releaseChunks('rw', [[0, CHUNK]]), { message: /writable/ }, 'a writable snapshot gives up nothing');
  await m.removeSnapshot(w.name);
  t.throws(() => m.releaseChunks('nosuch', [[0, CHUNK]]), { message: /no snapshot nosuch/ });

  // The range's partial chunks at either end (1 and 6) are not released.
  t.equal(m.releaseChunks('bk', [[2 * CHUNK - 100, 4 * CHUNK + 200]]), 4, 'only whole chunks: 2 to 5');
  t.equal(m.releaseChunks('bk', [[2 * CHUNK, 4 * CHUNK]]), 0, 'released again: nothing new');
  t.equal(m.releaseChunks('bk', [[7 * CHUNK + 1, CHUNK]]), 0, 'no whole chunk, nothing released');
  const before = m.stats().copies;
  await o.write(Buffer.alloc(CHUNK, 0x22), 3 * CHUNK, false);
  await o.settle();
  t.equal(m.stats().copies, before, 'a write to a released chunk copies nothing');
  await o.write(Buffer.alloc(CHUNK, 0x33), 8 * CHUNK, false);
  await o.settle();
  t.equal(m.stats().copies, before + 1, 'a write elsewhere still copies');
  const got = Buffer.alloc(CHUNK);
  await s.read(got, 8 * CHUNK);
  t.ok(got.equals(Buffer.alloc(CHUNK, 0x11)), 'and the snapshot keeps its point in time there');
  await s.read(got, 3 * CHUNK);
  t.ok(got.equals(Buffer.alloc(CHUNK, 0x22)), 'a released chunk reads the origin');
  t.equal(m.releaseChunks('bk', [[15 * CHUNK, CHUNK]]), 1, 'the last chunk');
});
