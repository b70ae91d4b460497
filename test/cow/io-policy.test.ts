// The page-cache fast path must give way to the threadpool once a call is slow,
// and come back once the slow spell has passed.
import t, { type Test } from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { FileDevice, IoPolicy, SMALL_WRITE_BYTES } from '../../cow/device.js';

/** A file of `bytes` in a directory removed after the test. */
async function tempFile(t: Test, bytes: Buffer): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-io-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'f');
  writeFileSync(path, bytes);
  return path;
}

function spin(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end);
}

t.test('a slow synchronous call sends the next calls to the threadpool for a while', async (t) => {
  // Thresholds far above scheduling noise: with a 2 ms one, a fast call preempted on a
  // busy 2-core machine (a CI run beside a build) counted as slow.
  const p = new IoPolicy(true, 50, 300, 1 << 20);
  t.ok(p.useSync(4096), 'sync while calls are fast');
  p.timed(() => {});
  t.ok(p.useSync(4096), 'still sync after a fast call');
  t.notOk(p.useSync(2 << 20), 'large transfers always go to the threadpool');
  t.ok(p.useSync(256 << 10, true), 'reads up to 256 KiB stay on the loop');
  t.notOk(p.useSync(1 << 20, true), 'a 1 MiB read goes to the threadpool: the loop sends its reply meanwhile');
  t.ok(p.useSync(1 << 20), 'a 1 MiB write stays on the loop');
  p.timed(() => spin(60));
  t.notOk(p.useSync(4096), 'threadpool after a slow call');
  await new Promise((r) => setTimeout(r, 350));
  t.ok(p.useSync(4096), 'sync again once the spell is over');
  t.equal(p.syncCalls, 2);
});

t.test('costly small writes (median of 16) take the threadpool for a while; large ones and reads are not counted', async (t) => {
  // 100 µs threshold, 200 ms spell; spins of 0.5 ms are costly, empty calls are not
  // (an empty call can still take tens of µs once, when it is first compiled or a GC hits).
  const p = new IoPolicy(true, 50, 300, 1 << 20, 256 << 10, 100, 200);
  for (let i = 0; i < 16; i++) p.timedWrite(1 << 20, () => spin(0.5));
  t.ok(p.useSync(4096), 'costly 1 MiB writes say nothing about small ones');
  for (let i = 0; i < 10; i++) p.timedWrite(4096, () => {});
  for (let i = 0; i < 6; i++) p.timedWrite(4096, () => spin(0.5));
  t.ok(p.useSync(4096), '6 costly of 16: the median is cheap, small writes stay on the loop');
  for (let i = 0; i < 15; i++) p.timedWrite(4096, () => spin(0.5));
  t.ok(p.useSync(4096), 'no decision before the sample of 16 is complete');
  p.timedWrite(4096, () => {});
  t.notOk(p.useSync(4096), '15 costly of 16: small writes take the threadpool');
  t.notOk(p.useSync(SMALL_WRITE_BYTES), 'up to SMALL_WRITE_BYTES');
  t.ok(p.useSync(SMALL_WRITE_BYTES + 1), 'larger writes stay on the loop');
  t.ok(p.useSync(4096, true), 'reads stay on the loop');
  await new Promise((r) => setTimeout(r, 250));
  t.ok(p.useSync(4096), 'back on the loop once the spell is over, to be timed again');
  for (let i = 0; i < 16; i++) p.timedWrite(4096, () => {});
  t.ok(p.useSync(4096), 'cheap again: they stay');
  t.equal(p.syncCalls, 16 + 16 + 16 + 16, 'every timed write counted as a sync call');
});

t.test('errors from the synchronous path still reject', async (t) => {
  const p = new IoPolicy(true);
  t.throws(
    () =>
      p.timed(() => {
        throw new Error('EIO');
      }),
    /EIO/,
  );
  t.ok(p.useSync(1), 'a fast failure does not switch paths');
  t.notOk(new IoPolicy(false).useSync(1), 'COWBD_SYNC_IO=0 disables the fast path');
});

t.test('FileDevice reads and writes the same bytes on both paths, zero-filling past the end', async (t) => {
  const path = await tempFile(t, Buffer.alloc(8192, 7));
  const dev = await FileDevice.open(path);
  t.teardown(() => dev.close());
  await dev.write(Buffer.alloc(4096, 1), 0); // sync path
  await dev.write(Buffer.alloc(3 << 20, 2), 4096); // threadpool path, grows the file
  t.equal(dev.size, 4096 + (3 << 20));
  const a = Buffer.alloc(8192);
  await dev.read(a, 0);
  t.equal(a[0], 1);
  t.equal(a[4096], 2);
  const tail = Buffer.alloc(8192, 9);
  await dev.read(tail, dev.size - 4096); // half past the end
  t.equal(tail[0], 2);
  t.equal(tail[4096], 0, 'bytes past the end read as zeros');
  const past = Buffer.alloc(4096, 9);
  await dev.read(past, dev.size + 4096);
  t.equal(
    past.every((b) => b === 0),
    true,
    'a read wholly past the end is zeros',
  );
  t.ok(dev.io.syncCalls >= 3 && dev.io.asyncCalls >= 1, `sync ${dev.io.syncCalls}, async ${dev.io.asyncCalls}`);
});

t.test('FileDevice.writeDurable writes through its own O_DSYNC descriptor and refuses after close', async (t) => {
  const path = await tempFile(t, Buffer.alloc(4096, 7));
  const dev = await FileDevice.open(path);
  await dev.write(Buffer.alloc(512, 1), 0);
  await dev.writeDurable(Buffer.alloc(512, 3), 512);
  await dev.writeDurable(Buffer.alloc(512, 4), 4096); // grows the file
  t.equal(dev.size, 4608);
  const b = Buffer.alloc(4608);
  await dev.read(b, 0);
  t.same([b[0], b[512], b[1024], b[4096]], [1, 3, 7, 4], 'both descriptors see one file');
  await dev.close();
  await dev.close();
  await t.rejects(dev.writeDurable(Buffer.alloc(512), 0), { code: 'EBADF' }, 'closed is closed for durable writes too');
});
