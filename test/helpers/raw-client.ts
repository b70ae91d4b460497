// A byte-level NBD client for tests: send arbitrary frames, read exact byte counts.
import { connect, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import * as C from '../../protocol/constants.js';
import { clientFlags, goData, option, parseOptionReplies } from './frames.js';

export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  ended = false;
  readonly closed: Promise<void>;

  private readonly onData = (d: Buffer) => {
    this.buf = Buffer.concat([this.buf, d]);
    this.wake();
  };

  private constructor(readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('error', () => undefined);
    this.closed = new Promise((r) =>
      socket.once('close', () => {
        this.ended = true;
        this.wake();
        r();
      }),
    );
  }

  static async connect(port: number, host = '127.0.0.1', localAddress?: string): Promise<RawClient> {
    const s = connect({ port, host, localAddress });
    await new Promise<void>((res, rej) => {
      s.once('connect', res);
      s.once('error', rej);
    });
    s.setNoDelay(true);
    return new RawClient(s);
  }

  /**
   * After the server's NBD_REP_ACK to NBD_OPT_STARTTLS: runs the TLS handshake on
   * this socket and returns a client reading and writing through TLS. Rejects when
   * the handshake fails or the server hangs up.
   */
  async starttls(options: ConnectionOptions = {}): Promise<RawClient> {
    if (this.buf.length) throw new Error(`${this.buf.length} unread bytes before STARTTLS`);
    this.socket.off('data', this.onData);
    const s = tlsConnect({ socket: this.socket, servername: 'localhost', ...options });
    await new Promise<void>((res, rej) => {
      s.once('secureConnect', res);
      s.once('error', rej);
      s.once('close', () => rej(new Error('connection closed during the TLS handshake')));
    });
    return new RawClient(s);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  send(b: Buffer): void {
    this.socket.write(b);
  }

  get buffered(): number {
    return this.buf.length;
  }

  /** Reads exactly n bytes; rejects if the server closes first or after timeoutMs. */
  async read(n: number, timeoutMs = 10_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.ended) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out with ${this.buf.length}/${n} bytes`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Reads until the server closes; returns everything. */
  async readAll(timeoutMs = 10_000): Promise<Buffer> {
    await Promise.race([this.closed, new Promise((r) => setTimeout(r, timeoutMs))]);
    const out = this.buf;
    this.buf = Buffer.alloc(0);
    return out;
  }

  /** Handshake with NBD_OPT_GO (optionally structured replies and base:allocation). */
  async go(name = '', opts: { structured?: boolean; meta?: boolean } = {}): Promise<{ size: number; flags: number }> {
    await this.read(18);
    const frames = [clientFlags()];
    if (opts.structured) frames.push(option(C.NBD_OPT_STRUCTURED_REPLY));
    if (opts.meta) {
      const name_ = Buffer.from(name);
      const q = Buffer.from('base:allocation');
      const data = Buffer.alloc(4 + name_.length + 4 + 4 + q.length);
      let at = data.writeUInt32BE(name_.length, 0);
      at += name_.copy(data, at);
      at = data.writeUInt32BE(1, at);
      at = data.writeUInt32BE(q.length, at);
      q.copy(data, at);
      frames.push(option(C.NBD_OPT_SET_META_CONTEXT, data));
    }
    frames.push(option(C.NBD_OPT_GO, goData(name)));
    this.send(Buffer.concat(frames));
    let size = 0;
    let flags = 0;
    for (;;) {
      const head = await this.read(20);
      const len = head.readUInt32BE(16);
      const data = await this.read(len);
      const { replies } = parseOptionReplies(Buffer.concat([head, data]));
      const r = replies[0]!;
      if (r.type >>> 0 >= 0x80000000) throw new Error(`option ${r.option} failed: 0x${(r.type >>> 0).toString(16)}`);
      if (r.option === C.NBD_OPT_GO && r.type === C.NBD_REP_INFO && r.data.readUInt16BE(0) === C.NBD_INFO_EXPORT) {
        size = Number(r.data.readBigUInt64BE(2));
        flags = r.data.readUInt16BE(10);
      }
      if (r.option === C.NBD_OPT_GO && r.type === C.NBD_REP_ACK) return { size, flags };
    }
  }

  /** Reads one simple reply: [error, cookie] and the data for a successful read. */
  async simpleReply(readLength = 0): Promise<{ error: number; cookie: number; data?: Buffer }> {
    const h = await this.read(16);
    if (h.readUInt32BE(0) !== C.NBD_SIMPLE_REPLY_MAGIC) throw new Error(`bad reply magic ${h.toString('hex')}`);
    const error = h.readUInt32BE(4);
    const cookie = h.readUInt32BE(12);
    const data = error === 0 && readLength > 0 ? await this.read(readLength) : undefined;
    return { error, cookie, data };
  }

  /** Reads one structured chunk. */
  async chunk(): Promise<{ flags: number; type: number; cookie: number; payload: Buffer }> {
    const h = await this.read(20);
    if (h.readUInt32BE(0) !== C.NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad chunk magic ${h.toString('hex')}`);
    const payload = await this.read(h.readUInt32BE(16));
    return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readUInt32BE(12), payload };
  }

  close(): void {
    this.socket.destroy();
  }
}
