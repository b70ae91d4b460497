import t from 'tap';
import * as C from '../../protocol/constants.js';
import {
  decodeRequest,
  encodeRequest,
  encodeSimpleReply,
  encodeOptionReply,
  encodeStructuredError,
  encodeOffsetHole,
  encodeBlockStatus,
  encodeOffsetDataHeader,
  encodeStructuredNone,
} from '../../protocol/wire.js';
import { greeting, transmissionFlags } from '../../protocol/handshake.js';
import { ByteQueue } from '../../protocol/byte-queue.js';
import { ALL_CAPABILITIES } from '../../protocol/backend.js';

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');

t.test('request header decodes from spec bytes', async (t) => {
  const b = hex('25609513 0001 0001 0102030405060708 0000000000001000 00000200');
  const r = decodeRequest(b)!;
  t.same(r, { flags: 1, type: C.NBD_CMD_WRITE, cookieHi: 0x01020304, cookieLo: 0x05060708, offset: 4096n, length: 512 });
  t.same(encodeRequest(r), b, 'round trip');
  t.equal(decodeRequest(hex('25609514 0000 0000 0000000000000000 0000000000000000 00000000')), undefined, 'bad magic');
});

t.test('64-bit offsets stay bigint', async (t) => {
  const r = decodeRequest(hex('25609513 0000 0000 0000000000000000 ffffffffffffffff 00000001'))!;
  t.equal(r.offset, 0xffffffffffffffffn);
});

t.test('greeting is NBDMAGIC IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', async (t) => {
  t.same(greeting(), hex('4e42444d41474943 49484156454f5054 0003'));
});

t.test('simple reply', async (t) => {
  t.same(encodeSimpleReply(C.NBD_EIO, { cookieHi: 0xdeadbeef, cookieLo: 1 }), hex('67446698 00000005 deadbeef00000001'));
});

t.test('option reply', async (t) => {
  t.same(encodeOptionReply(C.NBD_OPT_LIST, C.NBD_REP_ERR_UNSUP, Buffer.from('x')), hex('0003e889045565a9 00000003 80000001 00000001 78'));
  t.same(encodeOptionReply(C.NBD_OPT_GO, C.NBD_REP_ACK), hex('0003e889045565a9 00000007 00000001 00000000'));
});

t.test('structured replies', async (t) => {
  const c = { cookieHi: 0, cookieLo: 9 };
  t.same(encodeStructuredNone(c), hex('668e33ef 0001 0000 0000000000000009 00000000'));
  t.same(encodeOffsetHole(c, false, 65536, 4096), hex('668e33ef 0000 0002 0000000000000009 0000000c 0000000000010000 00001000'));
  t.same(encodeOffsetDataHeader(c, true, 512, 3), hex('668e33ef 0001 0001 0000000000000009 0000000b 0000000000000200'));
  t.same(encodeStructuredError(c, C.NBD_EIO, 'ab'), hex('668e33ef 0001 8001 0000000000000009 00000008 00000005 0002 6162'));
  t.same(encodeStructuredError(c, C.NBD_EIO, '', 7), hex('668e33ef 0001 8002 0000000000000009 0000000e 00000005 0000 0000000000000007'));
  t.same(
    encodeBlockStatus(c, 1, [{ length: 4096, flags: 3 }]),
    hex('668e33ef 0001 0005 0000000000000009 0000000c 00000001 00001000 00000003'),
  );
});

t.test('transmission flags advertise exactly the capabilities', async (t) => {
  const info = {
    name: 'x',
    description: '',
    size: 1,
    readOnly: false,
    ...ALL_CAPABILITIES,
  };
  t.equal(transmissionFlags(info, false), 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800);
  const ro = transmissionFlags({ ...info, readOnly: true }, false);
  t.ok(ro & C.NBD_FLAG_READ_ONLY);
  t.notOk(ro & C.NBD_FLAG_SEND_TRIM, 'no trim on read-only');
  t.notOk(ro & C.NBD_FLAG_SEND_WRITE_ZEROES, 'no zeroes on read-only');
  t.ok(transmissionFlags(info, true) & C.NBD_FLAG_SEND_DF, 'DF only with structured replies');
});

t.test('byte queue hands out views and copies across chunks', async (t) => {
  const q = new ByteQueue();
  q.push(hex('0102'));
  q.push(hex('030405'));
  t.equal(q.length, 5);
  t.same(q.take(1), hex('01'));
  t.same(q.take(3), hex('020304'), 'spans chunks');
  t.equal(q.skip(10), 1);
  t.equal(q.length, 0);
  t.throws(() => q.take(1));
});

t.test('byte queue detaches leftovers from a buffer the socket will reuse', async (t) => {
  const stage = Buffer.from('abcdefgh');
  const q = new ByteQueue();
  q.push(Buffer.from('XY'));
  q.push(stage.subarray(0, 6));
  t.equal(q.take(3).toString(), 'XYa');
  q.detach(stage.buffer);
  stage.fill('z');
  t.equal(q.length, 5);
  t.equal(q.take(5).toString(), 'bcdef', 'leftovers survive the reuse');
  const other = Buffer.from('keep');
  q.push(other);
  q.detach(stage.buffer);
  t.equal(q.take(4).buffer, other.buffer, 'chunks of other buffers stay views');
});

t.test('buffer pool reuses buffers, kept off the page boundary', async (t) => {
  const { BufferPool } = await import('../../protocol/buffer-pool.js');
  const pool = new BufferPool();
  const a = pool.get(1 << 20);
  t.equal(a.length, 1 << 20);
  t.not(a.byteOffset % 4096, 0, 'not page-aligned within its memory');
  pool.put(a);
  const b = pool.get(1000 * 1024);
  t.equal(b.buffer, a.buffer, 'same memory again, as a view of the right length');
  t.equal(b.length, 1000 * 1024);
  pool.put(b);
  pool.put(Buffer.alloc(4096)); // not ours: ignored
  t.equal(pool.get(4096).length, 4096);
  const huge = pool.get((4 << 20) + 1);
  t.equal(huge.length, (4 << 20) + 1, 'beyond the largest class: allocated as asked');
  pool.put(huge);
});
