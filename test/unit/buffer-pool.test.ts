// The connection's buffer pool: bounded free lists, and the room it keeps for buffers
// a backend took over (held writes) while they are out and for a while after.
import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { BufferPool } from '../../protocol/buffer-pool.js';

const MiB = 1 << 20;

t.test('free buffers are reused, bounded at 16 MiB per size class', async (t) => {
  const pool = new BufferPool();
  const bufs = Array.from({ length: 40 }, () => pool.get(MiB));
  t.equal(new Set(bufs.map((b) => b.buffer)).size, 40);
  for (const b of bufs) pool.put(b);
  t.equal(pool.freeBytes, 16 * MiB, 'only 16 of the 40 kept');
  const again = pool.get(MiB);
  t.ok(
    bufs.some((b) => b.buffer === again.buffer),
    'a free one is handed out again',
  );
  const small = pool.get(3000);
  t.equal(small.length, 3000, 'a view of the exact length');
  pool.put(Buffer.alloc(MiB));
  t.equal(pool.freeBytes, 15 * MiB, 'a buffer the pool did not make is not taken');
});

t.test('kept buffers raise the bound to the peak kept until the pool is idle for a while', async (t) => {
  const pool = new BufferPool(50);
  const bufs = Array.from({ length: 40 }, () => pool.get(MiB));
  const backs = bufs.map((b) => pool.keep(b));
  for (const back of backs) back();
  t.equal(pool.freeBytes, 40 * MiB, 'every buffer given back stays free: as many may be kept again');
  const reused = Array.from({ length: 40 }, () => pool.get(MiB));
  t.equal(new Set(reused.map((b) => b.buffer)).size, 40);
  t.ok(
    reused.every((b) => bufs.some((o) => o.buffer === b.buffer)),
    'the next burst reuses them: no new memory',
  );
  for (const b of reused) pool.put(b);
  await sleep(120);
  t.equal(pool.freeBytes, 16 * MiB, 'idle past the delay: back to the usual bound');
});

t.test('the bound stays raised while any buffer is still kept', async (t) => {
  const pool = new BufferPool(20);
  const a = pool.get(MiB);
  const b = pool.get(MiB);
  const backA = pool.keep(a);
  const backB = pool.keep(b);
  backA();
  await sleep(60);
  backB();
  backB();
  t.equal(pool.freeBytes, 2 * MiB, 'both back once each');
  const foreign = pool.keep(Buffer.alloc(10));
  foreign();
  t.equal(pool.freeBytes, 2 * MiB, 'keeping a buffer the pool did not make changes nothing');
});
