// The transmission-phase request parser fed raw bytes (written as hex), whole, split
// at every position into two chunks, and byte by byte: the same requests come out.
import t, { type Test } from 'tap';
import * as C from '../../protocol/constants.js';
import { BufferPool } from '../../protocol/buffer-pool.js';
import { ByteQueue } from '../../protocol/byte-queue.js';
import * as P from '../../protocol/request-parser.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

// Request headers, as proto.md lays them out:
// NBD_REQUEST_MAGIC, command flags (16), type (16), cookie (64), offset (64), length (32).
const READ = '25609513 0000 0000 0000000000000001 0000000000001000 00000200';
const WRITE8 = '25609513 0001 0001 0102030405060708 0000000000002000 00000008' + ' 1122334455667788';
const FLUSH = '25609513 0000 0003 0000000000000003 0000000000000000 00000000';
const ZERO_WRITE = '25609513 0000 0001 0000000000000004 0000000000000000 00000000';
const TRIM = '25609513 0001 0004 00000000deadbeef 0000000000004000 00001000';
const WRITE3 = '25609513 0000 0001 0000000000000006 0000000000000010 00000003' + ' aabbcc';
const BLOCK_STATUS = '25609513 0008 0007 ffffffffffffffff ffffffffffffffff 00000800';
const DISC = '25609513 0000 0002 0000000000000009 0000000000000000 00000000';
const UNKNOWN = '25609513 0040 004d 000000000000000a 0000000000000000 00000001';

/** What a run of the parser produced, one line per result, as a connection would see it. */
interface Run {
  events: string[];
  parser: P.RequestParser;
  queue: ByteQueue;
}

function newRun(maxPayload?: number, pool = new BufferPool()): Run {
  const queue = new ByteQueue();
  return { events: [], queue, parser: new P.RequestParser(queue, pool, maxPayload) };
}

function describe(p: P.RequestParser): string {
  const r = p.request!;
  return `type=${r.type} flags=${r.flags} cookie=${r.cookieHi.toString(16)}:${r.cookieLo.toString(16)} offset=${r.offset} length=${r.length}`;
}

/** Parses all that is buffered, as connection.ts's pumpTransmission does, returning pooled payloads. */
function pump(run: Run, pool: BufferPool): void {
  const p = run.parser;
  for (;;) {
    const result = p.parse(true);
    switch (result) {
      case P.NEED_INPUT:
        return;
      case P.HELD:
        throw new Error('HELD while accepting');
      case P.WRITE_STARTED:
        run.events.push(`write-started ${describe(p)}`);
        break;
      case P.REQUEST:
        run.events.push(`request ${describe(p)}${p.payload ? ` payload=${p.payload.toString('hex')}` : ''}`);
        if (p.pooled) pool.put(p.payload!);
        break;
      case P.OVERSIZED:
        run.events.push(`oversized ${describe(p)}`);
        p.refuse({ error: C.NBD_EINVAL, message: 'too big' });
        break;
      case P.DRAINED:
        run.events.push(`drained ${describe(p)} error=${p.refusal!.error}`);
        break;
      case P.DISCONNECT:
        run.events.push(`disconnect ${describe(p)}`);
        return;
      case P.BAD_MAGIC:
        run.events.push('bad-magic');
        return;
    }
  }
}

function feed(chunks: Buffer[], maxPayload?: number): string[] {
  const pool = new BufferPool();
  const run = newRun(maxPayload, pool);
  for (const c of chunks) {
    // Each chunk in memory of its own, as the socket hands them over.
    run.queue.push(Buffer.from(c));
    pump(run, pool);
    // The connection stops reading at NBD_CMD_DISC or a bad magic.
    if (/^(disconnect|bad-magic)/.test(run.events.at(-1) ?? '')) break;
  }
  return run.events;
}

/** Every split into two chunks, and one byte at a time, against the stream fed whole. */
function checkSplits(t: Test, stream: Buffer, expected: string[], maxPayload?: number): void {
  t.same(feed([stream], maxPayload), expected, 'whole');
  let bad = 0;
  for (let i = 1; i < stream.length; i++) {
    const got = feed([stream.subarray(0, i), stream.subarray(i)], maxPayload);
    if (JSON.stringify(got) !== JSON.stringify(expected)) {
      if (bad === 0) t.same(got, expected, `split at ${i}`);
      bad++;
    }
  }
  t.equal(bad, 0, `${stream.length - 1} split points give the same requests`);
  const bytes = [...stream].map((b) => Buffer.of(b));
  t.same(feed(bytes, maxPayload), expected, 'byte by byte');
}

t.test('a sequence of requests, whole, split at every position and byte by byte', async (t) => {
  const stream = hex([READ, WRITE8, FLUSH, ZERO_WRITE, TRIM, WRITE3, BLOCK_STATUS, UNKNOWN, DISC].join(''));
  checkSplits(t, stream, [
    'request type=0 flags=0 cookie=0:1 offset=4096 length=512',
    'write-started type=1 flags=1 cookie=1020304:5060708 offset=8192 length=8',
    'request type=1 flags=1 cookie=1020304:5060708 offset=8192 length=8 payload=1122334455667788',
    'request type=3 flags=0 cookie=0:3 offset=0 length=0',
    'write-started type=1 flags=0 cookie=0:4 offset=0 length=0',
    'request type=1 flags=0 cookie=0:4 offset=0 length=0 payload=',
    'request type=4 flags=1 cookie=0:deadbeef offset=16384 length=4096',
    'write-started type=1 flags=0 cookie=0:6 offset=16 length=3',
    'request type=1 flags=0 cookie=0:6 offset=16 length=3 payload=aabbcc',
    // Validation is the caller's: an unknown command with unknown flags is still a request.
    'request type=7 flags=8 cookie=ffffffff:ffffffff offset=18446744073709551615 length=2048',
    'request type=77 flags=64 cookie=0:a offset=0 length=1',
    'disconnect type=2 flags=0 cookie=0:9 offset=0 length=0',
  ]);
});

t.test('a write over maxPayload is drained and the stream stays in sync', async (t) => {
  // 20 payload bytes against a limit of 16: refused once they are discarded.
  const big = `25609513 0000 0001 0000000000000007 0000000000000000 00000014${' ee'.repeat(20)}`;
  const stream = hex([big, READ, WRITE8, big, DISC].join(''));
  checkSplits(
    t,
    stream,
    [
      'oversized type=1 flags=0 cookie=0:7 offset=0 length=20',
      `drained type=1 flags=0 cookie=0:7 offset=0 length=20 error=${C.NBD_EINVAL}`,
      'request type=0 flags=0 cookie=0:1 offset=4096 length=512',
      'write-started type=1 flags=1 cookie=1020304:5060708 offset=8192 length=8',
      'request type=1 flags=1 cookie=1020304:5060708 offset=8192 length=8 payload=1122334455667788',
      'oversized type=1 flags=0 cookie=0:7 offset=0 length=20',
      `drained type=1 flags=0 cookie=0:7 offset=0 length=20 error=${C.NBD_EINVAL}`,
      'disconnect type=2 flags=0 cookie=0:9 offset=0 length=0',
    ],
    16,
  );
  // A payload of exactly the limit is received.
  const atLimit = `25609513 0000 0001 0000000000000008 0000000000000000 00000010${' 5a'.repeat(16)}`;
  t.same(feed([hex(atLimit)], 16), [
    'write-started type=1 flags=0 cookie=0:8 offset=0 length=16',
    `request type=1 flags=0 cookie=0:8 offset=0 length=16 payload=${'5a'.repeat(16)}`,
  ]);
});

t.test('the default limit is MAX_REQUEST_SIZE, the largest write a client may send', async (t) => {
  t.equal(C.MAX_REQUEST_SIZE, 64 * 1024 * 1024);
  const over = feed([hex('25609513 0000 0001 0000000000000001 0000000000000000 04000001')]);
  t.same(over, ['oversized type=1 flags=0 cookie=0:1 offset=0 length=67108865']);
  const at = feed([hex('25609513 0000 0001 0000000000000001 0000000000000000 04000000')]);
  t.same(at, ['write-started type=1 flags=0 cookie=0:1 offset=0 length=67108864']);
  // Reads are not held to it here: validate() refuses them with their reply.
  const read = feed([hex('25609513 0000 0000 0000000000000001 0000000000000000 04000001')]);
  t.same(read, ['request type=0 flags=0 cookie=0:1 offset=0 length=67108865']);
});

t.test('a bad magic stops parsing for good, wherever it is split', async (t) => {
  const badMagic = '25609514 0000 0000 0000000000000002 0000000000000000 00000200';
  const stream = hex([READ, badMagic, READ].join(''));
  checkSplits(t, stream, ['request type=0 flags=0 cookie=0:1 offset=4096 length=512', 'bad-magic']);
  const run = newRun();
  run.queue.push(hex(badMagic + READ));
  t.equal(run.parser.parse(true), P.BAD_MAGIC);
  t.equal(run.parser.parse(true), P.BAD_MAGIC, 'the request after it is never parsed');
  t.equal(run.queue.length, 28, 'only the bad header was consumed');
});

t.test('backpressure: no header is read while the caller holds, a payload under way still is', async (t) => {
  const run = newRun();
  const p = run.parser;
  run.queue.push(hex(WRITE8).subarray(0, 28 + 4));
  t.equal(p.parse(false), P.HELD, 'held before a header');
  t.equal(run.queue.length, 28 + 4, 'nothing consumed');
  t.ok(p.betweenRequests);
  t.equal(p.parse(true), P.WRITE_STARTED);
  t.notOk(p.betweenRequests, 'inside a write');
  t.equal(p.parse(false), P.NEED_INPUT, 'half the payload is gathered');
  run.queue.push(hex('55667788'));
  t.equal(p.parse(false), P.REQUEST, 'the payload completes while holding');
  t.equal(p.payload!.toString('hex'), '1122334455667788');
  t.ok(p.pooled, 'a payload across chunks is gathered in a pooled buffer');
  t.ok(p.betweenRequests);
  t.equal(p.parse(false), P.HELD);
});

t.test('a payload inside one chunk is a view of it; across chunks, a pooled buffer', async (t) => {
  const pool = new BufferPool();
  const run = newRun(undefined, pool);
  const chunk = hex(WRITE8);
  run.queue.push(chunk);
  t.equal(run.parser.parse(true), P.WRITE_STARTED);
  t.equal(run.parser.parse(true), P.REQUEST);
  t.notOk(run.parser.pooled);
  t.equal(run.parser.payload!.buffer, chunk.buffer, 'no copy');
  t.equal(run.parser.payload!.byteOffset, chunk.byteOffset + 28);
});

t.test('direct reads: payloads land in their pooled buffer, headers in the stage', async (t) => {
  const pool = new BufferPool();
  const stage = Buffer.alloc(64 * 1024);
  const run = newRun(undefined, pool);
  const p = run.parser;
  p.useDirectReads(stage);
  t.equal(p.nextReadBuffer(), stage, 'the whole stage before any large write');
  // A header read into the stage, as Connection.onRead queues it.
  const size = 128 * 1024;
  run.queue.push(hex(`25609513 0000 0001 0000000000000001 0000000000000000 ${size.toString(16).padStart(8, '0')}`));
  t.equal(p.parse(true), P.WRITE_STARTED);
  t.equal(p.parse(true), P.NEED_INPUT, 'with direct reads even an empty queue takes a pooled buffer');
  const target = p.nextReadBuffer();
  t.equal(target.length, size, 'the read goes straight into the payload buffer');
  t.ok(p.isPayloadBuffer(target));
  t.notOk(p.isPayloadBuffer(stage));
  (target as Buffer).fill(0x61, 0, 1000);
  p.payloadLanded(1000);
  t.equal(p.parse(true), P.NEED_INPUT);
  const rest = p.nextReadBuffer();
  t.equal(rest.length, size - 1000, 'and never past it');
  (rest as Buffer).fill(0x62);
  p.payloadLanded(rest.length);
  t.equal(p.parse(true), P.REQUEST);
  t.ok(p.pooled);
  t.equal(p.payload!.length, size);
  t.ok(p.payload![999] === 0x61 && p.payload![1000] === 0x62 && p.payload![size - 1] === 0x62, 'every byte in place');
  // After a large write, the next header is read alone (28 bytes), then what is missing of it.
  t.equal(p.nextReadBuffer().length, 28);
  run.queue.push(hex(READ).subarray(0, 10));
  t.equal(p.nextReadBuffer().length, 18);
  run.queue.push(hex(READ).subarray(10));
  t.equal(p.parse(true), P.REQUEST);
  t.equal(p.nextReadBuffer(), stage, 'a request without payload ends header-sized reads');
  // A small write in the stage is copied out into a pooled buffer: the stage is read into again.
  run.queue.push(hex(WRITE3));
  t.equal(p.parse(true), P.WRITE_STARTED);
  t.equal(p.parse(true), P.REQUEST);
  t.ok(p.pooled);
  t.equal(p.payload!.toString('hex'), 'aabbcc');
});

t.test('abandon returns a write whose payload never fully arrived', async (t) => {
  const run = newRun();
  run.queue.push(hex(WRITE8).subarray(0, 28 + 6));
  t.equal(run.parser.parse(true), P.WRITE_STARTED);
  t.equal(run.parser.parse(true), P.NEED_INPUT);
  t.equal(run.parser.abandon()?.length, 8);
  t.equal(run.parser.abandon(), undefined, 'once');
  const idle = newRun();
  t.equal(idle.parser.abandon(), undefined, 'nothing between requests');
});
