// backup/chunk-table.ts: ids of non-zero chunks only, in ascending order whatever the order set.
import { createHash } from 'node:crypto';
import t from 'tap';
import { ChunkTable } from '../../backup/chunk-table.js';

const id = (n: number) => createHash('sha256').update(String(n)).digest();

t.test('set, get, overwrite, clear and entries in any order', async (t) => {
  const c = new ChunkTable(100);
  for (const i of [5, 7, 99, 0, 6, 50]) c.set(i, id(i));
  t.equal(c.nonZero, 6);
  t.same(
    [...c.entries()].map(([i]) => i),
    [0, 5, 6, 7, 50, 99],
  );
  t.ok(c.get(50)!.equals(id(50)));
  t.equal(c.get(51), undefined, 'unset is zero');
  c.set(50, id(1000));
  t.ok(c.get(50)!.equals(id(1000)), 'set again overwrites');
  t.equal(c.nonZero, 6);
  c.clear(6);
  c.clear(8);
  t.equal(c.get(6), undefined);
  t.same(
    [...c.entries()].map(([i]) => i),
    [0, 5, 7, 50, 99],
  );
  t.throws(() => c.set(100, id(1)), { code: 'COWBD_BACKUP_BAD_CHUNK_INDEX' });
  t.throws(() => c.set(-1, id(1)), { code: 'COWBD_BACKUP_BAD_CHUNK_INDEX' });
  t.throws(() => c.set(1, Buffer.alloc(31)), { code: 'COWBD_BACKUP_BAD_MANIFEST' });
  const back = ChunkTable.decode(100, c.nonZero, c.encode());
  t.same(
    [...back.entries()].map(([i, b]) => [i, b.toString('hex')]),
    [...c.entries()].map(([i, b]) => [i, b.toString('hex')]),
  );
  t.throws(() => ChunkTable.decode(100, 2, Buffer.alloc(10)));
  const swapped = c.encode();
  swapped.writeUInt32LE(60, 0);
  t.throws(() => ChunkTable.decode(100, c.nonZero, swapped), /out of order/);
});

t.test('16 M chunks with 16 K set stay small', async (t) => {
  global.gc?.();
  const before = process.memoryUsage();
  const c = new ChunkTable(16 * 1024 * 1024);
  const one = id(1);
  for (let i = 0; i < 16384; i++) c.set(i * 1024 + 3, one);
  const after = process.memoryUsage();
  const grew = after.heapUsed + after.arrayBuffers - (before.heapUsed + before.arrayBuffers);
  t.equal(c.nonZero, 16384);
  t.equal(c.count, 16 * 1024 * 1024);
  t.ok(grew < 10 * 1024 * 1024, `grew ${Math.round(grew / 1024)} KiB`);
  t.ok(c.get(1023 * 1024 + 3));
  t.equal(c.get(1023 * 1024 + 4), undefined);
});
