// Seeded generation of NBD client byte streams for fuzzing the server. Pure: no
// sockets, no clocks, no I/O. generateCase(seed, index) always returns the same
// case, so a failure is reproduced from its seed and index alone.
//
// A case is the bytes a client sends (in pieces), what it does after sending
// (half-close, hang up, or keep the socket open), and, for cases whose framing
// is valid by construction, an oracle: the replies every option and request
// must get (ok / error / either). Mutated, random and truncated streams carry no
// oracle beyond "the server answers or closes in time and stays healthy".
import * as C from '../../protocol/constants.js';

// --- PRNG -----------------------------------------------------------------

/** sfc32: small, fast, 128-bit state, good enough for test generation. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number, stream = 0) {
    this.a = 0x9e3779b9;
    this.b = seed >>> 0;
    this.c = stream >>> 0;
    this.d = 1;
    for (let i = 0; i < 15; i++) this.u32();
  }

  u32(): number {
    let { a, b, c, d } = this;
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    this.a = a;
    this.b = b;
    this.c = c;
    this.d = d;
    return t >>> 0;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return n <= 1 ? 0 : Math.floor((this.u32() / 0x1_0000_0000) * n);
  }

  /** Uniform integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.u32() / 0x1_0000_0000 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
}

// --- cases ----------------------------------------------------------------

/** What the server must answer to one option or request. */
export type Expect = 'ok' | 'error' | 'any';

export interface OptionStep {
  option: number;
  expect: Expect;
  /** EXPORT_NAME: the fixed 10 (or 134) byte reply instead of option replies. */
  exportName?: boolean;
  /** The option ends the handshake when it succeeds (GO, EXPORT_NAME). */
  final?: boolean;
  /** ABORT: ACK, then the server closes. */
  abort?: boolean;
}

export interface RequestStep {
  type: number;
  flags: number;
  cookieHi: number;
  cookieLo: number;
  offset: bigint;
  length: number;
  expect: Expect;
}

/** An oracle for a stream whose framing is valid: every option and request in order. */
export interface Script {
  noZeroes: boolean;
  options: OptionStep[];
  /** Empty when the handshake does not reach transmission. */
  requests: RequestStep[];
  /** Structured replies negotiated (when the handshake reaches transmission). */
  structured: boolean;
  /** The stream ends with NBD_CMD_DISC. */
  disc: boolean;
}

/**
 * After the last byte: 'end' half-closes and waits for the server to close;
 * 'destroy' hangs up at once (a client that vanishes); 'hold' keeps the socket
 * open and waits for the server to close by itself (a protocol violation it
 * must not tolerate).
 */
export type Finish = 'end' | 'destroy' | 'hold';

export interface FuzzCase {
  seed: number;
  index: number;
  kind: string;
  /** Sent in order with a short pause between pieces. */
  chunks: Buffer[];
  finish: Finish;
  script?: Script;
}

/** Export names a fuzz target must serve; 'canary' must exist but is never named here. */
export const FUZZ_EXPORTS = {
  /** The default export, writable. */
  main: 'fuzz',
  /** A read-only export (a read-only snapshot of main in the daemon). */
  readOnly: 'fuzzsnap',
  size: 16 * 1024 * 1024,
  roSize: 16 * 1024 * 1024,
} as const;

const MiB = 1024 * 1024;

const INTERESTING_32 = [
  0,
  1,
  2,
  3,
  4,
  7,
  8,
  15,
  16,
  17,
  0x7f,
  0x80,
  0xff,
  0x100,
  511,
  512,
  513,
  4095,
  4096,
  4097,
  0xffff,
  0x10000,
  0x10001,
  MiB,
  32 * MiB,
  64 * MiB - 1,
  64 * MiB,
  64 * MiB + 1,
  FUZZ_EXPORTS.size - 1,
  FUZZ_EXPORTS.size,
  FUZZ_EXPORTS.size + 1,
  0x7fffffff,
  0x80000000,
  0xfffffffe,
  0xffffffff,
];

const INTERESTING_64 = [
  0n,
  1n,
  511n,
  512n,
  4096n,
  BigInt(FUZZ_EXPORTS.size - 1),
  BigInt(FUZZ_EXPORTS.size),
  BigInt(FUZZ_EXPORTS.size + 1),
  BigInt(FUZZ_EXPORTS.size - 4096),
  2n ** 31n,
  2n ** 32n - 1n,
  2n ** 32n,
  2n ** 53n - 1n,
  2n ** 53n,
  2n ** 53n + 1n,
  2n ** 63n - 1n,
  2n ** 63n,
  2n ** 64n - 4096n,
  2n ** 64n - 512n,
  2n ** 64n - 1n,
];

// --- frame builders ---------------------------------------------------------

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v & 0xffff);
  return b;
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

function str(s: string | Buffer): Buffer {
  const body = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  return Buffer.concat([u32(body.length), body]);
}

export function optionFrame(opt: number, data: Buffer = Buffer.alloc(0), length = data.length, magic = C.IHAVEOPT): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(magic, 0);
  b.writeUInt32BE(opt >>> 0, 8);
  b.writeUInt32BE(length >>> 0, 12);
  return Buffer.concat([b, data]);
}

export function requestFrame(r: Omit<RequestStep, 'expect'>, magic = C.NBD_REQUEST_MAGIC): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(magic >>> 0, 0);
  b.writeUInt16BE(r.flags & 0xffff, 4);
  b.writeUInt16BE(r.type & 0xffff, 6);
  b.writeUInt32BE(r.cookieHi >>> 0, 8);
  b.writeUInt32BE(r.cookieLo >>> 0, 12);
  b.writeBigUInt64BE(BigInt.asUintN(64, r.offset), 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  return b;
}

function goData(name: string | Buffer, infos: number[]): Buffer {
  return Buffer.concat([str(name), u16(infos.length), ...infos.map(u16)]);
}

function metaData(name: string, queries: (string | Buffer)[], count = queries.length): Buffer {
  return Buffer.concat([str(name), u32(count), ...queries.map(str)]);
}

// --- valid sessions -----------------------------------------------------------

interface Session {
  bytes: Buffer[];
  script: Script;
}

interface ExportChoice {
  /** The name the client sends. */
  name: string;
  readOnly: boolean;
  size: number;
}

function chooseExport(rng: Rng): ExportChoice {
  const r = rng.int(10);
  if (r < 5) return { name: FUZZ_EXPORTS.main, readOnly: false, size: FUZZ_EXPORTS.size };
  if (r < 8) return { name: '', readOnly: false, size: FUZZ_EXPORTS.size };
  return { name: FUZZ_EXPORTS.readOnly, readOnly: true, size: FUZZ_EXPORTS.roSize };
}

const UNKNOWN_NAMES = ['nope', 'FUZZ', 'fuzz ', 'fuzz\0', 'canary/..', '../fuzz', 'ä'.repeat(3), 'x'.repeat(300)];
const INFO_TYPES = [C.NBD_INFO_EXPORT, C.NBD_INFO_NAME, C.NBD_INFO_DESCRIPTION, C.NBD_INFO_BLOCK_SIZE, 4, 77, 0xffff];
const META_QUERIES = ['base:allocation', 'base:', 'base:allocation:', 'qemu:dirty-bitmap:x', 'nosuch:thing', '', ':', 'base:allocationX'];

/** Options before GO, each with its expected outcome, tracking structured/meta state. */
function preGoOptions(
  rng: Rng,
  out: Buffer[],
  steps: OptionStep[],
  state: { structured: boolean; meta: boolean },
  exp: ExportChoice,
): void {
  const n = rng.int(5);
  for (let i = 0; i < n; i++) {
    switch (rng.int(9)) {
      case 0:
        out.push(optionFrame(C.NBD_OPT_LIST));
        steps.push({ option: C.NBD_OPT_LIST, expect: 'ok' });
        break;
      case 1: {
        const known = rng.chance(0.7);
        const name = known ? exp.name : rng.pick(UNKNOWN_NAMES);
        const infos = Array.from({ length: rng.int(4) }, () => rng.pick(INFO_TYPES));
        out.push(optionFrame(C.NBD_OPT_INFO, goData(name, infos)));
        steps.push({ option: C.NBD_OPT_INFO, expect: known ? 'ok' : 'error' });
        break;
      }
      case 2:
        out.push(optionFrame(C.NBD_OPT_STRUCTURED_REPLY));
        steps.push({ option: C.NBD_OPT_STRUCTURED_REPLY, expect: 'ok' });
        state.structured = true;
        break;
      case 3: {
        // SET_META_CONTEXT: needs structured replies first; unknown namespaces select nothing.
        const known = rng.chance(0.85);
        const queries = Array.from({ length: rng.int(3) }, () => rng.pick(META_QUERIES));
        out.push(optionFrame(C.NBD_OPT_SET_META_CONTEXT, metaData(known ? exp.name : rng.pick(UNKNOWN_NAMES), queries)));
        const ok = state.structured && known;
        steps.push({ option: C.NBD_OPT_SET_META_CONTEXT, expect: ok ? 'ok' : 'error' });
        if (ok) state.meta = queries.includes(C.BASE_ALLOCATION);
        break;
      }
      case 4: {
        const known = rng.chance(0.85);
        const queries = Array.from({ length: rng.int(3) }, () => rng.pick(META_QUERIES));
        out.push(optionFrame(C.NBD_OPT_LIST_META_CONTEXT, metaData(known ? exp.name : rng.pick(UNKNOWN_NAMES), queries)));
        steps.push({ option: C.NBD_OPT_LIST_META_CONTEXT, expect: known ? 'ok' : 'error' });
        break;
      }
      case 5: {
        // Options we do not support (STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT, made-up ones).
        const opt = rng.pick([C.NBD_OPT_STARTTLS, C.NBD_OPT_EXTENDED_HEADERS, C.NBD_OPT_PEEK_EXPORT, 0, 12, 99, 0x7fffffff, 0xffffffff]);
        out.push(optionFrame(opt, rng.chance(0.5) ? rng.bytes(rng.int(40)) : Buffer.alloc(0)));
        steps.push({ option: opt >>> 0, expect: 'error' });
        break;
      }
      case 6: {
        // Malformed payloads of known options.
        const which = rng.int(5);
        if (which === 0) {
          out.push(optionFrame(C.NBD_OPT_LIST, rng.bytes(rng.range(1, 16))));
          steps.push({ option: C.NBD_OPT_LIST, expect: 'error' });
        } else if (which === 1) {
          out.push(optionFrame(C.NBD_OPT_STRUCTURED_REPLY, rng.bytes(rng.range(1, 8))));
          steps.push({ option: C.NBD_OPT_STRUCTURED_REPLY, expect: 'error' });
        } else if (which === 2) {
          // INFO whose name length points past the payload.
          const d = goData(exp.name, []);
          d.writeUInt32BE(rng.pick([d.length, 0xffffffff, 0x80000000, 4097]), 0);
          out.push(optionFrame(C.NBD_OPT_INFO, d));
          steps.push({ option: C.NBD_OPT_INFO, expect: 'error' });
        } else if (which === 3) {
          // INFO with an info count that does not match the payload.
          const d = rng.chance(0.5)
            ? Buffer.concat([str(exp.name), u16(rng.pick([2, 5, 0xffff])), rng.chance(0.5) ? u16(1) : Buffer.alloc(0)])
            : Buffer.concat([str(exp.name), u16(rng.pick([0, 1])), u16(1), rng.chance(0.5) ? u16(1) : Buffer.alloc(1)]);
          out.push(optionFrame(C.NBD_OPT_INFO, d));
          steps.push({ option: C.NBD_OPT_INFO, expect: 'error' });
        } else {
          // Meta context query count larger than the queries present, or trailing bytes.
          const bad = rng.chance(0.5)
            ? metaData(exp.name, ['base:allocation'], rng.pick([2, 1000, 0xffffffff]))
            : Buffer.concat([metaData(exp.name, ['base:allocation']), rng.bytes(rng.range(1, 5))]);
          const set = state.structured && rng.chance(0.5);
          out.push(optionFrame(set ? C.NBD_OPT_SET_META_CONTEXT : C.NBD_OPT_LIST_META_CONTEXT, bad));
          steps.push({ option: set ? C.NBD_OPT_SET_META_CONTEXT : C.NBD_OPT_LIST_META_CONTEXT, expect: 'error' });
        }
        break;
      }
      case 7: {
        // An option payload above the 64 KiB cap: drained and refused with TOO_BIG.
        const len = C.MAX_OPTION_LENGTH + rng.range(1, 4096);
        const opt = rng.pick([C.NBD_OPT_INFO, C.NBD_OPT_LIST, 99, C.NBD_OPT_SET_META_CONTEXT]);
        out.push(optionFrame(opt, rng.bytes(len)));
        steps.push({ option: opt, expect: 'error' });
        break;
      }
      default: {
        // GO for an unknown export: refused, the handshake goes on.
        out.push(optionFrame(C.NBD_OPT_GO, goData(rng.pick(UNKNOWN_NAMES), [])));
        steps.push({ option: C.NBD_OPT_GO, expect: 'error' });
      }
    }
  }
}

/** One request with its expected outcome; bytes include the payload for writes. */
function makeRequest(
  rng: Rng,
  exp: ExportChoice,
  st: { structured: boolean; meta: boolean },
  valid: boolean,
  cookieLo: number,
): { step: RequestStep; bytes: Buffer[] } {
  const cookieHi = rng.chance(0.3) ? rng.u32() : 0;
  const size = exp.size;
  const blockOffset = (len: number) => BigInt(rng.int(Math.floor((size - len) / 512) + 1) * 512);
  const smallLen = () => rng.pick([1, 7, 512, 4096, 4096 * rng.range(1, 16), rng.range(1, 70000)]);
  const make = (type: number, flags: number, offset: bigint, length: number, expect: Expect, payload?: Buffer) => ({
    step: { type, flags, cookieHi, cookieLo, offset, length, expect },
    bytes: payload
      ? [requestFrame({ type, flags, cookieHi, cookieLo, offset, length }), payload]
      : [requestFrame({ type, flags, cookieHi, cookieLo, offset, length })],
  });
  if (valid) {
    switch (rng.int(8)) {
      case 0:
      case 1: {
        const len = smallLen();
        const flags = st.structured && rng.chance(0.3) ? C.NBD_CMD_FLAG_DF : 0;
        return make(C.NBD_CMD_READ, flags, blockOffset(len), len, 'ok');
      }
      case 2:
      case 3: {
        const len = rng.pick([1, 512, 4096, rng.range(1, 9000)]);
        const flags = rng.chance(0.3) ? C.NBD_CMD_FLAG_FUA : 0;
        return make(C.NBD_CMD_WRITE, flags, blockOffset(len), len, exp.readOnly ? 'error' : 'ok', rng.bytes(len));
      }
      case 4:
        return make(C.NBD_CMD_FLUSH, 0, 0n, 0, 'ok');
      case 5: {
        const len = smallLen();
        const type = rng.pick([C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES]);
        const flags = type === C.NBD_CMD_WRITE_ZEROES ? rng.pick([0, C.NBD_CMD_FLAG_NO_HOLE, C.NBD_CMD_FLAG_FUA]) : 0;
        return make(type, flags, blockOffset(len), len, exp.readOnly ? 'error' : 'ok');
      }
      case 6: {
        const len = smallLen();
        return make(C.NBD_CMD_CACHE, 0, blockOffset(len), len, 'ok');
      }
      default: {
        const len = rng.pick([1, 4096, 65536, 1 << 20, 0x7fffffff, 0xffffffff]);
        const flags = rng.chance(0.5) ? C.NBD_CMD_FLAG_REQ_ONE : 0;
        const off = blockOffset(Math.min(len, size));
        const inRange = Number(off) + len <= size;
        // Without a negotiated base:allocation context BLOCK_STATUS is refused.
        return make(C.NBD_CMD_BLOCK_STATUS, flags, off, len, st.meta && inRange ? 'ok' : 'error');
      }
    }
  }
  // Invalid, but framed correctly: the server must answer with an error and stay in sync.
  switch (rng.int(11)) {
    case 0:
      return make(rng.pick([8, 9, 0x7fff, 0xffff, 12]), 0, 0n, rng.pick([0, 512]), 'error');
    case 1:
      return make(C.NBD_CMD_READ, rng.pick([0x20, 0x40, 0x8000, 0xffff, C.NBD_CMD_FLAG_FUA]), 0n, 512, 'error');
    case 2:
      return make(rng.pick([C.NBD_CMD_READ, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES]), 0, blockOffset(0), 0, 'error');
    case 3: {
      const off = rng.pick(INTERESTING_64.filter((o) => o >= BigInt(size)));
      return make(
        rng.pick([C.NBD_CMD_READ, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES]),
        0,
        off,
        rng.pick([1, 512, 4096]),
        'error',
      );
    }
    case 4: {
      const off = rng.pick(INTERESTING_64.filter((o) => o >= BigInt(size)));
      const len = rng.pick([1, 512]);
      return make(C.NBD_CMD_WRITE, 0, off, len, 'error', rng.bytes(len));
    }
    case 5:
      // READ above the 64 MiB limit, up to 2^32-1.
      return make(C.NBD_CMD_READ, 0, 0n, rng.pick([64 * MiB + 1, 0x80000000, 0xffffffff]), 'error');
    case 6:
      return make(C.NBD_CMD_FLUSH, 0, rng.pick([1n, 2n ** 63n]), rng.pick([0, 512]), 'error');
    case 7: {
      // A range that straddles the end.
      const len = rng.pick([2, 4096, 65536]);
      return make(rng.pick([C.NBD_CMD_READ, C.NBD_CMD_TRIM]), 0, BigInt(size - 1), len, 'error');
    }
    case 8: {
      const len = rng.pick([2, 4096]);
      return make(C.NBD_CMD_WRITE, rng.pick([0, C.NBD_CMD_FLAG_FUA]), BigInt(size - 1), len, 'error', rng.bytes(len));
    }
    case 9:
      // WRITE with flags it must not carry; the payload is still read.
      return make(C.NBD_CMD_WRITE, rng.pick([C.NBD_CMD_FLAG_DF, C.NBD_CMD_FLAG_REQ_ONE, 0x100]), 0n, 64, 'error', rng.bytes(64));
    default:
      // BLOCK_STATUS with flags it does not take, or out of range.
      return make(C.NBD_CMD_BLOCK_STATUS, rng.pick([C.NBD_CMD_FLAG_FUA, C.NBD_CMD_FLAG_DF, 0x40]), 0n, 4096, 'error');
  }
}

/** A well-framed session: options, GO or EXPORT_NAME, requests (valid and not), maybe DISC. */
export function validSession(rng: Rng, opts: { maxRequests?: number; invalidRatio?: number; bigOptions?: boolean } = {}): Session {
  const bytes: Buffer[] = [];
  const steps: OptionStep[] = [];
  const noZeroes = rng.chance(0.7);
  bytes.push(u32(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0)));
  const exp = chooseExport(rng);
  const st = { structured: false, meta: false };
  preGoOptions(rng, bytes, steps, st, exp);
  if (opts.bigOptions === false) {
    // Drop options above the cap (used where sessions must stay short).
    for (let i = bytes.length - 1; i >= 1; i--) {
      if (bytes[i]!.length > C.MAX_OPTION_LENGTH) {
        bytes.splice(i, 1);
        steps.splice(i - 1, 1);
      }
    }
  }
  if (rng.chance(0.15)) {
    // EXPORT_NAME: no error reply exists; structured replies still count if negotiated.
    bytes.push(optionFrame(C.NBD_OPT_EXPORT_NAME, Buffer.from(exp.name)));
    steps.push({ option: C.NBD_OPT_EXPORT_NAME, expect: 'ok', exportName: true, final: true });
    // base:allocation only counts with GO? The spec ties it to the negotiated export; we honour it either way.
  } else {
    const infos = Array.from({ length: rng.int(3) }, () => rng.pick(INFO_TYPES));
    bytes.push(optionFrame(C.NBD_OPT_GO, goData(exp.name, infos)));
    steps.push({ option: C.NBD_OPT_GO, expect: 'ok', final: true });
  }
  const requests: RequestStep[] = [];
  const n = rng.int((opts.maxRequests ?? 10) + 1);
  const invalidRatio = opts.invalidRatio ?? 0.3;
  const seen = new Set<number>();
  for (let i = 0; i < n; i++) {
    // Unique low halves keep the oracle simple; the high halves vary to check the full echo.
    let cookieLo = rng.u32();
    while (seen.has(cookieLo) || cookieLo === 0xd15c) cookieLo = (cookieLo + 1) >>> 0;
    seen.add(cookieLo);
    const r = makeRequest(rng, exp, st, !rng.chance(invalidRatio), cookieLo);
    requests.push(r.step);
    bytes.push(...r.bytes);
  }
  const disc = rng.chance(0.5);
  if (disc) bytes.push(requestFrame({ type: C.NBD_CMD_DISC, flags: 0, cookieHi: 0, cookieLo: 0xd15c, offset: 0n, length: 0 }));
  return { bytes, script: { noZeroes, options: steps, requests, structured: st.structured, disc } };
}

// --- mutation ---------------------------------------------------------------

/** Applies 1..k random mutations to a byte stream. */
export function mutate(rng: Rng, input: Buffer, k = 4): Buffer {
  let b = Buffer.from(input);
  const count = rng.range(1, k);
  for (let m = 0; m < count; m++) {
    const at = rng.int(b.length + 1);
    switch (rng.int(9)) {
      case 0:
        if (b.length) b[Math.min(at, b.length - 1)]! ^= 1 << rng.int(8);
        break;
      case 1:
        if (b.length) b[Math.min(at, b.length - 1)] = rng.pick([0, 0xff, 0x7f, 0x80, 1]);
        break;
      case 2:
        // An interesting 32-bit value at a 4-byte-aligned spot: lengths, counts, option numbers.
        if (b.length >= 4) {
          const p = Math.min(at & ~3, b.length - 4);
          b.writeUInt32BE(rng.pick(INTERESTING_32) >>> 0, p);
        }
        break;
      case 3:
        if (b.length >= 8) {
          const p = Math.min(at & ~3, b.length - 8);
          b.writeBigUInt64BE(rng.pick(INTERESTING_64), p);
        }
        break;
      case 4:
        b = Buffer.concat([b.subarray(0, at), rng.bytes(rng.range(1, 32)), b.subarray(at)]);
        break;
      case 5: {
        const len = rng.range(1, 32);
        b = Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + len))]);
        break;
      }
      case 6: {
        // Duplicate a slice (repeated frames, repeated headers).
        const len = rng.range(1, 64);
        const slice = b.subarray(at, Math.min(b.length, at + len));
        b = Buffer.concat([b.subarray(0, at), slice, b.subarray(at)]);
        break;
      }
      case 7:
        b = b.subarray(0, at);
        break;
      default:
        if (b.length >= 2) {
          const p = Math.min(at & ~1, b.length - 2);
          b.writeUInt16BE(rng.pick([0, 1, 2, 3, 7, 8, 0x8000, 0xffff]), p);
        }
    }
  }
  return b;
}

// --- generators ----------------------------------------------------------------

function splitInto(rng: Rng, data: Buffer, maxPieces = 4): Buffer[] {
  if (data.length < 2 || rng.chance(0.5)) return [data];
  const pieces = rng.range(2, maxPieces);
  const cuts = new Set<number>();
  for (let i = 1; i < pieces; i++) cuts.add(rng.range(1, data.length - 1));
  const sorted = [...cuts].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of sorted) {
    out.push(data.subarray(prev, c));
    prev = c;
  }
  out.push(data.subarray(prev));
  return out;
}

function pickFinish(rng: Rng): Finish {
  return rng.chance(0.15) ? 'destroy' : 'end';
}

function goPrefix(rng: Rng, structured = false, meta = false): Buffer {
  const parts = [u32(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)];
  if (structured) parts.push(optionFrame(C.NBD_OPT_STRUCTURED_REPLY));
  if (meta) parts.push(optionFrame(C.NBD_OPT_SET_META_CONTEXT, metaData(FUZZ_EXPORTS.main, [C.BASE_ALLOCATION])));
  parts.push(optionFrame(C.NBD_OPT_GO, goData(rng.chance(0.5) ? FUZZ_EXPORTS.main : '', [])));
  return Buffer.concat(parts);
}

/** ordinal: how many cases of the same kind come before this one in the run. */
type Generator = (rng: Rng, seed: number, ordinal: number) => Omit<FuzzCase, 'seed' | 'index' | 'kind'>;

/** The reference session whose every prefix the truncation sweep sends. */
export function truncationSession(seed: number, round: number): Buffer {
  const rng = new Rng(seed ^ 0x7a5c_11ed, round);
  return Buffer.concat(validSession(rng, { maxRequests: 6, bigOptions: false }).bytes);
}

const TRUNCATION_SWEEP = 512;

const GENERATORS: Record<string, Generator> = {
  /** A valid session with its oracle, sent in a few pieces. */
  valid(rng) {
    const s = validSession(rng);
    return { chunks: splitInto(rng, Buffer.concat(s.bytes), 6), finish: 'end', script: s.script };
  },
  /** Valid and invalid (but well-framed) requests mixed on one connection. */
  mixed(rng) {
    const s = validSession(rng, { maxRequests: 40, invalidRatio: 0.5 });
    return { chunks: splitInto(rng, Buffer.concat(s.bytes), 3), finish: 'end', script: s.script };
  },
  /** A valid session with a few mutations. */
  mutated(rng) {
    const s = validSession(rng, { maxRequests: 6 });
    return { chunks: splitInto(rng, mutate(rng, Buffer.concat(s.bytes), 6)), finish: pickFinish(rng) };
  },
  /** Every prefix of a reference session, in order across the run. */
  truncated(rng, seed, ordinal) {
    const round = Math.floor(ordinal / TRUNCATION_SWEEP);
    const session = truncationSession(seed, round);
    const cut = (ordinal % TRUNCATION_SWEEP) % (session.length + 1);
    return { chunks: [session.subarray(0, cut)], finish: pickFinish(rng) };
  },
  /** Random bytes, sometimes after valid client flags or a whole handshake. */
  random(rng) {
    const r = rng.int(3);
    const prefix = r === 0 ? Buffer.alloc(0) : r === 1 ? u32(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES) : goPrefix(rng);
    return { chunks: splitInto(rng, Buffer.concat([prefix, rng.bytes(rng.int(300))])), finish: pickFinish(rng) };
  },
  /** Lengths and offsets at the edges: 0xffffffff options, 2^32-1 requests, offsets near 2^64. */
  huge(rng) {
    switch (rng.int(6)) {
      case 0: {
        // Option length 0xffffffff (and friends): the server drains what arrives; we hang up partway.
        const len = rng.pick([0xffffffff, 0x80000000, C.MAX_OPTION_LENGTH + 1, 0x7fffffff]);
        const opt = rng.pick([C.NBD_OPT_GO, C.NBD_OPT_INFO, C.NBD_OPT_LIST, C.NBD_OPT_SET_META_CONTEXT, 99]);
        return {
          chunks: [Buffer.concat([u32(3), optionFrame(opt, Buffer.alloc(0), len)]), rng.bytes(rng.int(2000))],
          finish: rng.chance(0.3) ? 'destroy' : 'end',
        };
      }
      case 1: {
        // EXPORT_NAME of 4 GiB: refused by closing.
        const len = rng.pick([0xffffffff, C.MAX_OPTION_LENGTH + 1]);
        return {
          chunks: [Buffer.concat([u32(3), optionFrame(C.NBD_OPT_EXPORT_NAME, Buffer.alloc(0), len)]), rng.bytes(100)],
          finish: 'hold',
        };
      }
      case 2: {
        // WRITE of 2^32-1: the payload is drained (we never finish sending it).
        const len = rng.pick([0xffffffff, 0x80000000, 64 * MiB + 1]);
        const req = requestFrame({ type: C.NBD_CMD_WRITE, flags: 0, cookieHi: 0, cookieLo: 1, offset: 0n, length: len });
        return { chunks: [goPrefix(rng), req, rng.bytes(rng.int(70000))], finish: rng.chance(0.3) ? 'destroy' : 'end' };
      }
      case 3: {
        // WRITE within the size limit but far past the end, payload partly sent, then gone.
        const len = rng.pick([64 * MiB, 32 * MiB, MiB]);
        const req = requestFrame({
          type: C.NBD_CMD_WRITE,
          flags: 0,
          cookieHi: 0,
          cookieLo: 1,
          offset: rng.pick(INTERESTING_64),
          length: len,
        });
        return { chunks: [goPrefix(rng), req, rng.bytes(rng.int(100000))], finish: rng.chance(0.5) ? 'destroy' : 'end' };
      }
      default: {
        // Edge offsets and lengths with valid framing: each must get an error reply, in sync.
        const structured = rng.chance(0.5);
        const meta = structured && rng.chance(0.5);
        const reqs: RequestStep[] = [];
        const bytes: Buffer[] = [];
        const n = rng.range(1, 8);
        for (let i = 0; i < n; i++) {
          const type = rng.pick([C.NBD_CMD_READ, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS]);
          const offset = rng.pick(INTERESTING_64);
          const length = rng.pick(INTERESTING_32);
          // Mirror the server's rules only as far as ok / error; 'any' where the backend decides.
          let expect: Expect = 'any';
          const end = offset + BigInt(length);
          if (length === 0) expect = 'error';
          else if (end > BigInt(FUZZ_EXPORTS.size)) expect = 'error';
          else if (type === C.NBD_CMD_READ && length > C.MAX_REQUEST_SIZE) expect = 'error';
          else if (type === C.NBD_CMD_BLOCK_STATUS && !meta) expect = 'error';
          const r = { type, flags: 0, cookieHi: rng.u32(), cookieLo: i + 1, offset, length, expect };
          reqs.push(r);
          bytes.push(requestFrame(r));
        }
        const prefix = goPrefix(rng, structured, meta);
        return {
          chunks: [Buffer.concat([prefix, ...bytes])],
          finish: 'end',
          script: {
            noZeroes: true,
            options: [
              ...(structured ? [{ option: C.NBD_OPT_STRUCTURED_REPLY, expect: 'ok' as Expect }] : []),
              ...(meta ? [{ option: C.NBD_OPT_SET_META_CONTEXT, expect: 'ok' as Expect }] : []),
              { option: C.NBD_OPT_GO, expect: 'ok', final: true },
            ],
            requests: reqs,
            structured,
            disc: false,
          },
        };
      }
    }
  },
  /** Magics and flags the server must not accept: it closes, without being asked to. */
  badMagic(rng) {
    switch (rng.int(5)) {
      case 0:
        // Client flags with unknown bits, or without FIXED_NEWSTYLE.
        return { chunks: [u32(rng.pick([0, 2, 4, 0x80000000, 0xffffffff, 7]))], finish: 'hold' };
      case 1: {
        const magic = rng.pick([0n, C.IHAVEOPT ^ 1n, C.NBDMAGIC, 0xffffffffffffffffn, BigInt(C.NBD_REQUEST_MAGIC)]);
        return { chunks: [Buffer.concat([u32(3), optionFrame(C.NBD_OPT_GO, goData('', []), undefined, magic)])], finish: 'hold' };
      }
      case 2: {
        const magic = rng.pick([0, C.NBD_REQUEST_MAGIC ^ 0x100, C.NBD_SIMPLE_REPLY_MAGIC, C.NBD_STRUCTURED_REPLY_MAGIC, 0xffffffff]);
        const req = requestFrame({ type: C.NBD_CMD_READ, flags: 0, cookieHi: 0, cookieLo: 1, offset: 0n, length: 512 }, magic);
        return { chunks: [goPrefix(rng), req], finish: 'hold' };
      }
      case 3:
        // Unknown export with NBD_OPT_EXPORT_NAME: there is no error reply, the server hangs up.
        return {
          chunks: [Buffer.concat([u32(3), optionFrame(C.NBD_OPT_EXPORT_NAME, Buffer.from(rng.pick(UNKNOWN_NAMES)))])],
          finish: 'hold',
        };
      default:
        // ABORT: ACK, then close.
        return { chunks: [Buffer.concat([u32(3), optionFrame(C.NBD_OPT_ABORT)])], finish: 'hold' };
    }
  },
  /** Options after GO (read as request headers with a bad magic) and commands before GO. */
  phase(rng) {
    if (rng.chance(0.5)) {
      // At least a request header's worth, so the server has a magic to reject.
      const opt = optionFrame(
        rng.pick([C.NBD_OPT_GO, C.NBD_OPT_LIST, C.NBD_OPT_STRUCTURED_REPLY, C.NBD_OPT_ABORT]),
        goData(rng.pick([FUZZ_EXPORTS.main, 'after-go']), [1]),
      );
      return { chunks: [goPrefix(rng), opt], finish: 'hold' };
    }
    const req = requestFrame({
      type: rng.pick([C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_DISC, C.NBD_CMD_FLUSH]),
      flags: 0,
      cookieHi: 0,
      cookieLo: 1,
      offset: 0n,
      length: 512,
    });
    const before = rng.chance(0.5) ? [optionFrame(C.NBD_OPT_STRUCTURED_REPLY)] : [];
    return { chunks: [Buffer.concat([u32(3), ...before, req, Buffer.alloc(512)])], finish: 'hold' };
  },
  /** Structured reply and meta context misuse, with the oracle. */
  meta(rng) {
    const exp: ExportChoice = { name: FUZZ_EXPORTS.main, readOnly: false, size: FUZZ_EXPORTS.size };
    const bytes: Buffer[] = [u32(3)];
    const options: OptionStep[] = [];
    const st = { structured: false, meta: false };
    const n = rng.range(1, 6);
    for (let i = 0; i < n; i++) {
      const r = rng.int(6);
      if (r === 0) {
        bytes.push(optionFrame(C.NBD_OPT_STRUCTURED_REPLY));
        options.push({ option: C.NBD_OPT_STRUCTURED_REPLY, expect: 'ok' });
        st.structured = true;
      } else if (r <= 2) {
        const queries = Array.from({ length: rng.int(4) }, () => rng.pick(META_QUERIES));
        bytes.push(optionFrame(C.NBD_OPT_SET_META_CONTEXT, metaData(exp.name, queries)));
        options.push({ option: C.NBD_OPT_SET_META_CONTEXT, expect: st.structured ? 'ok' : 'error' });
        if (st.structured) st.meta = queries.includes(C.BASE_ALLOCATION);
      } else if (r === 3) {
        const queries = Array.from({ length: rng.int(4) }, () => rng.pick(META_QUERIES));
        bytes.push(optionFrame(C.NBD_OPT_LIST_META_CONTEXT, metaData(exp.name, queries)));
        options.push({ option: C.NBD_OPT_LIST_META_CONTEXT, expect: 'ok' });
      } else if (r === 4) {
        bytes.push(optionFrame(C.NBD_OPT_SET_META_CONTEXT, metaData(rng.pick(UNKNOWN_NAMES), [C.BASE_ALLOCATION])));
        options.push({ option: C.NBD_OPT_SET_META_CONTEXT, expect: 'error' });
      } else {
        bytes.push(optionFrame(C.NBD_OPT_INFO, goData(exp.name, [C.NBD_INFO_BLOCK_SIZE])));
        options.push({ option: C.NBD_OPT_INFO, expect: 'ok' });
      }
    }
    bytes.push(optionFrame(C.NBD_OPT_GO, goData(exp.name, [])));
    options.push({ option: C.NBD_OPT_GO, expect: 'ok', final: true });
    const requests: RequestStep[] = [];
    const m = rng.range(1, 10);
    for (let i = 0; i < m; i++) {
      const len = rng.pick([1, 4096, 65536, 1 << 20, 0xffffffff]);
      const flags = rng.pick([0, C.NBD_CMD_FLAG_REQ_ONE, C.NBD_CMD_FLAG_REQ_ONE | C.NBD_CMD_FLAG_FUA, C.NBD_CMD_FLAG_DF]);
      const offset = BigInt(rng.int(FUZZ_EXPORTS.size / 4096) * 4096);
      const inRange = offset + BigInt(len) <= BigInt(FUZZ_EXPORTS.size);
      const expect: Expect = st.meta && inRange && (flags & ~C.NBD_CMD_FLAG_REQ_ONE) === 0 ? 'ok' : 'error';
      const r = { type: C.NBD_CMD_BLOCK_STATUS, flags, cookieHi: 0, cookieLo: i + 1, offset, length: len, expect };
      requests.push(r);
      bytes.push(requestFrame(r));
    }
    return {
      chunks: splitInto(rng, Buffer.concat(bytes)),
      finish: 'end',
      script: { noZeroes: false, options, requests, structured: st.structured, disc: false },
    };
  },
  /** Clients that vanish mid-request: half a write payload, or many reads, then gone. */
  vanish(rng) {
    const prefix = goPrefix(rng, rng.chance(0.3));
    if (rng.chance(0.5)) {
      const len = rng.pick([4096, 65536, MiB, 4 * MiB]);
      const req = requestFrame({ type: C.NBD_CMD_WRITE, flags: rng.pick([0, 1]), cookieHi: 0, cookieLo: 1, offset: 0n, length: len });
      return { chunks: [prefix, req, rng.bytes(rng.int(Math.min(len, 70000)))], finish: 'destroy' };
    }
    const reads: Buffer[] = [];
    const n = rng.range(1, 200);
    for (let i = 0; i < n; i++) {
      reads.push(
        requestFrame({
          type: C.NBD_CMD_READ,
          flags: 0,
          cookieHi: 0,
          cookieLo: i + 1,
          offset: BigInt(rng.int(4096) * 4096),
          length: rng.pick([4096, 65536, MiB]),
        }),
      );
    }
    return { chunks: [prefix, Buffer.concat(reads)], finish: 'destroy' };
  },
};

const KIND_ORDER = Object.keys(GENERATORS);
/** Relative frequency of each kind in the rotation. */
const WEIGHTS: Record<string, number> = {
  valid: 3,
  mixed: 2,
  mutated: 4,
  truncated: 3,
  random: 2,
  huge: 2,
  badMagic: 1,
  phase: 1,
  meta: 2,
  vanish: 1,
};
const ROTATION: string[] = KIND_ORDER.flatMap((k) => Array<string>(WEIGHTS[k] ?? 1).fill(k));

export const KINDS: readonly string[] = KIND_ORDER;

/** A per-case seed mixing the run seed and the index (splitmix32-style). */
export function caseSeed(seed: number, index: number): number {
  let z = (seed ^ Math.imul(index + 1, 0x9e3779b9)) >>> 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}

/** The case for (seed, index): deterministic, independent of every other case. */
export function generateCase(seed: number, index: number): FuzzCase {
  const kind = ROTATION[index % ROTATION.length]!;
  const rng = new Rng(caseSeed(seed, index), index);
  const c = GENERATORS[kind]!(rng, seed, ordinalOf(kind, index));
  return { seed, index, kind, ...c };
}

/** How many cases of this kind come before this index (the truncation sweep's position). */
function ordinalOf(kind: string, index: number): number {
  const positions = ROTATION.map((k, i) => (k === kind ? i : -1)).filter((i) => i >= 0);
  const pos = index % ROTATION.length;
  return Math.floor(index / ROTATION.length) * positions.length + positions.filter((p) => p < pos).length;
}

// --- serialization (regression files) -----------------------------------------

export interface SavedCase {
  seed: number;
  index: number;
  kind: string;
  finish: Finish;
  /** Each chunk as hex. */
  chunks: string[];
  script?: Omit<Script, 'requests'> & { requests: (Omit<RequestStep, 'offset'> & { offset: string })[] };
  failure?: string;
  note?: string;
}

export function saveCase(c: FuzzCase, failure?: string): SavedCase {
  return {
    seed: c.seed,
    index: c.index,
    kind: c.kind,
    finish: c.finish,
    chunks: c.chunks.map((b) => b.toString('hex')),
    script: c.script && { ...c.script, requests: c.script.requests.map((r) => ({ ...r, offset: r.offset.toString() })) },
    failure,
  };
}

export function loadCase(s: SavedCase): FuzzCase {
  return {
    seed: s.seed,
    index: s.index,
    kind: s.kind,
    finish: s.finish,
    chunks: s.chunks.map((h) => Buffer.from(h, 'hex')),
    script: s.script && { ...s.script, requests: s.script.requests.map((r) => ({ ...r, offset: BigInt(r.offset) })) },
  };
}
