import t from 'tap';
import { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import * as C from '../../protocol/constants.js';
import { NbdServer } from '../../protocol/server.js';
import { silentLogger } from '../../protocol/logger.js';
import { MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';
import { RawClient } from '../helpers/raw-client.js';
import { clientFlags, goData, option, request } from '../helpers/frames.js';

const disk = new MemoryBackend('disk', 1 << 20);
const ro = new MemoryBackend('ro', 1 << 16, true);
const server = new NbdServer(new MemoryRegistry([disk, ro]), silentLogger);
let port = 0;

t.before(async () => {
  port = (await server.listen({ host: '127.0.0.1', port: 0 })).port!;
});
t.teardown(() => server.close());

const payload = Buffer.alloc(512, 0x5a);
const stream = Buffer.concat([
  clientFlags(),
  option(C.NBD_OPT_GO, goData('disk')),
  request(C.NBD_CMD_WRITE, 4096, 512, 1),
  payload,
  request(C.NBD_CMD_READ, 4096, 512, 2),
  request(C.NBD_CMD_FLUSH, 0, 0, 3),
  request(C.NBD_CMD_DISC, 0, 0, 4),
]);

async function session(splitAt?: number): Promise<Buffer> {
  const c = await RawClient.connect(port);
  if (splitAt === undefined) c.send(stream);
  else {
    c.send(stream.subarray(0, splitAt));
    await sleep(1);
    c.send(stream.subarray(splitAt));
  }
  return c.readAll();
}

t.test('a scripted session split at every byte boundary gives identical replies', async (t) => {
  const whole = await session();
  // greeting 18 + GO info 20+12 + ACK 20 + 3 simple replies (+512 read data)
  t.equal(whole.length, 18 + 32 + 20 + 16 * 3 + 512);
  t.ok(whole.subarray(whole.length - 16 * 2 - 512 + 16 - 16, whole.length).includes(payload), 'read returns written data');
  let bad = 0;
  for (let i = 1; i < stream.length; i++) {
    const got = await session(i);
    if (!got.equals(whole)) bad++;
  }
  t.equal(bad, 0, `${stream.length - 1} split points`);
});

t.test('invalid requests get error replies and the connection lives on', async (t) => {
  const c = await RawClient.connect(port);
  await c.go('disk');
  const cases: [Buffer, number, string][] = [
    [request(C.NBD_CMD_READ, (1 << 20) - 10, 20, 1), C.NBD_EINVAL, 'read out of range'],
    [Buffer.concat([request(C.NBD_CMD_WRITE, (1 << 20) - 10, 20, 2), Buffer.alloc(20)]), C.NBD_ENOSPC, 'write past the end'],
    [request(77, 0, 0, 3), C.NBD_EINVAL, 'unknown command'],
    [request(C.NBD_CMD_READ, 0, 0, 4), C.NBD_EINVAL, 'zero-length read'],
    [request(C.NBD_CMD_READ, 0, C.MAX_REQUEST_SIZE + 1, 5), C.NBD_EINVAL, 'oversized read'],
    [request(C.NBD_CMD_READ, 0, 512, 6, 0x40), C.NBD_EINVAL, 'unknown flag'],
    [request(C.NBD_CMD_FLUSH, 5, 0, 7), C.NBD_EINVAL, 'flush with offset'],
    [request(C.NBD_CMD_BLOCK_STATUS, 0, 512, 8), C.NBD_EINVAL, 'block status without meta context'],
    [request(C.NBD_CMD_READ, 0xffffffffffffff00n, 512, 9), C.NBD_EINVAL, 'huge offset'],
    [request(C.NBD_CMD_TRIM, (1 << 20) - 10, 20, 10), C.NBD_EINVAL, 'trim out of range'],
    [request(C.NBD_CMD_WRITE_ZEROES, (1 << 20) - 10, 20, 11), C.NBD_ENOSPC, 'zero past the end'],
  ];
  for (const [frame, err, what] of cases) {
    c.send(frame);
    const r = await c.simpleReply();
    t.equal(r.error, err, what);
  }
  c.send(request(C.NBD_CMD_READ, 0, 8, 99));
  const ok = await c.simpleReply(8);
  t.equal(ok.error, 0, 'still serving');
  t.equal(ok.cookie, 99);
  c.close();
});

t.test('an oversized write is drained and the stream stays in sync', async (t) => {
  const c = await RawClient.connect(port);
  await c.go('disk');
  const len = C.MAX_REQUEST_SIZE + 4096;
  c.send(request(C.NBD_CMD_WRITE, 0, len, 1));
  const junk = Buffer.alloc(1 << 20, 0xee);
  for (let sent = 0; sent < len; sent += junk.length) c.send(junk.subarray(0, Math.min(junk.length, len - sent)));
  c.send(request(C.NBD_CMD_READ, 0, 16, 2));
  const r1 = await c.simpleReply();
  t.equal(r1.error, C.NBD_EINVAL);
  const r2 = await c.simpleReply(16);
  t.equal(r2.error, 0);
  t.equal(r2.cookie, 2);
  t.notOk(r2.data!.includes(0xee), 'drained payload was not written');
  c.close();
});

t.test('read-only export refuses writes with EPERM and drains the payload', async (t) => {
  const c = await RawClient.connect(port);
  const { flags } = await c.go('ro');
  t.ok(flags & C.NBD_FLAG_READ_ONLY);
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, 0, 100, 1), Buffer.alloc(100, 1)]));
  t.equal((await c.simpleReply()).error, C.NBD_EPERM);
  c.send(request(C.NBD_CMD_TRIM, 0, 100, 2));
  t.equal((await c.simpleReply()).error, C.NBD_EPERM);
  c.send(request(C.NBD_CMD_WRITE_ZEROES, 0, 100, 3));
  t.equal((await c.simpleReply()).error, C.NBD_EPERM);
  c.send(request(C.NBD_CMD_READ, 0, 100, 4));
  const r = await c.simpleReply(100);
  t.equal(r.error, 0);
  t.ok(r.data!.equals(Buffer.alloc(100)));
  c.close();
});

t.test('backend errors map to NBD errors', async (t) => {
  const c = await RawClient.connect(port);
  await c.go('disk');
  disk.failWith = 'EIO';
  c.send(request(C.NBD_CMD_READ, 0, 16, 1));
  t.equal((await c.simpleReply()).error, C.NBD_EIO);
  disk.failWith = 'ENOSPC';
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, 0, 4, 2), Buffer.alloc(4)]));
  t.equal((await c.simpleReply()).error, C.NBD_ENOSPC);
  disk.failWith = 'EWEIRD';
  c.send(request(C.NBD_CMD_FLUSH, 0, 0, 3));
  t.equal((await c.simpleReply()).error, C.NBD_EIO, 'unknown errors become EIO');
  disk.failWith = undefined;
  c.close();
});

t.test('a bad magic closes that connection only', async (t) => {
  const good = await RawClient.connect(port);
  await good.go('disk');
  const bad = await RawClient.connect(port);
  await bad.go('disk');
  const frame = request(C.NBD_CMD_READ, 0, 16, 1);
  frame[0] = 0xff;
  bad.send(frame);
  await bad.closed;
  t.ok(bad.ended, 'bad connection closed');
  good.send(request(C.NBD_CMD_READ, 0, 16, 2));
  t.equal((await good.simpleReply(16)).error, 0, 'other connection unaffected');
  good.close();
});

/** The chunks of one structured reply, up to the one flagged DONE. */
async function replyChunks(c: RawClient): Promise<Awaited<ReturnType<RawClient['chunk']>>[]> {
  const chunks = [];
  for (;;) {
    const ch = await c.chunk();
    chunks.push(ch);
    if (ch.flags & C.NBD_REPLY_FLAG_DONE) return chunks;
  }
}

t.test('structured replies: OFFSET_DATA, OFFSET_HOLE, ERROR and BLOCK_STATUS', async (t) => {
  const c = await RawClient.connect(port);
  await c.go('disk', { structured: true, meta: true });
  disk.data.fill(0, 0, 256 * 1024);
  disk.data.fill(7, 0, 4096);
  disk.data.fill(9, 184 * 1024, 192 * 1024);
  c.send(request(C.NBD_CMD_READ, 0, 256 * 1024, 1));
  const chunks = await replyChunks(c);
  const kinds = chunks.map((ch) => ch.type);
  t.same(kinds, [
    C.NBD_REPLY_TYPE_OFFSET_DATA,
    C.NBD_REPLY_TYPE_OFFSET_HOLE,
    C.NBD_REPLY_TYPE_OFFSET_DATA,
    C.NBD_REPLY_TYPE_OFFSET_HOLE,
    C.NBD_REPLY_TYPE_NONE,
  ]);
  // Reassemble and compare with the backend.
  const img = Buffer.alloc(256 * 1024, 0xff);
  for (const ch of chunks) {
    if (ch.type === C.NBD_REPLY_TYPE_OFFSET_DATA) ch.payload.copy(img, Number(ch.payload.readBigUInt64BE(0)), 8);
    if (ch.type === C.NBD_REPLY_TYPE_OFFSET_HOLE)
      img.fill(0, Number(ch.payload.readBigUInt64BE(0)), Number(ch.payload.readBigUInt64BE(0)) + ch.payload.readUInt32BE(8));
  }
  t.ok(img.equals(disk.data.subarray(0, 256 * 1024)), 'chunks reassemble to the data');

  // One byte where the quick probes of a 4 KiB grain do not look must still end the
  // zero run: 64 KiB..128 KiB, with that byte at 100 KiB + 1000, is no hole.
  disk.data.fill(0, 0, 256 * 1024);
  disk.data.fill(5, 0, 64 * 1024);
  disk.data[100 * 1024 + 1000] = 1;
  disk.data.fill(5, 128 * 1024, 256 * 1024);
  c.send(request(C.NBD_CMD_READ, 0, 256 * 1024, 3));
  const hidden = await replyChunks(c);
  t.same(
    hidden.map((ch) => ch.type),
    [C.NBD_REPLY_TYPE_OFFSET_DATA],
    'a byte hidden inside a grain is data, not hole',
  );
  t.ok(hidden[0]!.payload.subarray(8).equals(disk.data.subarray(0, 256 * 1024)), 'and it is sent');

  c.send(request(C.NBD_CMD_READ, 0, 256 * 1024, 2, C.NBD_CMD_FLAG_DF));
  const df = await c.chunk();
  t.equal(df.type, C.NBD_REPLY_TYPE_OFFSET_DATA, 'DF gives one data chunk');
  t.ok(df.flags & C.NBD_REPLY_FLAG_DONE);

  c.send(request(C.NBD_CMD_READ, 1 << 20, 512, 3));
  const err = await c.chunk();
  t.equal(err.type, C.NBD_REPLY_TYPE_ERROR);
  t.equal(err.payload.readUInt32BE(0), C.NBD_EINVAL);

  c.send(request(C.NBD_CMD_BLOCK_STATUS, 0, 8192, 4));
  const bs = await c.chunk();
  t.equal(bs.type, C.NBD_REPLY_TYPE_BLOCK_STATUS);
  t.equal(bs.payload.readUInt32BE(0), C.BASE_ALLOCATION_ID);
  t.same(
    [bs.payload.readUInt32BE(4), bs.payload.readUInt32BE(8), bs.payload.readUInt32BE(12), bs.payload.readUInt32BE(16)],
    [4096, 0, 4096, 3],
  );

  c.send(request(C.NBD_CMD_BLOCK_STATUS, 0, 8192, 5, C.NBD_CMD_FLAG_REQ_ONE));
  const one = await c.chunk();
  t.equal(one.payload.length, 12, 'REQ_ONE gives one extent');

  c.send(request(C.NBD_CMD_FLUSH, 0, 0, 6));
  t.equal((await c.chunk()).type, C.NBD_REPLY_TYPE_NONE);
  c.close();
});

t.test('many requests in flight, replies out of order', async (t) => {
  const slow = new MemoryBackend('slow', 1 << 20);
  const orig = slow.pread.bind(slow);
  let running = 0;
  let peak = 0;
  slow.pread = async (buf, off) => {
    running++;
    peak = Math.max(peak, running);
    await sleep(off === 0 ? 30 : 1);
    running--;
    return orig(buf, off);
  };
  const s2 = new NbdServer(new MemoryRegistry([slow]), silentLogger, { maxInFlight: 16 });
  const p = (await s2.listen({ port: 0 })).port!;
  const c = await RawClient.connect(p);
  await c.go('');
  const frames = [];
  for (let i = 0; i < 64; i++) frames.push(request(C.NBD_CMD_READ, i * 512, 512, i + 1));
  c.send(Buffer.concat(frames));
  const cookies = [];
  for (let i = 0; i < 64; i++) cookies.push((await c.simpleReply(512)).cookie);
  t.same(
    [...cookies].sort((a, b) => a - b),
    [...Array(64).keys()].map((i) => i + 1),
    'every request answered once',
  );
  t.not(cookies[0], 1, 'the slow first request was overtaken');
  t.ok(peak <= 16, `requests in flight capped (peak ${peak})`);
  t.ok(peak > 1, 'requests ran concurrently');
  c.close();
  await s2.close();
});

t.test('large writes streamed back to back, with reads between them, in one send', async (t) => {
  // Large writes switch the socket to header-sized reads between payloads; a read
  // request, a small write and a header split across sends must all still parse.
  const c = await RawClient.connect(port);
  await c.go('disk');
  const big = (k: number) => Buffer.alloc(256 * 1024, 0x30 + k);
  const frames: Buffer[] = [];
  for (let k = 0; k < 3; k++) frames.push(request(C.NBD_CMD_WRITE, k * 256 * 1024, 256 * 1024, 10 + k), big(k));
  frames.push(request(C.NBD_CMD_READ, 0, 8, 20));
  frames.push(request(C.NBD_CMD_WRITE, 768 * 1024, 16, 21), Buffer.alloc(16, 0x77));
  frames.push(request(C.NBD_CMD_WRITE, 512 * 1024, 256 * 1024, 22), big(9));
  const all = Buffer.concat(frames);
  // Header of the last write split in the middle.
  const cut = all.length - 256 * 1024 - 14;
  c.send(all.subarray(0, cut));
  await sleep(5);
  c.send(all.subarray(cut));
  const errors = new Map<number, number>();
  let readData: Buffer | undefined;
  for (let i = 0; i < 6; i++) {
    // Replies may come in any order: only the read's (cookie 20) carries data.
    const h = await c.read(16);
    const cookie = h.readUInt32BE(12);
    errors.set(cookie, h.readUInt32BE(4));
    if (cookie === 20) readData = await c.read(8);
  }
  t.same(
    [...errors.keys()].sort((a, b) => a - b),
    [10, 11, 12, 20, 21, 22],
    'one reply per request',
  );
  t.same(readData, Buffer.alloc(8, 0x30), 'the read between large writes saw the first write');
  t.same([...errors.values()], [0, 0, 0, 0, 0, 0], 'six replies, no errors');
  t.ok(
    disk.data.subarray(0, 256 * 1024).equals(big(0)) && disk.data.subarray(256 * 1024, 512 * 1024).equals(big(1)),
    'first payloads intact',
  );
  t.ok(disk.data.subarray(512 * 1024, 768 * 1024).equals(big(9)), 'the write whose header was split landed');
  t.ok(disk.data.subarray(768 * 1024, 768 * 1024 + 16).equals(Buffer.alloc(16, 0x77)), 'the small write landed');
  c.close();
});

t.test('a backend may keep a write payload past its reply: no later request reuses it until given back', async (t) => {
  // The write-behind table holds writes in the request's own buffer (KeepPayload).
  const keeper = new MemoryBackend('keeper', 1 << 20);
  const kept: Array<{ buf: Buffer; copy: Buffer; giveBack: () => void }> = [];
  keeper.pwrite = async (buf, _off, _fua, keep) => {
    if (!keep) throw new Error('pooled payloads come with keep');
    kept.push({ buf, copy: Buffer.from(buf), giveBack: keep() });
  };
  const s2 = new NbdServer(new MemoryRegistry([keeper]), silentLogger);
  const p = (await s2.listen({ port: 0 })).port!;
  t.teardown(() => s2.close());
  const c = await RawClient.connect(p);
  await c.go('');
  const size = 64 * 1024;
  for (let k = 0; k < 8; k++) c.send(Buffer.concat([request(C.NBD_CMD_WRITE, k * size, size, k + 1), Buffer.alloc(size, 0x40 + k)]));
  for (let k = 0; k < 8; k++) t.equal((await c.simpleReply(0)).error, 0);
  t.equal(kept.length, 8);
  t.equal(new Set(kept.map((k) => k.buf.buffer)).size, 8, 'every kept payload has memory of its own');
  t.ok(
    kept.every((k) => k.buf.equals(k.copy)),
    'kept payloads unchanged by the requests after them',
  );
  for (const k of kept) {
    k.giveBack();
    k.giveBack(); // idempotent: a buffer goes back to the pool once
  }
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, 0, size, 20), Buffer.alloc(size, 0x7f)]));
  t.equal((await c.simpleReply(0)).error, 0);
  t.ok(
    kept.slice(0, 8).some((k) => k.buf.buffer === kept[8]!.buf.buffer),
    'given back, a buffer serves the next request',
  );
  c.close();
});

/** Records the chunk lengths each call to net.Socket's write methods carries, on the server's side of `localPort`. */
function recordSocketWrites(t: { teardown(fn: () => void): void }, localPort: number): number[][] {
  const calls: number[][] = [];
  type Writev = (this: Socket, chunks: { chunk: Buffer }[], cb: unknown) => unknown;
  type Write = (this: Socket, chunk: Buffer, enc: unknown, cb: unknown) => unknown;
  const proto = Socket.prototype as unknown as { _writev: Writev; _write: Write };
  const origWritev = proto._writev;
  const origWrite = proto._write;
  proto._writev = function (this: Socket, chunks: { chunk: Buffer }[], cb: unknown) {
    if (this.localPort === localPort) calls.push(chunks.map((c) => c.chunk.length));
    return origWritev.call(this, chunks, cb);
  };
  proto._write = function (this: Socket, chunk: Buffer, enc: unknown, cb: unknown) {
    if (this.localPort === localPort) calls.push([chunk.length]);
    return origWrite.call(this, chunk, enc, cb);
  };
  t.teardown(() => {
    proto._writev = origWritev;
    proto._write = origWrite;
  });
  return calls;
}

/** Sends 16 READs of 4 KiB in one go; returns the socket write calls their replies took. */
async function sixteenSmallReads(t: { equal(a: unknown, b: unknown): void }, c: RawClient, calls: number[][]): Promise<number[][]> {
  calls.length = 0;
  const small: Buffer[] = [];
  for (let i = 0; i < 16; i++) small.push(request(C.NBD_CMD_READ, i * 4096, 4096, 100 + i));
  c.send(Buffer.concat(small));
  for (let i = 0; i < 16; i++) t.equal((await c.simpleReply(4096)).error, 0);
  return calls.splice(0);
}

/** Sends 4 READs of 256 KiB in one go and checks each reply's bytes. */
async function fourBigReads(t: { ok(v: unknown, m: string): void }, c: RawClient): Promise<void> {
  const big: Buffer[] = [];
  for (let i = 0; i < 4; i++) big.push(request(C.NBD_CMD_READ, i * 256 * 1024, 256 * 1024, 200 + i));
  c.send(Buffer.concat(big));
  for (let i = 0; i < 4; i++) {
    const r = await c.simpleReply(256 * 1024);
    t.ok(
      r.error === 0 && r.data!.equals(disk.data.subarray((r.cookie - 200) * 256 * 1024, (r.cookie - 199) * 256 * 1024)),
      `big reply ${r.cookie} intact`,
    );
  }
}

t.test('on the event loop, replies of one turn share a writev up to UNCORK_AT_BYTES; big ones leave one by one', async (t) => {
  const onLoop = new NbdServer(new MemoryRegistry([disk]), silentLogger, { threadpoolSendBytes: 0 });
  const p = (await onLoop.listen({ host: '127.0.0.1', port: 0 })).port!;
  t.teardown(() => onLoop.close());
  const calls = recordSocketWrites(t, p);
  const c = await RawClient.connect(p);
  await c.go('disk');
  const smallCalls = await sixteenSmallReads(t, c, calls);
  // One call when the 16 requests arrive in one read; a second read would make two.
  t.ok(
    smallCalls.length <= 2,
    `16 small replies left in ${smallCalls.length} call(s) (${smallCalls.map((x) => x.length).join(', ')} chunks), not one each`,
  );
  await fourBigReads(t, c);
  const bigCalls = calls.splice(0);
  const most = Math.max(...bigCalls.map((x) => x.reduce((a, b) => a + b, 0)));
  t.ok(bigCalls.length >= 2, `4 replies of 256 KiB left in ${bigCalls.length} calls`);
  t.ok(most < 2 * 256 * 1024, `no call carried two of them (largest ${most} bytes)`);
  c.close();
});

t.test('by default, big replies leave from the threadpool and small ones still share a writev', async (t) => {
  const calls = recordSocketWrites(t, port);
  const c = await RawClient.connect(port);
  await c.go('disk');
  const smallCalls = await sixteenSmallReads(t, c, calls);
  t.ok(smallCalls.length >= 1 && smallCalls.length <= 2, `16 small replies left through the socket in ${smallCalls.length} call(s)`);
  await fourBigReads(t, c);
  const onSocket = calls.splice(0).reduce((n, x) => n + x.reduce((a, b) => a + b, 0), 0);
  // What the kernel does not take at once goes on through the socket; on loopback it takes all.
  t.ok(onSocket < 4 * 256 * 1024, `most of the 1 MiB of big replies left from the threadpool (${onSocket} bytes through the socket)`);
  c.close();
});
