// Transmission-phase replies parsed out of buffered input for client.ts, in the manner of
// ws's Receiver (as request-parser.ts): named states over a queue of chunks, one result per
// parse() call. Read data goes into the request's own buffer, never a staging copy.
import * as C from './constants.js';
import type { Extent } from './backend.js';
import type { ByteQueue } from './byte-queue.js';

/** A request awaiting its reply, as the parser fills it in. */
export interface ClientRequest {
  cookie: number;
  type: number;
  offset: number;
  length: number;
  /** READ: the caller's buffer, filled by the reply. */
  buf?: Buffer;
  /** Bytes of `buf` the reply has covered, with data or holes. */
  covered: number;
  /** The first error the server reported; 0: none. */
  errno: number;
  message: string;
  /** BLOCK_STATUS: extents by context id. */
  statuses?: Map<number, Extent[]>;
  resolve(): void;
  reject(err: Error): void;
}

// States.
/** Waiting for the 4-byte magic that starts every reply. */
const GET_MAGIC = 0;
/** The rest of a simple reply's header. */
const GET_SIMPLE = 1;
/** A simple reply's read data, landing in the request's buffer. */
const GET_SIMPLE_DATA = 2;
/** The rest of a structured chunk's header. */
const GET_CHUNK_HEADER = 3;
/** The 8-byte offset that starts an OFFSET_DATA chunk. */
const GET_DATA_OFFSET = 4;
/** An OFFSET_DATA chunk's data, landing in the request's buffer. */
const GET_DATA = 5;
/** A whole non-data chunk body (hole, block status, error). */
const GET_CHUNK_BODY = 6;
/** The stream broke a rule: nothing after it can be trusted. */
const LOST_SYNC = 7;
type State =
  | typeof GET_MAGIC
  | typeof GET_SIMPLE
  | typeof GET_SIMPLE_DATA
  | typeof GET_CHUNK_HEADER
  | typeof GET_DATA_OFFSET
  | typeof GET_DATA
  | typeof GET_CHUNK_BODY
  | typeof LOST_SYNC;

// What parse() found.
/** Nothing complete is buffered. */
export const NEED_INPUT = 0;
/** `done` has its whole reply (errno set when the server reported an error). */
export const REPLY = 1;
/** The server broke the protocol; `failure` says how. The connection must go. */
export const BAD_REPLY = 2;
export type ReplyResult = typeof NEED_INPUT | typeof REPLY | typeof BAD_REPLY;

/** Longest non-data chunk body taken: a block status of a million extents. */
const MAX_CHUNK_BODY = 8 * 1024 * 1024;

export class ReplyParser {
  private state: State = GET_MAGIC;
  /** The request whose reply is being parsed. */
  private current?: ClientRequest;
  /** The request parse() last returned with REPLY. */
  done?: ClientRequest;
  /** Why parse() returned BAD_REPLY. */
  failure = '';
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  /** Where in the request's buffer data lands next, and how much of it is still to come. */
  private dataAt = 0;
  private dataLeft = 0;

  constructor(
    private readonly input: ByteQueue,
    private readonly lookup: (cookie: number) => ClientRequest | undefined,
  ) {}

  parse(): ReplyResult {
    const q = this.input;
    for (;;) {
      switch (this.state) {
        case GET_MAGIC: {
          if (q.length < 4) return NEED_INPUT;
          const magic = q.take(4).readUInt32BE(0);
          if (magic === C.NBD_SIMPLE_REPLY_MAGIC) this.state = GET_SIMPLE;
          else if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) this.state = GET_CHUNK_HEADER;
          else return this.bad(`reply magic 0x${magic.toString(16)}`);
          break;
        }
        case GET_SIMPLE: {
          if (q.length < 12) return NEED_INPUT;
          const h = q.take(12);
          const req = this.find(h.readUInt32BE(4), h.readUInt32BE(8));
          if (!req) return BAD_REPLY;
          const error = h.readUInt32BE(0);
          if (error !== 0 || req.type !== C.NBD_CMD_READ) return this.finish(req, error);
          this.dataAt = 0;
          this.dataLeft = req.length;
          this.state = GET_SIMPLE_DATA;
          break;
        }
        case GET_SIMPLE_DATA:
        case GET_DATA: {
          this.fill();
          if (this.dataLeft > 0) return NEED_INPUT;
          if (this.state === GET_SIMPLE_DATA) return this.finish(this.current!, 0);
          const r = this.endChunk();
          if (r !== undefined) return r;
          break;
        }
        case GET_CHUNK_HEADER: {
          if (q.length < 16) return NEED_INPUT;
          const h = q.take(16);
          const req = this.find(h.readUInt32BE(4), h.readUInt32BE(8));
          if (!req) return BAD_REPLY;
          this.chunkFlags = h.readUInt16BE(0);
          this.chunkType = h.readUInt16BE(2);
          this.chunkLength = h.readUInt32BE(12);
          const r = this.startChunk(req);
          if (r !== undefined) return r;
          break;
        }
        case GET_DATA_OFFSET: {
          if (q.length < 8) return NEED_INPUT;
          const at = this.within(Number(q.take(8).readBigUInt64BE(0)), this.chunkLength - 8);
          if (at < 0) return BAD_REPLY;
          this.dataAt = at;
          this.dataLeft = this.chunkLength - 8;
          this.state = GET_DATA;
          break;
        }
        case GET_CHUNK_BODY: {
          if (q.length < this.chunkLength) return NEED_INPUT;
          const r = this.chunkBody(q.take(this.chunkLength)) ?? this.endChunk();
          if (r !== undefined) return r;
          break;
        }
        case LOST_SYNC:
          return BAD_REPLY;
      }
    }
  }

  /**
   * Where the next socket read may land in place: the rest of the data under way in the
   * caller's buffer, when nothing else is queued before it. Undefined: use a staging buffer.
   */
  directTarget(): Buffer | undefined {
    if ((this.state !== GET_DATA && this.state !== GET_SIMPLE_DATA) || this.input.length !== 0) return undefined;
    return this.current!.buf!.subarray(this.dataAt, this.dataAt + this.dataLeft);
  }

  /** n bytes landed in place in the buffer directTarget() gave. */
  landed(n: number): void {
    this.dataAt += n;
    this.dataLeft -= n;
    this.current!.covered += n;
  }

  private fill(): void {
    const n = Math.min(this.input.length, this.dataLeft);
    if (n === 0) return;
    this.input.copyOut(this.current!.buf!, this.dataAt, n);
    this.landed(n);
  }

  private find(hi: number, lo: number): ClientRequest | undefined {
    const req = hi === 0 ? this.lookup(lo) : undefined;
    if (!req) this.bad(`reply for unknown cookie ${hi}:${lo}`);
    this.current = req;
    return req;
  }

  private startChunk(req: ClientRequest): ReplyResult | undefined {
    const type = this.chunkType;
    const len = this.chunkLength;
    if (type === C.NBD_REPLY_TYPE_NONE) {
      if (len !== 0 || !(this.chunkFlags & C.NBD_REPLY_FLAG_DONE)) return this.bad('NONE chunk with a length or without DONE');
      return this.endChunk();
    }
    if (type === C.NBD_REPLY_TYPE_OFFSET_DATA) {
      if (req.type !== C.NBD_CMD_READ || len < 9) return this.bad(`OFFSET_DATA chunk of ${len} bytes for a ${C.COMMAND_NAMES[req.type]}`);
      this.state = GET_DATA_OFFSET;
      return undefined;
    }
    if (len > MAX_CHUNK_BODY) return this.bad(`chunk of type ${type} and ${len} bytes`);
    this.state = GET_CHUNK_BODY;
    return undefined;
  }

  /** A complete non-data chunk. Returns BAD_REPLY, or undefined to go on. */
  private chunkBody(b: Buffer): ReplyResult | undefined {
    const req = this.current!;
    const type = this.chunkType;
    if (type === C.NBD_REPLY_TYPE_OFFSET_HOLE) {
      if (req.type !== C.NBD_CMD_READ || b.length !== 12) return this.bad('OFFSET_HOLE chunk malformed or not for a read');
      const size = b.readUInt32BE(8);
      const at = this.within(Number(b.readBigUInt64BE(0)), size);
      if (at < 0 || size === 0) return BAD_REPLY;
      req.buf!.fill(0, at, at + size);
      req.covered += size;
      return undefined;
    }
    if (type === C.NBD_REPLY_TYPE_BLOCK_STATUS) {
      if (req.type !== C.NBD_CMD_BLOCK_STATUS || b.length < 12 || (b.length - 4) % 8 !== 0)
        return this.bad('BLOCK_STATUS chunk malformed or not for block status');
      const extents: Extent[] = [];
      for (let i = 4; i < b.length; i += 8) extents.push({ length: b.readUInt32BE(i), flags: b.readUInt32BE(i + 4) });
      req.statuses ??= new Map();
      req.statuses.set(b.readUInt32BE(0), extents);
      return undefined;
    }
    if (type & 0x8000) {
      // Every error chunk starts with error and message; an unknown one still fails just its request.
      if (b.length < 6 || 6 + b.readUInt16BE(4) > b.length) return this.bad('error chunk with a message longer than the chunk');
      if (req.errno === 0) {
        req.errno = b.readUInt32BE(0) || C.NBD_EIO;
        req.message = b.toString('utf8', 6, 6 + b.readUInt16BE(4));
      }
      return undefined;
    }
    return this.bad(`unknown chunk type ${type}`);
  }

  private endChunk(): ReplyResult | undefined {
    this.state = GET_MAGIC;
    if (!(this.chunkFlags & C.NBD_REPLY_FLAG_DONE)) return undefined;
    return this.finish(this.current!, this.current!.errno);
  }

  /** Where [offset, offset+length) lies in the current read's buffer; -1 (and BAD_REPLY state) outside it. */
  private within(offset: number, length: number): number {
    const req = this.current!;
    const at = offset - req.offset;
    if (at < 0 || at + length > req.length) {
      this.bad(`chunk at ${offset}+${length} outside the read ${req.offset}+${req.length}`);
      return -1;
    }
    return at;
  }

  private finish(req: ClientRequest, errno: number): ReplyResult {
    this.state = GET_MAGIC;
    req.errno = errno;
    this.done = req;
    this.current = undefined;
    return REPLY;
  }

  private bad(why: string): ReplyResult {
    this.state = LOST_SYNC;
    this.failure ||= why;
    return BAD_REPLY;
  }
}
