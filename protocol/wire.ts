// Encoders and decoders for the fixed-size parts of NBD frames. Pure functions over Buffers.
import {
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REPLY_MAGIC_OPT,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_FLAG_DONE,
} from './constants.js';

export const REQUEST_HEADER_SIZE = 28;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_HEADER_SIZE = 20;

export interface Request {
  flags: number;
  type: number;
  /** The client's cookie, echoed verbatim: high and low 32 bits. */
  cookieHi: number;
  cookieLo: number;
  /** Raw 64-bit offset from the wire. */
  offset: bigint;
  length: number;
}

/** Decodes a 28-byte request header. Returns undefined on a bad magic. */
export function decodeRequest(b: Buffer, at = 0): Request | undefined {
  if (b.readUInt32BE(at) !== NBD_REQUEST_MAGIC) return undefined;
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookieHi: b.readUInt32BE(at + 8),
    cookieLo: b.readUInt32BE(at + 12),
    offset: b.readBigUInt64BE(at + 16),
    length: b.readUInt32BE(at + 24),
  };
}

export function encodeRequest(r: Request): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeUInt32BE(r.cookieHi, 8);
  b.writeUInt32BE(r.cookieLo, 12);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

export interface OptionHeader {
  magic: bigint;
  option: number;
  length: number;
}

export function decodeOptionHeader(b: Buffer, at = 0): OptionHeader {
  return { magic: b.readBigUInt64BE(at), option: b.readUInt32BE(at + 8), length: b.readUInt32BE(at + 12) };
}

export function encodeOptionReply(option: number, type: number, data?: Buffer): Buffer {
  const len = data?.length ?? 0;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + len);
  b.writeBigUInt64BE(REPLY_MAGIC_OPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

export function encodeSimpleReply(error: number, req: Pick<Request, 'cookieHi' | 'cookieLo'>): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(req.cookieHi, 8);
  b.writeUInt32BE(req.cookieLo, 12);
  return b;
}

function structuredHeader(b: Buffer, flags: number, type: number, req: Pick<Request, 'cookieHi' | 'cookieLo'>, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(req.cookieHi, 8);
  b.writeUInt32BE(req.cookieLo, 12);
  b.writeUInt32BE(length, 16);
}

type Cookie = Pick<Request, 'cookieHi' | 'cookieLo'>;

/** NBD_REPLY_TYPE_NONE with DONE: the end of a structured reply that carried nothing. */
export function encodeStructuredNone(req: Cookie): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE);
  structuredHeader(b, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, req, 0);
  return b;
}

/** Header plus offset of an OFFSET_DATA chunk; the data follows on the wire. */
export function encodeOffsetDataHeader(req: Cookie, done: boolean, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 8);
  structuredHeader(b, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, req, 8 + dataLength);
  b.writeBigUInt64BE(BigInt(offset), STRUCTURED_HEADER_SIZE);
  return b;
}

export function encodeOffsetHole(req: Cookie, done: boolean, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + 12);
  structuredHeader(b, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, req, 12);
  b.writeBigUInt64BE(BigInt(offset), STRUCTURED_HEADER_SIZE);
  b.writeUInt32BE(length, STRUCTURED_HEADER_SIZE + 8);
  return b;
}

/** ERROR, or ERROR_OFFSET when the failing offset is known. Always the final chunk. */
export function encodeStructuredError(req: Cookie, error: number, message: string, offset?: number): Buffer {
  const msg = Buffer.from(message.slice(0, 1024), 'utf8');
  const extra = offset === undefined ? 0 : 8;
  const len = 6 + msg.length + extra;
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + len);
  structuredHeader(b, NBD_REPLY_FLAG_DONE, offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET, req, len);
  b.writeUInt32BE(error, STRUCTURED_HEADER_SIZE);
  b.writeUInt16BE(msg.length, STRUCTURED_HEADER_SIZE + 4);
  msg.copy(b, STRUCTURED_HEADER_SIZE + 6);
  if (offset !== undefined) b.writeBigUInt64BE(BigInt(offset), STRUCTURED_HEADER_SIZE + 6 + msg.length);
  return b;
}

/** One context's BLOCK_STATUS chunk; with several contexts only the last is `done`. */
export function encodeBlockStatus(req: Cookie, contextId: number, extents: { length: number; flags: number }[], done = true): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_SIZE + len);
  structuredHeader(b, done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, req, len);
  b.writeUInt32BE(contextId, STRUCTURED_HEADER_SIZE);
  let at = STRUCTURED_HEADER_SIZE + 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}

/** A u32 length followed by the bytes: the spec's string encoding inside options. */
export function lengthPrefixed(s: string): Buffer {
  const body = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(4 + body.length);
  b.writeUInt32BE(body.length, 0);
  body.copy(b, 4);
  return b;
}
