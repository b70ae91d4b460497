// A deliberately small NBD client over node:net for the requests real clients
// never send: unknown commands, oversized reads and writes, bad magic. It
// checks framing as it reads, so a reply that is not where it should be fails.
import { connect, type Socket } from 'node:net';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const REPLY_MAGIC_OPT = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_UNKNOWN: 0x80000006,
  ERR_TOO_BIG: 0x80000009,
} as const;
export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
export const REPLY_TYPE = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
export const EPERM = 1;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;

export const ERRNO_NAMES: Record<number, string> = {
  0: 'OK',
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export interface SimpleReply {
  error: number;
  cookie: bigint;
  data?: Buffer;
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  data: Buffer;
}

export class RawNbd {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private ended = false;
  private waiter?: () => void;
  private nextCookie = 1n;
  handshakeFlags = 0;

  private constructor(readonly sock: Socket) {
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.buffered += b.length;
      this.wake();
    });
    sock.on('end', () => {
      this.ended = true;
      this.wake();
    });
    sock.on('close', () => {
      this.ended = true;
      this.wake();
    });
    // A reset after we sent garbage counts as the server hanging up.
    sock.on('error', () => {
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** Connects and completes the greeting, asking for NO_ZEROES. */
  static async open(port: number, host = '127.0.0.1'): Promise<RawNbd> {
    const sock = connect(port, host);
    await new Promise<void>((res, rej) => {
      sock.once('connect', res);
      sock.once('error', rej);
    });
    sock.setNoDelay(true);
    const c = new RawNbd(sock);
    const g = await c.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not a newstyle NBD server');
    c.handshakeFlags = g.readUInt16BE(16);
    c.write(u32(0b11)); // C_FIXED_NEWSTYLE | C_NO_ZEROES
    return c;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  /** Exactly n bytes, or throws if the server hangs up first or takes too long. */
  async read(n: number, timeoutMs = 10_000): Promise<Buffer> {
    const until = Date.now() + timeoutMs;
    while (this.buffered < n) {
      if (this.ended) throw new Error(`connection closed with ${this.buffered} of ${n} bytes`);
      const left = until - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buffered})`);
      await new Promise<void>((res) => {
        const timer = setTimeout(res, left);
        this.waiter = () => {
          clearTimeout(timer);
          res();
        };
      });
    }
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.buffered = rest.length;
    return out;
  }

  /** Resolves true if the server closes the connection (after any pending bytes), false on timeout. */
  async closedByServer(timeoutMs = 5_000): Promise<{ closed: boolean; extraBytes: number }> {
    const until = Date.now() + timeoutMs;
    while (!this.ended && Date.now() < until) {
      await new Promise<void>((res) => {
        const timer = setTimeout(res, until - Date.now());
        this.waiter = () => {
          clearTimeout(timer);
          res();
        };
      });
    }
    return { closed: this.ended, extraBytes: this.buffered };
  }

  get isClosed(): boolean {
    return this.ended;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<OptionReply> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== REPLY_MAGIC_OPT) throw new Error(`bad option reply magic 0x${h.readBigUInt64BE(0).toString(16)}`);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? await this.read(len) : Buffer.alloc(0) };
  }

  /** Every reply to one option, up to and including the ACK or the first error. */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.sendOption(option, data);
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply();
      if (r.option !== option) throw new Error(`reply for option ${r.option} while waiting for ${option}`);
      out.push(r);
      if (r.type === REP.ACK || (r.type & 0x80000000) !== 0) return out;
    }
  }

  /** NBD_OPT_INFO / NBD_OPT_GO payload. */
  static infoRequest(name: string, infos: number[] = []): Buffer {
    const n = Buffer.from(name, 'utf8');
    const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    b.writeUInt32BE(n.length, 0);
    n.copy(b, 4);
    b.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((v, i) => {
      b.writeUInt16BE(v, 6 + n.length + 2 * i);
    });
    return b;
  }

  /** Negotiates (optionally structured replies) and enters transmission on `name`. */
  async go(name: string, structured = false): Promise<{ size: bigint; flags: number }> {
    if (structured) {
      const r = await this.option(OPT.STRUCTURED_REPLY);
      if (r.at(-1)!.type !== REP.ACK) throw new Error('structured replies refused');
    }
    const replies = await this.option(OPT.GO, RawNbd.infoRequest(name));
    const last = replies.at(-1)!;
    if (last.type !== REP.ACK) throw new Error(`GO refused: 0x${last.type.toString(16)} ${last.data.toString()}`);
    const exp = replies.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === INFO.EXPORT);
    if (!exp) throw new Error('GO without NBD_INFO_EXPORT');
    return { size: exp.data.readBigUInt64BE(2), flags: exp.data.readUInt16BE(10) };
  }

  /** Sends one request header (and payload) and returns its cookie. */
  request(type: number, offset: bigint | number, length: number, opts: { flags?: number; payload?: Buffer } = {}): bigint {
    const cookie = this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(opts.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.write(opts.payload ? Buffer.concat([h, opts.payload]) : h);
    return cookie;
  }

  /** A simple reply; `readLength` bytes of data follow only a successful read. */
  async simpleReply(readLength = 0): Promise<SimpleReply> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`expected a simple reply, got magic 0x${magic.toString(16)}`);
    return this.simpleRest(readLength);
  }

  private async simpleRest(readLength: number): Promise<SimpleReply> {
    const h = await this.read(12);
    const error = h.readUInt32BE(0);
    const cookie = h.readBigUInt64BE(4);
    if (error === 0 && readLength > 0) return { error, cookie, data: await this.read(readLength, 60_000) };
    return { error, cookie };
  }

  async chunk(): Promise<Chunk> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`expected a structured reply, got magic 0x${magic.toString(16)}`);
    return this.chunkRest();
  }

  private async chunkRest(): Promise<Chunk> {
    const h = await this.read(16);
    const len = h.readUInt32BE(12);
    return {
      flags: h.readUInt16BE(0),
      type: h.readUInt16BE(2),
      cookie: h.readBigUInt64BE(4),
      data: len ? await this.read(len, 60_000) : Buffer.alloc(0),
    };
  }

  /** All chunks of one structured reply, up to the one flagged DONE. */
  async structuredReply(): Promise<Chunk[]> {
    const out: Chunk[] = [];
    for (;;) {
      const c = await this.chunk();
      out.push(c);
      if (c.flags & 1) return out;
    }
  }

  /**
   * The reply to a request that carries no data back, in whichever form the
   * server chose: with structured replies negotiated the spec lets a server
   * answer such requests with either kind.
   */
  async plainReply(): Promise<{ cookie: bigint; error: number; form: 'simple' | 'structured' }> {
    const magic = (await this.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const r = await this.simpleRest(0);
      return { cookie: r.cookie, error: r.error, form: 'simple' };
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
    let error = 0;
    for (;;) {
      const c = await this.chunkRest();
      if (c.type & 0x8000) error = c.data.readUInt32BE(0);
      if (c.flags & 1) return { cookie: c.cookie, error, form: 'structured' };
    }
  }

  close(): void {
    this.sock.destroy();
  }
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v, 0);
  return b;
}
