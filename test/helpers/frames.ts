// Builders for client-side NBD frames, for tests that speak raw bytes.
import * as C from '../../protocol/constants.js';
import { encodeRequest } from '../../protocol/wire.js';

export function clientFlags(flags = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0);
  return b;
}

export function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(C.IHAVEOPT, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(data.length, 12);
  return Buffer.concat([b, data]);
}

export function str(s: string): Buffer {
  const body = Buffer.from(s);
  const b = Buffer.alloc(4);
  b.writeUInt32BE(body.length);
  return Buffer.concat([b, body]);
}

export function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

export function goData(name: string, infos: number[] = []): Buffer {
  return Buffer.concat([str(name), u16(infos.length), ...infos.map(u16)]);
}

export function metaData(name: string, queries: string[]): Buffer {
  return Buffer.concat([str(name), u32(queries.length), ...queries.map(str)]);
}

export function request(type: number, offset: number | bigint, length: number, cookie = 1, flags = 0): Buffer {
  return encodeRequest({ flags, type, cookieHi: 0, cookieLo: cookie, offset: BigInt(offset), length });
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Parses a sequence of option replies from the server's bytes. */
export function parseOptionReplies(b: Buffer): { replies: OptionReply[]; rest: Buffer } {
  const replies: OptionReply[] = [];
  let at = 0;
  while (at + 20 <= b.length) {
    if (b.readBigUInt64BE(at) !== C.REPLY_MAGIC_OPT) break;
    const len = b.readUInt32BE(at + 16);
    if (at + 20 + len > b.length) break;
    replies.push({ option: b.readUInt32BE(at + 8), type: b.readUInt32BE(at + 12), data: b.subarray(at + 20, at + 20 + len) });
    at += 20 + len;
  }
  return { replies, rest: b.subarray(at) };
}
