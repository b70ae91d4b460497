// The caps on work in flight: copies weigh their chunks, and syncs leave half the
// threadpool to reads and writes.
import t from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Limiter } from '../../cow/chunk-locks.js';
import {
  BACKGROUND_CALL_MIN_BYTES,
  BACKGROUND_QUEUE_BYTES,
  FileDevice,
  backgroundGate,
  gated,
  syncGate,
  threadpoolSize,
} from '../../cow/device.js';

const tick = () => new Promise<void>((r) => setImmediate(r));

t.test('a copy of a run weighs its chunks, so the cap is on chunks in flight', async (t) => {
  const l = new Limiter(16);
  t.equal(l.acquire(16), undefined, 'one run of 16 chunks fits');
  const order: string[] = [];
  const second = l.acquire(16)!.then(() => order.push('second run'));
  const single = l.acquire(1)!.then(() => order.push('single chunk'));
  await tick();
  t.same(order, [], 'nothing more while 16 chunks are in flight, a small copy included');
  t.equal(l.inFlight, 16);
  l.release(16);
  await second;
  await tick();
  t.same(order, ['second run'], 'in order of arrival: the small copy does not overtake the run');
  l.release(16);
  await single;
  t.equal(l.inFlight, 1);
  l.release(1);
  t.equal(l.inFlight, 0);
});

t.test('a weight over the cap is clamped to it, so it cannot wait forever', async (t) => {
  const l = new Limiter(4);
  t.equal(l.acquire(64), undefined);
  t.equal(l.inFlight, 4);
  const next = l.acquire(1);
  t.ok(next, 'full');
  l.release(64);
  await next;
  t.equal(l.inFlight, 1);
});

t.test('several small waiters are let in together once room is made', async (t) => {
  const l = new Limiter(3);
  l.acquire(3);
  const w = [l.acquire(1)!, l.acquire(1)!, l.acquire(2)!];
  l.release(3);
  await Promise.all(w.slice(0, 2));
  t.equal(l.inFlight, 2, 'the two single ones run, the third waits for room');
  l.release(1);
  await w[2];
  t.equal(l.inFlight, 3);
});

t.test('the threadpool size comes from UV_THREADPOOL_SIZE, else libuv default', async (t) => {
  t.equal(threadpoolSize({}), 4);
  t.equal(threadpoolSize({ UV_THREADPOOL_SIZE: '9' }), 9);
  t.equal(threadpoolSize({ UV_THREADPOOL_SIZE: 'lots' }), 4);
  t.equal(threadpoolSize({ UV_THREADPOOL_SIZE: '0' }), 4);
  t.equal(threadpoolSize({ UV_THREADPOOL_SIZE: '5000' }), 1024, "libuv's own maximum");
});

t.test('fdatasyncs in flight never take more than half the threadpool', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-gate-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const cap = Math.max(1, Math.floor(threadpoolSize() / 2));
  const devs = await Promise.all(Array.from({ length: 6 }, (_, i) => FileDevice.open(join(dir, `f${i}`), { create: true })));
  t.teardown(() => Promise.all(devs.map((d) => d.close())));
  await Promise.all(devs.map((d) => d.write(Buffer.alloc(1 << 16, 1), 0)));
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, syncGate.inFlight)), 0);
  const syncs = devs.flatMap((d) => [d.sync(), d.sync(), d.sync()]);
  peak = Math.max(peak, syncGate.inFlight);
  t.equal(syncGate.inFlight, cap, `${cap} started at once, the rest queued`);
  await Promise.all(syncs);
  clearInterval(sampler);
  t.ok(peak <= cap, `at most ${cap} in flight (peak ${peak})`);
  t.equal(syncGate.inFlight, 0, 'all released');
});

t.test('background calls queue in our own gate, by bytes, so foreground calls do not wait behind them', async (t) => {
  const gate = new Limiter(8); // 8 units of 64 KiB
  const started: number[] = [];
  const finish: Array<() => void> = [];
  const call = (id: number) => () => {
    started.push(id);
    return new Promise<number>((res) => finish.push(() => res(id)));
  };
  const calls = [gated(128 << 10, call(1), gate), gated(4096, call(2), gate), gated(1 << 20, call(3), gate), gated(4096, call(4), gate)];
  await tick();
  t.same(started, [1, 2], '128 KiB and 4 KiB weigh 256 KiB, 4 units each: the 1 MiB call waits for room');
  t.equal(gate.inFlight, 8);
  finish.shift()!();
  await tick();
  t.same(started, [1, 2], 'the 1 MiB call needs every unit; the later small one does not overtake it');
  finish.shift()!();
  t.equal(await calls[1], 2);
  await tick();
  t.same(started, [1, 2, 3]);
  t.equal(gate.inFlight, 8, 'a call over the gate takes all of it');
  finish.shift()!();
  await tick();
  t.same(started, [1, 2, 3, 4]);
  finish.shift()!();
  t.same(await Promise.all(calls), [1, 2, 3, 4]);
  t.equal(gate.inFlight, 0);
  const failed = gated(4096, () => Promise.reject(new Error('EIO')), gate);
  await t.rejects(failed, /EIO/, 'a failed call reports its error');
  t.equal(gate.inFlight, 0, 'and gives its bytes back');
});

t.test("a file's background reads and writes go through the process's gate", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-bg-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const dev = await FileDevice.open(join(dir, 'f'), { create: true });
  t.teardown(() => dev.close());
  const units = BACKGROUND_QUEUE_BYTES / 65536;
  const writes = Array.from({ length: 12 }, (_, i) => dev.write(Buffer.alloc(1 << 20, i + 1), i << 20, true));
  t.equal(backgroundGate.inFlight, units, 'only the gate’s worth of background writes handed to the pool');
  await Promise.all(writes);
  const buf = Buffer.alloc(1 << 20);
  const read = dev.read(buf, 5 << 20, true);
  t.equal(backgroundGate.inFlight, 16, 'a background read is counted too');
  await read;
  t.equal(buf[0], 6);
  t.equal(backgroundGate.inFlight, 0);
  const fg = dev.write(Buffer.alloc(1 << 20, 9), 0);
  t.equal(backgroundGate.inFlight, 0, 'a foreground write is not');
  await fg;
  const small = Array.from({ length: 40 }, (_, i) => dev.write(Buffer.alloc(4096, i), i * 4096, true));
  // By bytes alone the 40 would weigh 40 units; at 256 KiB each, 32 of them fill the gate.
  t.equal(BACKGROUND_CALL_MIN_BYTES, 256 << 10);
  t.equal(backgroundGate.inFlight, units, 'small background writes weigh 256 KiB each: 32 of the 40 fill the gate');
  await Promise.all(small);
  t.equal(backgroundGate.inFlight, 0);
});
