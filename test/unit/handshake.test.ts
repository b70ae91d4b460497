import t from 'tap';
import * as C from '../../protocol/constants.js';
import { Handshake, type HandshakeResult } from '../../protocol/handshake.js';
import { ByteQueue } from '../../protocol/byte-queue.js';
import { silentLogger } from '../../protocol/logger.js';
import { MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';
import { clientFlags, goData, metaData, option, parseOptionReplies, str } from '../helpers/frames.js';

function registry() {
  return new MemoryRegistry([new MemoryBackend('disk', 1 << 20), new MemoryBackend('ro', 4096, true)]);
}

/** Feeds the stream to a fresh Handshake in pieces split at the given points. */
function run(stream: Buffer, splits: number[] = []) {
  const out: Buffer[] = [];
  const hs = new Handshake(registry(), (b) => out.push(b), silentLogger);
  const q = new ByteQueue();
  let result: HandshakeResult = { kind: 'pending' };
  let prev = 0;
  for (const s of [...splits, stream.length]) {
    q.push(stream.subarray(prev, s));
    prev = s;
    const r = hs.pump(q);
    if (r.kind !== 'pending') {
      result = r;
      break;
    }
  }
  return { result, out: Buffer.concat(out), left: q.length };
}

const session = Buffer.concat([
  clientFlags(),
  option(C.NBD_OPT_LIST),
  option(C.NBD_OPT_STRUCTURED_REPLY),
  option(C.NBD_OPT_LIST_META_CONTEXT, metaData('disk', [])),
  option(C.NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])),
  option(99),
  option(C.NBD_OPT_INFO, goData('nope')),
  option(C.NBD_OPT_INFO, goData('disk', [C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION, C.NBD_INFO_BLOCK_SIZE])),
  option(C.NBD_OPT_GO, goData('')),
]);

t.test('a full session negotiates every option', async (t) => {
  const { result, out, left } = run(session);
  t.equal(result.kind, 'go');
  t.equal(left, 0);
  if (result.kind !== 'go') return;
  t.equal(result.negotiated.exportName, 'disk', 'empty name selects the default');
  t.ok(result.negotiated.structured);
  t.ok(result.negotiated.baseAllocation);
  const { replies } = parseOptionReplies(out);
  const types = replies.map((r) => [r.option, r.type >>> 0]);
  t.same(types, [
    [C.NBD_OPT_LIST, C.NBD_REP_SERVER],
    [C.NBD_OPT_LIST, C.NBD_REP_SERVER],
    [C.NBD_OPT_LIST, C.NBD_REP_ACK],
    [C.NBD_OPT_STRUCTURED_REPLY, C.NBD_REP_ACK],
    [C.NBD_OPT_LIST_META_CONTEXT, C.NBD_REP_META_CONTEXT],
    [C.NBD_OPT_LIST_META_CONTEXT, C.NBD_REP_ACK],
    [C.NBD_OPT_SET_META_CONTEXT, C.NBD_REP_META_CONTEXT],
    [C.NBD_OPT_SET_META_CONTEXT, C.NBD_REP_ACK],
    [99, C.NBD_REP_ERR_UNSUP],
    [C.NBD_OPT_INFO, C.NBD_REP_ERR_UNKNOWN],
    [C.NBD_OPT_INFO, C.NBD_REP_INFO],
    [C.NBD_OPT_INFO, C.NBD_REP_INFO],
    [C.NBD_OPT_INFO, C.NBD_REP_INFO],
    [C.NBD_OPT_INFO, C.NBD_REP_INFO],
    [C.NBD_OPT_INFO, C.NBD_REP_ACK],
    [C.NBD_OPT_GO, C.NBD_REP_INFO],
    [C.NBD_OPT_GO, C.NBD_REP_ACK],
  ]);
  const list = replies[0]!.data;
  t.equal(list.toString('utf8', 4, 4 + list.readUInt32BE(0)), 'disk');
  t.match(list.toString('utf8', 8), /memory disk/, 'LIST carries the description');
  const infoExport = replies[10]!.data;
  const goExport = replies[15]!.data;
  t.same(infoExport, goExport, 'INFO and GO report the same size and flags');
  t.equal(Number(infoExport.readBigUInt64BE(2)), 1 << 20);
  const bs = replies[13]!.data;
  t.same([bs.readUInt16BE(0), bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)], [C.NBD_INFO_BLOCK_SIZE, 1, 4096, 32 << 20]);
  t.equal(replies[6]!.data.readUInt32BE(0), C.BASE_ALLOCATION_ID);
  t.equal(replies[6]!.data.toString('utf8', 4), 'base:allocation');
});

t.test('the same session split at every byte boundary gives the same bytes', async (t) => {
  const whole = run(session);
  let bad = 0;
  for (let i = 1; i < session.length; i++) {
    const split = run(session, [i]);
    if (!split.out.equals(whole.out) || split.result.kind !== 'go') bad++;
  }
  t.equal(bad, 0, `${session.length - 1} split points`);
  const bytewise = run(session, [...Array(session.length).keys()].slice(1));
  t.same(bytewise.out, whole.out, 'fed one byte at a time');
});

t.test('EXPORT_NAME sends 124 zeroes unless NO_ZEROES', async (t) => {
  const zeroes = run(Buffer.concat([clientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE), option(C.NBD_OPT_EXPORT_NAME, Buffer.from('disk'))]));
  t.equal(zeroes.result.kind, 'go');
  t.equal(zeroes.out.length, 8 + 2 + 124);
  t.ok(zeroes.out.subarray(10).equals(Buffer.alloc(124)));
  const none = run(Buffer.concat([clientFlags(), option(C.NBD_OPT_EXPORT_NAME, Buffer.from(''))]));
  t.equal(none.out.length, 10);
  t.equal(Number(none.out.readBigUInt64BE(0)), 1 << 20);
});

t.test('EXPORT_NAME of an unknown export closes', async (t) => {
  const r = run(Buffer.concat([clientFlags(), option(C.NBD_OPT_EXPORT_NAME, Buffer.from('nope'))]));
  t.equal(r.result.kind, 'close');
});

t.test('unknown client flags close the connection', async (t) => {
  t.equal(run(clientFlags(0x80)).result.kind, 'close');
  t.equal(run(clientFlags(0)).result.kind, 'close', 'non-fixed newstyle');
});

t.test('bad option magic closes', async (t) => {
  const bad = option(C.NBD_OPT_LIST);
  bad[0] = 0;
  t.equal(run(Buffer.concat([clientFlags(), bad])).result.kind, 'close');
});

t.test('ABORT is acknowledged then closes', async (t) => {
  const r = run(Buffer.concat([clientFlags(), option(C.NBD_OPT_ABORT)]));
  t.equal(r.result.kind, 'close');
  t.equal(parseOptionReplies(r.out.subarray(0)).replies[0]?.type, C.NBD_REP_ACK);
});

t.test('malformed and misused options get errors and the session goes on', async (t) => {
  const r = run(
    Buffer.concat([
      clientFlags(),
      option(C.NBD_OPT_LIST, Buffer.from('x')),
      option(C.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')),
      option(C.NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])),
      option(C.NBD_OPT_GO, Buffer.from([0, 0, 0, 9])),
      option(C.NBD_OPT_LIST_META_CONTEXT, Buffer.concat([str('disk'), Buffer.from([0, 0, 0, 5])])),
      option(C.NBD_OPT_LIST_META_CONTEXT, metaData('nope', [])),
      option(C.NBD_OPT_STARTTLS),
      option(C.NBD_OPT_GO, goData('ro')),
    ]),
  );
  const types = parseOptionReplies(r.out).replies.map((x) => x.type >>> 0);
  t.same(types, [
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_UNKNOWN,
    C.NBD_REP_ERR_UNSUP,
    C.NBD_REP_INFO,
    C.NBD_REP_ACK,
  ]);
  t.equal(r.result.kind, 'go');
  if (r.result.kind === 'go') {
    t.ok(r.result.negotiated.flags & C.NBD_FLAG_READ_ONLY);
    t.notOk(r.result.negotiated.structured);
  }
});

t.test('an oversized option is drained and refused with ERR_TOO_BIG', async (t) => {
  const big = option(C.NBD_OPT_LIST, Buffer.alloc(C.MAX_OPTION_LENGTH + 1));
  const r = run(Buffer.concat([clientFlags(), big, option(C.NBD_OPT_GO, goData('disk'))]), [100, 5000, 70000]);
  const types = parseOptionReplies(r.out).replies.map((x) => x.type >>> 0);
  t.same(types, [C.NBD_REP_ERR_TOO_BIG, C.NBD_REP_INFO, C.NBD_REP_ACK]);
  t.equal(r.result.kind, 'go');
});
