// Replies written to a plain socket's file descriptor from libuv's threadpool, so the
// copy of large read replies into the kernel (tcp_sendmsg) leaves the event-loop thread.
//
// Everything a connection sends in transmission goes through one ordered queue with two
// ways out: a batch of at least `minBytes` is one writev(2) in the threadpool; smaller
// batches go through the socket as before (cheap, and batched per event-loop turn).
// At most one threadpool write is in flight per connection and it starts only when the
// socket has nothing pending, so the bytes leave in order and replies stay whole.
// The socket is non-blocking, so a threadpool write never waits for a client that does
// not read: what the kernel does not take at once (EAGAIN, or a short count) goes on
// through the socket, whose writes libuv resumes when the client reads again.
import { writev } from 'node:fs';
import type { Socket } from 'node:net';

/** The socket's libuv handle, as Node 20 keeps it on net.Socket. */
interface Handle {
  fd?: number;
  close?: (cb?: () => void) => void;
  reset?: (cb?: () => void) => void;
}

/** iovecs per writev: Linux's IOV_MAX. */
const MAX_IOV = 1024;

export class ThreadpoolSender {
  private queue: Buffer[] = [];
  private queueBytes = 0;
  /** Callbacks of queued replies: each runs once the batch holding its last frame is taken. */
  private queueDone: (() => void)[] = [];
  /** Bytes of the threadpool write in flight. */
  private poolBytes = 0;
  /** Socket writes whose completion has not been seen. */
  private socketPending = 0;
  private flushScheduled = false;
  private overLimit = false;
  private ending?: () => void;
  /** The handle's close, held back while a threadpool write may still use the descriptor. */
  private closeAfterWrite?: () => void;

  private constructor(
    private readonly socket: Socket,
    private readonly fd: number,
    private readonly minBytes: number,
    /** Unsent bytes past which the connection stops reading (maxWriteBuffer). */
    private readonly limit: number,
    /** Called once unsent bytes fall back to the limit after going past it. */
    private readonly onDrain: () => void,
  ) {}

  /**
   * A sender for a plain TCP or Unix socket (the caller keeps TLS sockets out), or undefined
   * when there is no descriptor to write to (a stream that is not a socket) or minBytes is 0.
   */
  static attach(socket: Socket, minBytes: number, limit: number, onDrain: () => void): ThreadpoolSender | undefined {
    if (minBytes <= 0 || socket.destroyed) return undefined;
    const handle = (socket as unknown as { _handle?: Handle | null })._handle;
    const fd = handle?.fd;
    if (!handle || typeof fd !== 'number' || fd < 0 || typeof handle.close !== 'function') return undefined;
    const sender = new ThreadpoolSender(socket, fd, minBytes, limit, onDrain);
    sender.holdCloseWhileWriting(handle);
    return sender;
  }

  /** Bytes handed to the sender and not yet taken by the kernel. */
  get writableLength(): number {
    return this.queueBytes + this.poolBytes + this.socket.writableLength;
  }

  /**
   * Queues one reply's frames; `done` runs once the kernel has taken them, or the socket is
   * gone. Returns true when more than `limit` bytes are unsent (the caller stops reading).
   */
  write(frames: readonly Buffer[], done?: () => void): boolean {
    for (const f of frames) {
      this.queue.push(f);
      this.queueBytes += f.length;
    }
    if (done) this.queueDone.push(done);
    if (this.queueBytes >= this.minBytes) this.flush();
    else if (!this.flushScheduled) {
      // Replies finished in this turn leave together, as the socket's cork did.
      this.flushScheduled = true;
      setImmediate(this.scheduledFlush);
    }
    if (this.writableLength > this.limit) this.overLimit = true;
    return this.overLimit;
  }

  /** Ends the socket once everything queued has left. */
  end(cb: () => void): void {
    this.ending = cb;
    this.maybeEnd();
  }

  private readonly scheduledFlush = () => {
    this.flushScheduled = false;
    this.flush();
  };

  private flush(): void {
    if (this.poolBytes > 0 || this.queue.length === 0) return;
    if (this.socket.destroyed) {
      this.dropQueue();
      return;
    }
    if (this.queueBytes >= this.minBytes && this.socketPending === 0 && this.socket.writableLength === 0) {
      this.writeFromPool();
      return;
    }
    // A large batch behind socket writes still pending waits for them: their callback flushes.
    if (this.queueBytes >= this.minBytes && this.socketPending > 0) return;
    const bufs = this.queue;
    const done = this.queueDone;
    this.queue = [];
    this.queueDone = [];
    this.queueBytes = 0;
    this.writeToSocket(bufs, done);
  }

  private writeFromPool(): void {
    let n = this.queue.length;
    let done = this.queueDone;
    if (n > MAX_IOV) {
      // Callbacks ride with the final batch: they may only run once every frame before them left.
      n = MAX_IOV;
      done = [];
    } else this.queueDone = [];
    const bufs = this.queue.splice(0, n);
    let bytes = 0;
    for (const b of bufs) bytes += b.length;
    this.queueBytes -= bytes;
    this.poolBytes = bytes;
    writev(this.fd, bufs, null, (err, written) => this.poolWritten(bufs, done, err, written));
  }

  private poolWritten(bufs: Buffer[], done: (() => void)[], err: NodeJS.ErrnoException | null, written: number): void {
    this.poolBytes = 0;
    this.closeAfterWrite?.();
    const taken = err ? 0 : written;
    if (err && err.code !== 'EAGAIN' && err.code !== 'EWOULDBLOCK') {
      this.socket.destroy(err);
      runAll(done);
      this.dropQueue();
      this.maybeEnd();
      return;
    }
    const rest = taken === 0 ? bufs : remainder(bufs, taken);
    if (rest.length > 0 && !this.socket.destroyed) this.writeToSocket(rest, done);
    else runAll(done);
    this.flush();
    this.checkDrain();
    this.maybeEnd();
  }

  private writeToSocket(bufs: Buffer[], done: (() => void)[]): void {
    const s = this.socket;
    if (s.destroyed) {
      runAll(done);
      return;
    }
    this.socketPending++;
    s.cork();
    for (let i = 0; i < bufs.length - 1; i++) s.write(bufs[i]!);
    s.write(bufs[bufs.length - 1]!, () => {
      this.socketPending--;
      runAll(done);
      this.flush();
      this.checkDrain();
      this.maybeEnd();
    });
    s.uncork();
  }

  private checkDrain(): void {
    if (this.overLimit && this.writableLength <= this.limit) {
      this.overLimit = false;
      this.onDrain();
    }
  }

  private maybeEnd(): void {
    const cb = this.ending;
    if (!cb || this.queue.length > 0 || this.poolBytes > 0) return;
    this.ending = undefined;
    this.socket.end(cb);
  }

  /** The socket is gone: queued replies will never leave, and their callbacks give back what they hold. */
  private dropQueue(): void {
    const done = this.queueDone;
    this.queue = [];
    this.queueDone = [];
    this.queueBytes = 0;
    runAll(done);
  }

  /**
   * Defers the handle's close (and reset) until a threadpool write in flight returns: the
   * kernel could otherwise give the descriptor number to a file opened meanwhile, and the
   * write would land in it.
   */
  private holdCloseWhileWriting(handle: Handle): void {
    for (const name of ['close', 'reset'] as const) {
      const original = handle[name];
      if (typeof original !== 'function') continue;
      handle[name] = (cb?: () => void) => {
        if (this.poolBytes === 0) return original.call(handle, cb);
        this.closeAfterWrite = () => {
          this.closeAfterWrite = undefined;
          original.call(handle, cb);
        };
      };
    }
  }
}

function runAll(fns: (() => void)[]): void {
  for (const f of fns) f();
}

/** The part of `bufs` after its first `n` bytes. */
function remainder(bufs: Buffer[], n: number): Buffer[] {
  let i = 0;
  while (i < bufs.length && n >= bufs[i]!.length) n -= bufs[i++]!.length;
  if (i === bufs.length) return [];
  const rest = bufs.slice(i);
  if (n > 0) rest[0] = rest[0]!.subarray(n);
  return rest;
}
