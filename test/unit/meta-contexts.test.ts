// Meta contexts a backend defines besides base:allocation: what LIST and SET grant in the
// handshake, and the BLOCK_STATUS chunks (one per context) they lead to.
import t from 'tap';
import * as C from '../../protocol/constants.js';
import { Handshake, type HandshakeResult } from '../../protocol/handshake.js';
import { ByteQueue } from '../../protocol/byte-queue.js';
import { BufferPool } from '../../protocol/buffer-pool.js';
import { silentLogger } from '../../protocol/logger.js';
import { execute, validate, type RequestContext } from '../../protocol/requests.js';
import { encodeReply } from '../../protocol/replies.js';
import type { Request } from '../../protocol/wire.js';
import { EVEN_CONTEXT, MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';
import { clientFlags, goData, metaData, option, parseOptionReplies } from '../helpers/frames.js';

const CHUNK = 64 * 1024;

function backends() {
  const snap = new MemoryBackend('snap', 1 << 20);
  snap.contextChunk = CHUNK;
  return [snap, new MemoryBackend('plain', 1 << 20)];
}

/** Runs one handshake stream; returns the option replies as [option, type, id, name] and the result. */
function haggle(...options: Buffer[]) {
  const out: Buffer[] = [];
  const hs = new Handshake(new MemoryRegistry(backends()), (b) => out.push(b), silentLogger);
  const q = new ByteQueue();
  q.push(Buffer.concat([clientFlags(), ...options]));
  const result: HandshakeResult = hs.pump(q);
  const { replies } = parseOptionReplies(Buffer.concat(out));
  const contexts = replies
    .filter((r) => r.type === C.NBD_REP_META_CONTEXT)
    .map((r) => [r.option, r.data.readUInt32BE(0), r.data.toString('utf8', 4)] as const);
  return { result, replies, contexts };
}

const structured = option(C.NBD_OPT_STRUCTURED_REPLY);
const list = (name: string, queries: string[]) => option(C.NBD_OPT_LIST_META_CONTEXT, metaData(name, queries));
const set = (name: string, queries: string[]) => option(C.NBD_OPT_SET_META_CONTEXT, metaData(name, queries));
const go = (name: string) => option(C.NBD_OPT_GO, goData(name));

t.test('LIST with no query names base:allocation and every backend context, ids 0', async (t) => {
  const { contexts } = haggle(list('snap', []), list('plain', []));
  t.same(contexts, [
    [C.NBD_OPT_LIST_META_CONTEXT, 0, C.BASE_ALLOCATION],
    [C.NBD_OPT_LIST_META_CONTEXT, 0, EVEN_CONTEXT],
    [C.NBD_OPT_LIST_META_CONTEXT, 0, C.BASE_ALLOCATION],
  ]);
});

t.test('LIST with queries lists what each selects, once', async (t) => {
  const { contexts } = haggle(list('snap', ['test:', EVEN_CONTEXT, 'base:', 'nosuch:thing']), list('snap', ['base:allocation']));
  t.same(
    contexts.map((c) => c[2]),
    [EVEN_CONTEXT, C.BASE_ALLOCATION, C.BASE_ALLOCATION],
  );
});

t.test('SET grants ids: base:allocation keeps its own, others from 2 up', async (t) => {
  const { result, contexts } = haggle(structured, set('snap', [EVEN_CONTEXT, C.BASE_ALLOCATION]), go('snap'));
  t.same(contexts, [
    [C.NBD_OPT_SET_META_CONTEXT, 2, EVEN_CONTEXT],
    [C.NBD_OPT_SET_META_CONTEXT, C.BASE_ALLOCATION_ID, C.BASE_ALLOCATION],
  ]);
  t.equal(result.kind, 'go');
  if (result.kind !== 'go') return;
  t.equal(result.negotiated.baseAllocation, true);
  t.same(result.negotiated.contexts, [{ id: 2, name: EVEN_CONTEXT }]);
});

t.test('a later SET replaces the set; a context keeps its id', async (t) => {
  const { result, contexts } = haggle(structured, set('snap', [EVEN_CONTEXT, C.BASE_ALLOCATION]), set('snap', [EVEN_CONTEXT]), go('snap'));
  t.same(contexts.at(-1), [C.NBD_OPT_SET_META_CONTEXT, 2, EVEN_CONTEXT]);
  if (result.kind !== 'go') return t.fail('no go');
  t.equal(result.negotiated.baseAllocation, false, 'base:allocation is no longer selected');
  t.same(result.negotiated.contexts, [{ id: 2, name: EVEN_CONTEXT }]);
});

t.test('SET with an unknown context, or a bare namespace, grants nothing', async (t) => {
  const { result, contexts, replies } = haggle(structured, set('snap', ['test:odd', 'test:', 'nosuch:x', '']), go('snap'));
  t.same(contexts, []);
  t.equal(replies.find((r) => r.option === C.NBD_OPT_SET_META_CONTEXT)!.type, C.NBD_REP_ACK, 'just an ACK');
  if (result.kind !== 'go') return t.fail('no go');
  t.equal(result.negotiated.baseAllocation, false);
  t.same(result.negotiated.contexts, []);
});

t.test("a backend context does not carry over to another export's GO", async (t) => {
  const { result, contexts } = haggle(structured, set('snap', [EVEN_CONTEXT, C.BASE_ALLOCATION]), go('plain'));
  t.equal(contexts.length, 2);
  if (result.kind !== 'go') return t.fail('no go');
  t.same(result.negotiated.contexts, []);
  t.equal(result.negotiated.baseAllocation, true, 'base:allocation exists everywhere');
});

t.test('a context the plain export lacks is not granted on it', async (t) => {
  const { contexts } = haggle(structured, set('plain', [EVEN_CONTEXT]));
  t.same(contexts, []);
});

const req = (offset: number, length: number, flags = 0): Request => ({
  type: C.NBD_CMD_BLOCK_STATUS,
  flags,
  cookieHi: 0,
  cookieLo: 7,
  offset: BigInt(offset),
  length,
});

function ctx(backend: MemoryBackend, over: Partial<RequestContext> = {}): RequestContext {
  return {
    backend,
    structured: true,
    baseAllocation: true,
    contexts: [{ id: 2, name: EVEN_CONTEXT }],
    pool: new BufferPool(),
    log: silentLogger,
    ...over,
  };
}

/** The chunks of a structured reply: [flags, type, context id, extents]. */
function chunks(frames: Buffer[]) {
  const b = Buffer.concat(frames);
  const out: Array<[number, number, number, Array<[number, number]>]> = [];
  for (let at = 0; at < b.length; ) {
    if (b.readUInt32BE(at) !== C.NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`no structured reply at ${at}`);
    const len = b.readUInt32BE(at + 16);
    const body = b.subarray(at + 20, at + 20 + len);
    const ext: Array<[number, number]> = [];
    for (let i = 4; i + 8 <= body.length; i += 8) ext.push([body.readUInt32BE(i), body.readUInt32BE(i + 4)]);
    out.push([b.readUInt16BE(at + 4), b.readUInt16BE(at + 6), body.readUInt32BE(0), ext]);
    at += 20 + len;
  }
  return out;
}

t.test('block status with two contexts: two chunks, DONE only on the last', async (t) => {
  const r = req(CHUNK / 2, 2 * CHUNK);
  const out = await execute(r, undefined, ctx(backends()[0]!));
  t.equal(out.error, 0);
  t.same(chunks(encodeReply(r, out, true)), [
    [
      0,
      C.NBD_REPLY_TYPE_BLOCK_STATUS,
      C.BASE_ALLOCATION_ID,
      [
        [CHUNK, 0],
        [CHUNK, 3],
      ],
    ],
    [
      C.NBD_REPLY_FLAG_DONE,
      C.NBD_REPLY_TYPE_BLOCK_STATUS,
      2,
      [
        [CHUNK / 2, 1],
        [CHUNK, 0],
        [CHUNK / 2, 1],
      ],
    ],
  ]);
});

t.test('REQ_ONE holds each context to one extent', async (t) => {
  const r = req(0, 4 * CHUNK, C.NBD_CMD_FLAG_REQ_ONE);
  const out = await execute(r, undefined, ctx(backends()[0]!));
  t.same(
    chunks(encodeReply(r, out, true)).map((c) => c[3]),
    [[[2 * CHUNK, 0]], [[CHUNK, 1]]],
  );
});

t.test('a backend context alone answers without base:allocation', async (t) => {
  const r = req(0, CHUNK);
  const out = await execute(r, undefined, ctx(backends()[0]!, { baseAllocation: false }));
  t.same(chunks(encodeReply(r, out, true)), [[C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_BLOCK_STATUS, 2, [[CHUNK, 1]]]]);
  t.equal(validate(r, ctx(backends()[0]!, { baseAllocation: false })), undefined, 'valid with a backend context only');
  t.equal(validate(r, ctx(backends()[0]!, { baseAllocation: false, contexts: [] }))?.error, C.NBD_EINVAL, 'no context: EINVAL');
});

t.test('base:allocation alone keeps its single-chunk path', async (t) => {
  const r = req(0, CHUNK);
  const out = await execute(r, undefined, ctx(backends()[0]!, { contexts: [] }));
  t.ok(out.extents, 'extents, not statuses');
  t.equal(out.statuses, undefined);
  t.same(chunks(encodeReply(r, out, true)), [
    [
      C.NBD_REPLY_FLAG_DONE,
      C.NBD_REPLY_TYPE_BLOCK_STATUS,
      C.BASE_ALLOCATION_ID,
      [
        [CHUNK / 2, 0],
        [CHUNK / 2, 3],
      ],
    ],
  ]);
});

t.test("one context's failure is an error reply for the request", async (t) => {
  const b = backends()[0]!;
  b.contextFailWith = 'ENOSPC';
  const r = req(0, CHUNK);
  const out = await execute(r, undefined, ctx(b));
  t.equal(out.error, C.NBD_ENOSPC);
  const [chunk] = chunks(encodeReply(r, out, true));
  t.equal(chunk![1], C.NBD_REPLY_TYPE_ERROR);
  b.contextFailWith = undefined;
  t.equal((await execute(r, undefined, ctx(b))).error, 0, 'the next request is fine');
});

t.test('a backend without contextExtents fails the request with EIO', async (t) => {
  const b = backends()[1]!;
  const out = await execute(req(0, CHUNK), undefined, ctx(b));
  t.equal(out.error, C.NBD_EINVAL, "the backend's own refusal of a context it lacks");
  const bare = Object.assign(Object.create(b) as MemoryBackend, { contextExtents: undefined });
  t.equal((await execute(req(0, CHUNK), undefined, ctx(bare))).error, C.NBD_EIO);
});
