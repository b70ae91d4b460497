// A pipelined NBD client for tests and tools: fixed-newstyle handshake with
// NBD_OPT_GO, simple replies, many requests in flight matched by cookie. Input is
// buffered in the protocol's own ByteQueue so large reads are not re-copied.
import { connect, type Socket } from 'node:net';
import { performance } from 'node:perf_hooks';
import * as C from '../../protocol/constants.js';
import { ByteQueue } from '../../protocol/byte-queue.js';
import { encodeRequest } from '../../protocol/wire.js';

export class NbdError extends Error {
  constructor(
    readonly errno: number,
    what: string,
  ) {
    super(`${what}: NBD error ${errno}`);
  }
}

interface Pending {
  readLength: number;
  resolve: (data: Buffer | undefined) => void;
  reject: (err: Error) => void;
  what: string;
}

export interface NbdClientOptions {
  host?: string;
  port?: number;
  path?: string;
  exportName?: string;
  /** Rejects the connect or handshake after this long. */
  timeoutMs?: number;
}

export class NbdClient {
  size = 0;
  flags = 0;
  private readonly q = new ByteQueue();
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private header?: { error: number; cookie: number };
  private closedErr?: Error;
  readonly closed: Promise<void>;

  private constructor(readonly socket: Socket) {
    this.closed = new Promise((r) => socket.once('close', () => r()));
  }

  static async connect(o: NbdClientOptions): Promise<NbdClient> {
    const s = o.path ? connect({ path: o.path }) : connect({ host: o.host ?? '127.0.0.1', port: o.port ?? 10809 });
    s.setNoDelay?.(true);
    const c = new NbdClient(s);
    const timeout = o.timeoutMs ?? 10_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        c.handshake(o.exportName ?? ''),
        new Promise((_r, rej) => {
          timer = setTimeout(() => rej(new Error(`NBD handshake timed out after ${timeout} ms`)), timeout);
        }),
      ]);
    } catch (err) {
      s.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    return c;
  }

  private async handshake(name: string): Promise<void> {
    const s = this.socket;
    const buf = new ByteQueue();
    let wake: (() => void) | undefined;
    let failed: Error | undefined;
    const onData = (d: Buffer) => {
      buf.push(d);
      wake?.();
    };
    const onEnd = () => {
      failed = new Error('server closed the connection during the handshake');
      wake?.();
    };
    s.on('data', onData);
    s.once('close', onEnd);
    s.on('error', (err) => {
      failed ??= err;
      wake?.();
    });
    const need = async (n: number): Promise<Buffer> => {
      while (buf.length < n) {
        if (failed) throw failed;
        await new Promise<void>((r) => (wake = r));
      }
      return buf.take(n);
    };
    const greet = await need(18);
    if (greet.readBigUInt64BE(0) !== C.NBDMAGIC || greet.readBigUInt64BE(8) !== C.IHAVEOPT) throw new Error('not an NBD server');
    const nameBuf = Buffer.from(name, 'utf8');
    const opt = Buffer.alloc(4 + 16 + 4 + nameBuf.length + 2);
    opt.writeUInt32BE(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES, 0);
    opt.writeBigUInt64BE(C.IHAVEOPT, 4);
    opt.writeUInt32BE(C.NBD_OPT_GO, 12);
    opt.writeUInt32BE(4 + nameBuf.length + 2, 16);
    opt.writeUInt32BE(nameBuf.length, 20);
    nameBuf.copy(opt, 24);
    opt.writeUInt16BE(0, 24 + nameBuf.length);
    s.write(opt);
    for (;;) {
      const h = await need(20);
      const type = h.readUInt32BE(12);
      const data = await need(h.readUInt32BE(16));
      if (type >= 0x80000000) {
        throw Object.assign(new Error(`NBD_OPT_GO for "${name}" refused: 0x${type.toString(16)} ${data.toString('utf8')}`), {
          reply: type,
        });
      }
      if (type === C.NBD_REP_INFO && data.readUInt16BE(0) === C.NBD_INFO_EXPORT) {
        this.size = Number(data.readBigUInt64BE(2));
        this.flags = data.readUInt16BE(10);
      }
      if (type === C.NBD_REP_ACK) break;
    }
    s.off('data', onData);
    s.off('close', onEnd);
    // Bytes after the ACK (none are expected) belong to transmission.
    while (buf.length) this.q.push(buf.take(buf.length));
    s.on('data', (d: Buffer) => {
      this.q.push(d);
      this.parse();
    });
    s.once('close', () => this.failAll(new Error('connection closed')));
  }

  get inFlight(): number {
    return this.pending.size;
  }

  private failAll(err: Error): void {
    this.closedErr ??= err;
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(err);
  }

  private parse(): void {
    for (;;) {
      if (!this.header) {
        if (this.q.length < 16) return;
        const h = this.q.take(16);
        if (h.readUInt32BE(0) !== C.NBD_SIMPLE_REPLY_MAGIC) {
          this.failAll(new Error(`bad reply magic 0x${h.readUInt32BE(0).toString(16)}`));
          this.socket.destroy();
          return;
        }
        this.header = { error: h.readUInt32BE(4), cookie: h.readUInt32BE(12) };
      }
      const { error, cookie } = this.header;
      const p = this.pending.get(cookie);
      if (!p) {
        this.failAll(new Error(`reply for unknown cookie ${cookie}`));
        this.socket.destroy();
        return;
      }
      if (error === 0 && p.readLength > 0) {
        if (this.q.length < p.readLength) return;
        const data = Buffer.allocUnsafe(p.readLength);
        this.q.copyOut(data, 0, p.readLength);
        this.header = undefined;
        this.pending.delete(cookie);
        p.resolve(data);
        continue;
      }
      this.header = undefined;
      this.pending.delete(cookie);
      if (error !== 0) p.reject(new NbdError(error, p.what));
      else p.resolve(undefined);
    }
  }

  private submit(type: number, offset: number, length: number, flags: number, payload?: Buffer): Promise<Buffer | undefined> {
    if (this.closedErr) return Promise.reject(this.closedErr);
    const cookie = this.nextCookie;
    this.nextCookie = (this.nextCookie % 0x7fffffff) + 1;
    const what = `${C.COMMAND_NAMES[type]} ${offset}+${length}`;
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { readLength: type === C.NBD_CMD_READ ? length : 0, resolve, reject, what });
      const head = encodeRequest({ flags, type, cookieHi: 0, cookieLo: cookie, offset: BigInt(offset), length });
      if (payload) {
        this.socket.cork();
        this.socket.write(head);
        this.socket.write(payload);
        this.socket.uncork();
      } else {
        this.socket.write(head);
      }
    });
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return (await this.submit(C.NBD_CMD_READ, offset, length, 0))!;
  }

  async write(offset: number, data: Buffer, fua = false): Promise<void> {
    await this.submit(C.NBD_CMD_WRITE, offset, data.length, fua ? C.NBD_CMD_FLAG_FUA : 0, data);
  }

  async flush(): Promise<void> {
    await this.submit(C.NBD_CMD_FLUSH, 0, 0, 0);
  }

  async trim(offset: number, length: number, fua = false): Promise<void> {
    await this.submit(C.NBD_CMD_TRIM, offset, length, fua ? C.NBD_CMD_FLAG_FUA : 0);
  }

  /** Sends NBD_CMD_DISC and waits for the server to close. */
  async disconnect(): Promise<void> {
    if (!this.socket.destroyed) {
      this.socket.write(encodeRequest({ flags: 0, type: C.NBD_CMD_DISC, cookieHi: 0, cookieLo: 0, offset: 0n, length: 0 }));
      this.socket.end();
    }
    await this.closed;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** Milliseconds, for latency figures. */
export function now(): number {
  return performance.now();
}

/** p50/p90/p99/max of a list of numbers (sorted in place). */
export function percentiles(xs: number[] | Float64Array): { n: number; p50: number; p90: number; p99: number; max: number } {
  const a = xs instanceof Float64Array ? xs.sort() : Float64Array.from(xs).sort();
  const at = (p: number) => (a.length ? a[Math.min(a.length - 1, Math.floor(p * a.length))]! : 0);
  return { n: a.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: a.length ? a[a.length - 1]! : 0 };
}

/** A deterministic, seed-dependent pattern (len a multiple of 4). */
export function fill(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return b;
}

/** 0 when the request succeeded, else the NBD error it was answered with. */
export async function nbdErrno(p: Promise<unknown>): Promise<number> {
  try {
    await p;
    return 0;
  } catch (e) {
    if (e instanceof NbdError) return e.errno;
    throw e;
  }
}
