// A pipelined NBD client: fixed-newstyle handshake (structured replies, meta contexts,
// NBD_OPT_GO), then many requests in flight matched by cookie. The caller bounds how many.
// Reads land straight in the caller's buffer where the socket allows it (see directTarget).
import { connect, type Socket } from 'node:net';
import * as C from './constants.js';
import type { Extent } from './backend.js';
import { ByteQueue } from './byte-queue.js';
import { BAD_REPLY, NEED_INPUT, ReplyParser, type ClientRequest } from './client-reply-parser.js';
import { NbdClientError, ProtocolErrors } from './errors.js';
import { encodeRequest, lengthPrefixed, OPTION_REPLY_HEADER_SIZE } from './wire.js';

export interface NbdClientOptions {
  path?: string;
  host?: string;
  port?: number;
  exportName: string;
  /** Contexts to ask for with NBD_OPT_SET_META_CONTEXT; `contexts` has those granted. */
  metaContexts?: string[];
  /** Connect and handshake must finish in this long; default 10 s. */
  timeoutMs?: number;
}

/** Largest READ or WRITE sent, lowered to the server's NBD_INFO_BLOCK_SIZE maximum when it gives one. */
export const MAX_CLIENT_REQUEST = 32 * 1024 * 1024;
/** Where socket reads land when they cannot land in a caller's buffer. */
const STAGE_SIZE = 256 * 1024;
/** Longest option reply taken in the handshake. */
const MAX_OPTION_REPLY = 1024 * 1024;

const OPTION_NAMES: Record<number, string> = {
  [C.NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [C.NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
  [C.NBD_OPT_GO]: 'NBD_OPT_GO',
};

const REP_ERR_NAMES: Record<number, string> = {
  [C.NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [C.NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [C.NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [C.NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [C.NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [C.NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [C.NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [C.NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [C.NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
};

interface OptionReply {
  type: number;
  data: Buffer;
}

export class NbdClient {
  private exportSize = 0;
  private exportFlags = 0;
  private readonly granted = new Map<string, number>();
  private readonly contextNames = new Map<number, string>();
  private maxRequest = MAX_CLIENT_REQUEST;
  private readonly queue = new ByteQueue();
  private readonly stage = Buffer.allocUnsafeSlow(STAGE_SIZE);
  private readonly pending = new Map<number, ClientRequest>();
  private readonly parser = new ReplyParser(this.queue, (cookie) => this.pending.get(cookie));
  private transmitting = false;
  private nextCookie = 1;
  /** The caller's buffer the socket was last told to read into, if any. */
  private direct?: Buffer;
  /** Set once the connection is unusable: every request from then on fails with it. */
  private broken?: Error;
  /** Wakes the handshake when input arrives or the socket goes. */
  private wake?: () => void;
  private readonly socket: Socket;
  private readonly closed: Promise<void>;

  private constructor(o: NbdClientOptions) {
    const onread = {
      buffer: () => this.nextReadBuffer(),
      callback: (n: number, buf: Uint8Array) => {
        this.onRead(n, buf);
        return true;
      },
    };
    this.socket = o.path ? connect({ path: o.path, onread }) : connect({ host: o.host ?? '127.0.0.1', port: o.port ?? 10809, onread });
    this.socket.setNoDelay?.(true);
    this.socket.on('error', (err) => this.fail(ProtocolErrors.clientClosed(err.message)));
    this.closed = new Promise((resolve) =>
      this.socket.once('close', () => {
        this.fail(ProtocolErrors.clientClosed('the server closed the connection'));
        resolve();
      }),
    );
  }

  static async connect(o: NbdClientOptions): Promise<NbdClient> {
    const c = new NbdClient(o);
    const ms = o.timeoutMs ?? 10_000;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        c.handshake(o),
        new Promise<never>((_resolve, reject) => {
          timer = setTimeout(() => reject(ProtocolErrors.clientTimeout(ms)), ms);
        }),
      ]);
    } catch (err) {
      c.socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    return c;
  }

  /** The export's size in bytes. */
  get size(): number {
    return this.exportSize;
  }

  /** The transmission flags (NBD_FLAG_*). */
  get flags(): number {
    return this.exportFlags;
  }

  /** The contexts the server granted, by name, with their ids. */
  get contexts(): ReadonlyMap<string, number> {
    return this.granted;
  }

  get readOnly(): boolean {
    return (this.flags & C.NBD_FLAG_READ_ONLY) !== 0;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  // Handshake.

  private async need(n: number): Promise<Buffer> {
    while (this.queue.length < n) {
      if (this.broken) throw this.broken;
      await new Promise<void>((r) => (this.wake = r));
    }
    return this.queue.take(n);
  }

  private async handshake(o: NbdClientOptions): Promise<void> {
    const greet = await this.need(18);
    if (greet.readBigUInt64BE(0) !== C.NBDMAGIC || greet.readBigUInt64BE(8) !== C.IHAVEOPT) {
      throw ProtocolErrors.clientNotNbd('bad greeting magic');
    }
    const serverFlags = greet.readUInt16BE(16);
    if (!(serverFlags & C.NBD_FLAG_FIXED_NEWSTYLE)) throw ProtocolErrors.clientNotNbd('no NBD_FLAG_FIXED_NEWSTYLE');
    const flags = Buffer.allocUnsafe(4);
    flags.writeUInt32BE(C.NBD_FLAG_C_FIXED_NEWSTYLE | (serverFlags & C.NBD_FLAG_NO_ZEROES ? C.NBD_FLAG_C_NO_ZEROES : 0), 0);
    this.socket.write(flags);

    const structured = await this.option(C.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0), true);
    const wanted = o.metaContexts ?? [];
    if (wanted.length > 0) {
      if (structured.at(-1)!.type !== C.NBD_REP_ACK) throw ProtocolErrors.clientNoStructuredReplies();
      const count = Buffer.allocUnsafe(4);
      count.writeUInt32BE(wanted.length, 0);
      const data = Buffer.concat([lengthPrefixed(o.exportName), count, ...wanted.map(lengthPrefixed)]);
      for (const r of await this.option(C.NBD_OPT_SET_META_CONTEXT, data)) {
        if (r.type !== C.NBD_REP_META_CONTEXT || r.data.length < 4) continue;
        const id = r.data.readUInt32BE(0);
        const name = r.data.toString('utf8', 4);
        this.granted.set(name, id);
        this.contextNames.set(id, name);
      }
    }

    const info = Buffer.allocUnsafe(2 + 2);
    info.writeUInt16BE(1, 0);
    info.writeUInt16BE(C.NBD_INFO_BLOCK_SIZE, 2);
    let gotExport = false;
    for (const r of await this.option(C.NBD_OPT_GO, Buffer.concat([lengthPrefixed(o.exportName), info]), false, o.exportName)) {
      if (r.type !== C.NBD_REP_INFO || r.data.length < 2) continue;
      const kind = r.data.readUInt16BE(0);
      if (kind === C.NBD_INFO_EXPORT && r.data.length >= 12) {
        this.exportSize = Number(r.data.readBigUInt64BE(2));
        this.exportFlags = r.data.readUInt16BE(10);
        gotExport = true;
      } else if (kind === C.NBD_INFO_BLOCK_SIZE && r.data.length >= 14) {
        const max = r.data.readUInt32BE(10);
        if (max > 0) this.maxRequest = Math.min(this.maxRequest, max);
      }
    }
    if (!gotExport) throw ProtocolErrors.clientBadReply('NBD_OPT_GO acknowledged without NBD_INFO_EXPORT');
    this.transmitting = true;
    // Replies cannot come before requests, but parse whatever did arrive with the ACK.
    this.pump();
  }

  /**
   * Sends one option and gathers its replies up to NBD_REP_ACK. An error reply throws,
   * unless `unsupportedOk` and it is NBD_REP_ERR_UNSUP (then it is the last reply).
   */
  private async option(option: number, data: Buffer, unsupportedOk = false, exportName = ''): Promise<OptionReply[]> {
    const head = Buffer.allocUnsafe(16);
    head.writeBigUInt64BE(C.IHAVEOPT, 0);
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data]));
    const replies: OptionReply[] = [];
    for (;;) {
      const h = await this.need(OPTION_REPLY_HEADER_SIZE);
      if (h.readBigUInt64BE(0) !== C.REPLY_MAGIC_OPT) throw ProtocolErrors.clientNotNbd('bad option reply magic');
      if (h.readUInt32BE(8) !== option) throw ProtocolErrors.clientBadReply(`reply to option ${h.readUInt32BE(8)}, sent ${option}`);
      const type = h.readUInt32BE(12);
      const length = h.readUInt32BE(16);
      if (length > MAX_OPTION_REPLY) throw ProtocolErrors.clientBadReply(`option reply of ${length} bytes`);
      // A copy: the queue's views point into the staging buffer, which is read into again.
      const body = Buffer.from(await this.need(length));
      replies.push({ type, data: body });
      if (type === C.NBD_REP_ACK) return replies;
      if (type >= 0x80000000) {
        if (unsupportedOk && type === C.NBD_REP_ERR_UNSUP) return replies;
        throw optionError(option, type, body.toString('utf8'), exportName);
      }
    }
  }

  // Socket reads.

  private nextReadBuffer(): Uint8Array {
    this.direct = this.transmitting ? this.parser.directTarget() : undefined;
    return this.direct ?? this.stage;
  }

  private onRead(n: number, buf: Uint8Array): void {
    const d = this.direct;
    if (d && buf.buffer === d.buffer && buf.byteOffset === d.byteOffset) {
      this.parser.landed(n);
      this.pump();
      return;
    }
    this.queue.push(Buffer.from(buf.buffer, buf.byteOffset, n));
    this.pump();
    // The stage is read into again: whatever is still queued from it is copied out.
    this.queue.detach(this.stage.buffer);
  }

  private pump(): void {
    if (!this.transmitting) {
      const w = this.wake;
      this.wake = undefined;
      w?.();
      return;
    }
    for (;;) {
      const r = this.parser.parse();
      if (r === NEED_INPUT) return;
      if (r === BAD_REPLY) {
        this.fail(ProtocolErrors.clientBadReply(this.parser.failure));
        this.socket.destroy();
        return;
      }
      const req = this.parser.done!;
      this.pending.delete(req.cookie);
      this.settle(req);
    }
  }

  private settle(req: ClientRequest): void {
    if (req.errno !== 0) {
      const what = `${C.COMMAND_NAMES[req.type]} ${req.offset}+${req.length}`;
      req.reject(new NbdClientError(req.errno, what, req.message));
    } else if (req.buf && req.covered !== req.length) {
      // Chunks may not overlap, so the sum tells whether all of the read was sent.
      this.fail(ProtocolErrors.clientBadReply(`read ${req.offset}+${req.length} answered with ${req.covered} bytes`));
      req.reject(this.broken!);
      this.socket.destroy();
    } else {
      req.resolve();
    }
  }

  /** The connection is unusable: every pending request, and every later one, fails with err. */
  private fail(err: Error): void {
    this.broken ??= err;
    const w = this.wake;
    this.wake = undefined;
    w?.();
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(this.broken);
  }

  // Requests.

  private submit(type: number, offset: number, length: number, flags: number, buf?: Buffer, payload?: Buffer): Promise<ClientRequest> {
    if (this.broken) return Promise.reject(this.broken);
    if ((type === C.NBD_CMD_READ || type === C.NBD_CMD_WRITE) && length > this.maxRequest) {
      return Promise.reject(ProtocolErrors.clientTooLarge(length, this.maxRequest));
    }
    const cookie = this.nextCookie;
    this.nextCookie = this.nextCookie === 0xffffffff ? 1 : this.nextCookie + 1;
    return new Promise((resolve, reject) => {
      const req: ClientRequest = {
        cookie,
        type,
        offset,
        length,
        buf,
        covered: 0,
        errno: 0,
        message: '',
        resolve: () => resolve(req),
        reject,
      };
      this.pending.set(cookie, req);
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

  /** Fills buf with the export's bytes from offset. */
  async read(buf: Buffer, offset: number): Promise<void> {
    await this.submit(C.NBD_CMD_READ, offset, buf.length, 0, buf);
  }

  /** buf must stay unchanged until the promise settles: it is sent from in place. */
  async write(buf: Buffer, offset: number, fua = false): Promise<void> {
    await this.submit(C.NBD_CMD_WRITE, offset, buf.length, fua ? C.NBD_CMD_FLAG_FUA : 0, undefined, buf);
  }

  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean; fua?: boolean } = {}): Promise<void> {
    const flags = (opts.noHole ? C.NBD_CMD_FLAG_NO_HOLE : 0) | (opts.fua ? C.NBD_CMD_FLAG_FUA : 0);
    await this.submit(C.NBD_CMD_WRITE_ZEROES, offset, length, flags);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.submit(C.NBD_CMD_TRIM, offset, length, 0);
  }

  async flush(): Promise<void> {
    await this.submit(C.NBD_CMD_FLUSH, 0, 0, 0);
  }

  /** Extents of every granted context, by name, as the server sent them (they may cover less than asked). */
  async blockStatus(offset: number, length: number): Promise<Map<string, Extent[]>> {
    if (this.granted.size === 0) throw ProtocolErrors.clientNoContext();
    const req = await this.submit(C.NBD_CMD_BLOCK_STATUS, offset, length, 0);
    const out = new Map<string, Extent[]>();
    for (const [id, extents] of req.statuses ?? []) {
      const name = this.contextNames.get(id);
      if (name !== undefined) out.set(name, extents);
    }
    return out;
  }

  /** NBD_CMD_DISC, then the end of the socket; requests in flight are answered first. */
  async close(): Promise<void> {
    if (!this.socket.destroyed && !this.broken) {
      this.socket.write(encodeRequest({ flags: 0, type: C.NBD_CMD_DISC, cookieHi: 0, cookieLo: 0, offset: 0n, length: 0 }));
      this.socket.end();
    }
    await this.closed;
  }

  /** Drops the connection at once; pending requests fail. */
  destroy(): void {
    this.socket.destroy();
  }
}

function optionError(option: number, type: number, message: string, exportName: string): Error {
  const opt = OPTION_NAMES[option] ?? `option ${option}`;
  const reply = REP_ERR_NAMES[type] ?? `0x${type.toString(16)}`;
  if (type === C.NBD_REP_ERR_UNKNOWN) return ProtocolErrors.clientUnknownExport(exportName, message);
  if (type === C.NBD_REP_ERR_POLICY || type === C.NBD_REP_ERR_TLS_REQD) return ProtocolErrors.clientAccessDenied(opt, reply, message);
  return ProtocolErrors.clientOptionRefused(opt, reply, message);
}
