// The connection's buffer pool: bounded free lists, which keep room for as many buffers as
// were out at once (requests in flight, held writes) until the pool has been idle a while.
import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { BufferPool } from '../../protocol/buffer-pool.js';

const MiB = 1 << 20;

t.test('free buffers are reused, bounded at 16 MiB per size class once the pool is idle', async (t) => {
  const pool = new BufferPool(50);
  const bufs = Array.from({ length: 40 }, () => pool.get(MiB));
  t.equal(new Set(bufs.map((b) => b.buffer)).size, 40);
  for (const b of bufs) pool.put(b);
  t.equal(pool.freeBytes, 40 * MiB, 'as many kept free as were out at once');
  const again = pool.get(MiB);
  t.ok(
    bufs.some((b) => b.buffer === again.buffer),
    'a free one is handed out again',
  );
  pool.put(again);
  await sleep(120);
  t.equal(pool.freeBytes, 16 * MiB, 'idle past the delay: back to 16 of the 40');
  const small = pool.get(3000);
  t.equal(small.length, 3000, 'a view of the exact length');
  pool.put(small);
  pool.put(Buffer.alloc(MiB));
  t.equal(pool.freeBytes, 16 * MiB + 4096, 'a buffer the pool did not make is not taken');
});

t.test('requests in flight on many connections reuse buffers instead of allocating', async (t) => {
  // 4 connections with 8 requests of 1 MiB each in flight: more than the 16 MiB minimum.
  const pool = new BufferPool(1000);
  const out: Buffer[] = [];
  for (let i = 0; i < 32; i++) out.push(pool.get(MiB));
  const seen = new Set(out.map((b) => b.buffer));
  for (let round = 0; round < 100; round++) {
    // Replies leave in batches: 24 come back, then as many new requests arrive.
    for (const b of out.splice(0, 24)) pool.put(b);
    for (let i = 0; i < 24; i++) out.push(pool.get(MiB));
  }
  for (const b of out) seen.add(b.buffer);
  t.equal(seen.size, 32, 'no buffer allocated past the first 32');
  for (const b of out) pool.put(b);
});

t.test('kept buffers count as out: the bound holds the peak until the pool is idle for a while', async (t) => {
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
