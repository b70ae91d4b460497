// The reply writer against a Writable that records what each write call hands on,
// as net.Socket hands it to the kernel (one _writev per batch).
import t from 'tap';
import { Writable } from 'node:stream';
import { setImmediate as nextCheckPhase } from 'node:timers/promises';
import * as C from '../../protocol/constants.js';
import type { BufferPool } from '../../protocol/buffer-pool.js';
import { ReplyWriter, UNCORK_AT_BYTES } from '../../protocol/reply-writer.js';
import type { Request } from '../../protocol/wire.js';

/** A socket stand-in: records each call's chunk lengths; `done` decides when the kernel takes them. */
function output(opts: { highWaterMark?: number; hold?: boolean } = {}) {
  const calls: number[][] = [];
  const held: (() => void)[] = [];
  const out = new Writable({
    highWaterMark: opts.highWaterMark,
    writev(chunks, cb) {
      calls.push(chunks.map((c) => (c.chunk as Buffer).length));
      if (opts.hold) held.push(cb);
      else cb();
    },
    write(chunk: Buffer, _enc, cb) {
      calls.push([chunk.length]);
      if (opts.hold) held.push(cb);
      else cb();
    },
  });
  return { out, calls, held };
}

function recordingPool() {
  const returned: Buffer[] = [];
  return { pool: { put: (b: Buffer) => returned.push(b) } as unknown as BufferPool, returned };
}

const read = (cookie: number, length: number): Request => ({
  flags: 0,
  type: C.NBD_CMD_READ,
  cookieHi: 0,
  cookieLo: cookie,
  offset: 0n,
  length,
});

t.test('replies of one turn leave in one write call, in the check phase', async (t) => {
  const { out, calls } = output();
  const { pool, returned } = recordingPool();
  const w = new ReplyWriter(out, pool, 1 << 20);
  const data: Buffer[] = [];
  for (let i = 0; i < 16; i++) {
    data.push(Buffer.alloc(4096, i));
    t.equal(w.reply(read(i, 4096), { error: 0, data: data[i] }, false), false, 'not blocked');
  }
  t.equal(calls.length, 0, 'nothing written during the turn');
  t.equal(returned.length, 0, 'no READ data back in the pool before it is written');
  await nextCheckPhase();
  t.same(calls, [Array.from({ length: 32 }, (_, i) => (i % 2 === 0 ? 16 : 4096))], 'one call: 16 headers and their data');
  await nextCheckPhase();
  t.equal(returned.length, 16, 'every READ buffer back in the pool once written');
  t.ok(returned.every((b, i) => b === data[i]));
  // The next turn batches again.
  w.reply(read(20, 8), { error: 0, data: Buffer.alloc(8) }, false);
  w.reply(read(21, 8), { error: C.NBD_EIO }, false);
  await nextCheckPhase();
  t.same(calls.slice(1), [[16, 8, 16]]);
});

t.test(`the cork is released at once when ${UNCORK_AT_BYTES} bytes are queued`, async (t) => {
  const { out, calls } = output();
  const { pool } = recordingPool();
  const w = new ReplyWriter(out, pool, 64 << 20);
  // Small replies wait for the check phase until a big one brings the queue past the threshold.
  w.reply(read(1, 512), { error: 0, data: Buffer.alloc(512) }, false);
  t.equal(calls.length, 0);
  w.reply(read(2, UNCORK_AT_BYTES - 16 - 528 - 1), { error: 0, data: Buffer.alloc(UNCORK_AT_BYTES - 16 - 528 - 1) }, false);
  t.equal(calls.length, 0, 'one byte short: still corked');
  w.reply(read(3, 1), { error: 0, data: Buffer.alloc(1) }, false);
  t.same(calls, [[16, 512, 16, UNCORK_AT_BYTES - 545, 16, 1]], 'released inside reply(), at the threshold');
  // Each big reply of the same turn leaves on its own.
  calls.length = 0;
  for (let i = 0; i < 4; i++) w.reply(read(10 + i, UNCORK_AT_BYTES), { error: 0, data: Buffer.alloc(UNCORK_AT_BYTES) }, false);
  t.same(
    calls,
    [
      [16, UNCORK_AT_BYTES],
      [16, UNCORK_AT_BYTES],
      [16, UNCORK_AT_BYTES],
      [16, UNCORK_AT_BYTES],
    ],
    'one call per big reply',
  );
  await nextCheckPhase();
  t.equal(calls.length, 4, 'the check phase finds the cork already released');
});

t.test('structured replies are framed by replies.ts: a READ as one OFFSET_DATA chunk', async (t) => {
  const { out, calls } = output();
  const { pool } = recordingPool();
  const w = new ReplyWriter(out, pool, 1 << 20);
  const req = { ...read(5, 4096), flags: C.NBD_CMD_FLAG_DF };
  w.reply(req, { error: 0, data: Buffer.alloc(4096, 1) }, true);
  w.reply(read(6, 4096), { error: C.NBD_EINVAL, message: 'out of range' }, true);
  await nextCheckPhase();
  t.same(calls, [[20 + 8, 4096, 20 + 6 + 'out of range'.length]]);
});

t.test('reports a socket holding more than maxWriteBuffer unsent bytes', async (t) => {
  const { out, held } = output({ highWaterMark: 1024, hold: true });
  const { pool } = recordingPool();
  const w = new ReplyWriter(out, pool, 8192);
  t.equal(
    w.reply(read(1, 4096), { error: 0, data: Buffer.alloc(4096) }, false),
    false,
    'past the stream high-water mark, under maxWriteBuffer',
  );
  t.equal(w.reply(read(2, 4096), { error: 0, data: Buffer.alloc(4096) }, false), true, 'past maxWriteBuffer');
  await nextCheckPhase();
  for (const cb of held.splice(0)) cb();
});

t.test('a destroyed socket gets nothing; READ data goes straight back to the pool', async (t) => {
  const { out, calls } = output();
  const { pool, returned } = recordingPool();
  const w = new ReplyWriter(out, pool, 1 << 20);
  out.destroy();
  const data = Buffer.alloc(512);
  t.equal(w.reply(read(1, 512), { error: 0, data }, false), false);
  w.send(Buffer.alloc(18));
  await nextCheckPhase();
  t.same(calls, []);
  t.same(returned, [data]);
  w.discard({ error: 0, data });
  w.discard({ error: C.NBD_EIO });
  t.equal(returned.length, 2, 'discard returns READ data only');
});

t.test('handshake bytes are written as they come, not corked', async (t) => {
  const { out, calls } = output();
  const { pool } = recordingPool();
  const w = new ReplyWriter(out, pool, 1 << 20);
  w.send(Buffer.alloc(18));
  t.same(calls, [[18]]);
});
