// protocol/replies.ts: the frames of simple and structured replies, byte for byte
// against hand-written hex (NBD spec, "Simple reply message" and "Structured reply chunk").
import t from 'tap';
import * as C from '../../protocol/constants.js';
import { encodeReply } from '../../protocol/replies.js';
import type { Request } from '../../protocol/wire.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const req = (type: number, offset: number, length: number, flags = 0): Request => ({
  type,
  flags,
  cookieHi: 0x01020304,
  cookieLo: 0xa0b0c0d0,
  offset: BigInt(offset),
  length,
});
const COOKIE = '01020304 a0b0c0d0';
const KiB = 1024;

/** Frames as hex, data frames named by their length and first byte so a mismatch reads well. */
function describe(frames: Buffer[], data?: Buffer): string[] {
  return frames.map((f) => (data && f.buffer === data.buffer ? `data ${f.byteOffset - data.byteOffset}+${f.length}` : f.toString('hex')));
}
const h = (s: string) => s.replace(/\s+/g, '');

t.test('simple replies: magic, error, cookie; read data follows only on success', async (t) => {
  t.same(encodeReply(req(C.NBD_CMD_WRITE, 0, 512), { error: 0 }, false), [hex(`67446698 00000000 ${COOKIE}`)]);
  const data = Buffer.from('hello');
  const ok = encodeReply(req(C.NBD_CMD_READ, 0, 5), { error: 0, data }, false);
  t.equal(ok.length, 2);
  t.same(ok[0], hex(`67446698 00000000 ${COOKIE}`));
  t.equal(ok[1], data, 'the data buffer itself, not a copy');
  t.same(
    encodeReply(req(C.NBD_CMD_READ, 0, 5), { error: C.NBD_EIO, data, message: 'x' }, false),
    [hex(`67446698 00000005 ${COOKIE}`)],
    'an error sends no data, and no message',
  );
  t.same(encodeReply(req(C.NBD_CMD_WRITE, 0, 5), { error: C.NBD_ENOSPC }, false), [hex(`67446698 0000001c ${COOKIE}`)]);
  t.same(encodeReply(req(C.NBD_CMD_FLUSH, 0, 0), { error: C.NBD_EPERM }, false), [hex(`67446698 00000001 ${COOKIE}`)]);
});

t.test('structured: success without data is one NONE chunk with DONE', async (t) => {
  for (const type of [C.NBD_CMD_WRITE, C.NBD_CMD_FLUSH, C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_CACHE]) {
    t.same(
      encodeReply(req(type, 0, 512), { error: 0 }, true),
      [hex(`668e33ef 0001 0000 ${COOKIE} 00000000`)],
      C.COMMAND_NAMES[type] ?? String(type),
    );
  }
  t.same(
    encodeReply(req(C.NBD_CMD_BLOCK_STATUS, 0, 512), { error: 0 }, true),
    [hex(`668e33ef 0001 0000 ${COOKIE} 00000000`)],
    'block status without extents',
  );
});

t.test('structured errors: ERROR, or ERROR_OFFSET when the offset is known', async (t) => {
  t.same(encodeReply(req(C.NBD_CMD_WRITE, 0, 512), { error: C.NBD_ENOSPC, message: 'full' }, true), [
    hex(`668e33ef 0001 8001 ${COOKIE} 0000000a  0000001c 0004 ${Buffer.from('full').toString('hex')}`),
  ]);
  t.same(encodeReply(req(C.NBD_CMD_READ, 0, 512), { error: C.NBD_EIO, message: 'bad', errorOffset: 0x123456789 }, true), [
    hex(`668e33ef 0001 8002 ${COOKIE} 00000011  00000005 0003 626164 0000000123456789`),
  ]);
  t.same(
    encodeReply(req(C.NBD_CMD_FLUSH, 0, 0), { error: C.NBD_EPERM }, true),
    [hex(`668e33ef 0001 8001 ${COOKIE} 00000006  00000001 0000`)],
    'no message: an empty one',
  );
  const long = encodeReply(req(C.NBD_CMD_READ, 0, 1), { error: C.NBD_EIO, message: 'm'.repeat(5000) }, true)[0]!;
  t.equal(long.readUInt16BE(24), 1024, 'the message is cut to 1024 bytes');
  t.equal(long.readUInt32BE(16), 6 + 1024, 'and the chunk length with it');
  t.equal(long.length, 20 + 6 + 1024);
  const data = Buffer.alloc(512, 1);
  t.equal(encodeReply(req(C.NBD_CMD_READ, 0, 512), { error: C.NBD_EIO, data }, true).length, 1, 'a failed read sends no data');
});

t.test('structured read under 64 KiB: one OFFSET_DATA chunk with DONE, zeros or not', async (t) => {
  const data = Buffer.alloc(4 * KiB, 0x11);
  const frames = encodeReply(req(C.NBD_CMD_READ, 0x10000, data.length), { error: 0, data }, true);
  t.same(describe(frames, data), [h(`668e33ef 0001 0001 ${COOKIE} 00001008 0000000000010000`), 'data 0+4096']);
  const zeros = Buffer.alloc(60 * KiB);
  t.same(
    describe(encodeReply(req(C.NBD_CMD_READ, 0, zeros.length), { error: 0, data: zeros }, true), zeros),
    [h(`668e33ef 0001 0001 ${COOKIE} 0000f008 0000000000000000`), 'data 0+61440'],
    'zeros too short for a hole',
  );
});

t.test('structured read of 64 KiB of zeros: one OFFSET_HOLE, then NONE with DONE', async (t) => {
  const zeros = Buffer.alloc(64 * KiB);
  const frames = encodeReply(req(C.NBD_CMD_READ, 4096, zeros.length), { error: 0, data: zeros }, true);
  t.same(describe(frames, zeros), [
    h(`668e33ef 0000 0002 ${COOKIE} 0000000c 0000000000001000 00010000`),
    h(`668e33ef 0001 0000 ${COOKIE} 00000000`),
  ]);
});

t.test('structured read with DF: never split, holes or not', async (t) => {
  const zeros = Buffer.alloc(128 * KiB);
  const frames = encodeReply(req(C.NBD_CMD_READ, 0, zeros.length, C.NBD_CMD_FLAG_DF), { error: 0, data: zeros }, true);
  t.same(describe(frames, zeros), [h(`668e33ef 0001 0001 ${COOKIE} 00020008 0000000000000000`), 'data 0+131072']);
});

t.test('structured read: data, a long aligned zero run as a hole, data again', async (t) => {
  // 8 KiB data | 64 KiB zeros | 4 KiB data, read at offset 1 MiB.
  const data = Buffer.alloc(76 * KiB);
  data.fill(0x22, 0, 8 * KiB);
  data.fill(0x33, 72 * KiB);
  const frames = encodeReply(req(C.NBD_CMD_READ, 1 << 20, data.length), { error: 0, data }, true);
  t.same(describe(frames, data), [
    h(`668e33ef 0000 0001 ${COOKIE} 00002008 0000000000100000`),
    'data 0+8192',
    h(`668e33ef 0000 0002 ${COOKIE} 0000000c 0000000000102000 00010000`),
    h(`668e33ef 0001 0001 ${COOKIE} 00001008 0000000000112000`),
    'data 73728+4096',
  ]);
});

t.test('structured read: zero runs count only in whole 4 KiB grains', async (t) => {
  // One non-zero byte in the last byte of the first grain and in the first byte of the grain
  // after 64 KiB of zeros: the zero run is exactly 16 grains, so it is a hole.
  const data = Buffer.alloc(96 * KiB);
  data[4095] = 1;
  data[68 * KiB] = 1;
  const frames = encodeReply(req(C.NBD_CMD_READ, 0, data.length), { error: 0, data }, true);
  t.same(describe(frames, data), [
    h(`668e33ef 0000 0001 ${COOKIE} 00001008 0000000000000000`),
    'data 0+4096',
    h(`668e33ef 0000 0002 ${COOKIE} 0000000c 0000000000001000 00010000`),
    h(`668e33ef 0001 0001 ${COOKIE} 00007008 0000000000011000`),
    'data 69632+28672',
  ]);
  // A byte in the middle of the run (at 2048 into a grain, a spot the quick check reads) breaks it.
  data[36 * KiB + 2048] = 1;
  const split = encodeReply(req(C.NBD_CMD_READ, 0, data.length), { error: 0, data }, true);
  t.same(describe(split, data), [h(`668e33ef 0001 0001 ${COOKIE} 00018008 0000000000000000`), 'data 0+98304'], 'no run of 16 grains left');
  // A byte in the grain at a spot the quick check does not read is still found.
  data[36 * KiB + 2048] = 0;
  data[36 * KiB + 100] = 1;
  const slow = encodeReply(req(C.NBD_CMD_READ, 0, data.length), { error: 0, data }, true);
  t.same(describe(slow, data), [h(`668e33ef 0001 0001 ${COOKIE} 00018008 0000000000000000`), 'data 0+98304'], 'found by the full compare');
});

t.test('structured read ending in a hole, and a tail shorter than a grain', async (t) => {
  const data = Buffer.alloc(64 * KiB + 4 * KiB + 100);
  data.fill(0x44, 0, 4 * KiB);
  const frames = encodeReply(req(C.NBD_CMD_READ, 0, data.length), { error: 0, data }, true);
  t.same(
    describe(frames, data),
    [
      h(`668e33ef 0000 0001 ${COOKIE} 00001008 0000000000000000`),
      'data 0+4096',
      h(`668e33ef 0000 0002 ${COOKIE} 0000000c 0000000000001000 00010000`),
      h(`668e33ef 0001 0001 ${COOKIE} 0000006c 0000000000011000`),
      'data 69632+100',
    ],
    'the partial grain at the end goes as data',
  );
});

t.test('block status: one BLOCK_STATUS chunk for base:allocation, with DONE', async (t) => {
  const frames = encodeReply(
    req(C.NBD_CMD_BLOCK_STATUS, 0, 8192),
    {
      error: 0,
      extents: [
        { length: 4096, flags: 0 },
        { length: 0x10000, flags: 3 },
      ],
    },
    true,
  );
  t.same(frames, [hex(`668e33ef 0001 0005 ${COOKIE} 00000014 00000001  00001000 00000000  00010000 00000003`)]);
  t.equal(C.BASE_ALLOCATION_ID, 1);
});
