// Block devices the COW engine reads and writes. The engine only ever sees this
// interface, so the crash tests can swap files for a fault-injecting memory model.
import * as fs from 'node:fs';
import { dirname } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Limiter } from './chunk-locks.js';
import { CowErrors } from './errors.js';
import { fallocateHelper } from './fallocate.js';

export interface BlockDevice {
  /** Current size in bytes. Stores grow by writing past the end. */
  readonly size: number;
  /**
   * Fills buf from offset; bytes past the end read as zeros. background: no client waits
   * on this call directly (a copy, a held write landing), so it stays off the event loop.
   */
  read(buf: Buffer, offset: number, background?: boolean): Promise<void>;
  write(buf: Buffer, offset: number, background?: boolean): Promise<void>;
  /** Makes every completed write durable (fdatasync). */
  sync(): Promise<void>;
  /**
   * A write that is durable when it resolves, syncing nothing else (O_DSYNC). Optional:
   * callers fall back to write + sync. For small metadata that must not wait behind a
   * sync of everything else the file has dirty (under load, tens of MiB of copies).
   */
  writeDurable?(buf: Buffer, offset: number): Promise<void>;
  /** Deallocates a range; it then reads as zeros. Optional: callers fall back to nothing. */
  punchHole?(offset: number, length: number): Promise<void>;
  /** Deallocates several ranges in one go (one subprocess for files). */
  punchHoles?(ranges: ReadonlyArray<readonly [offset: number, length: number]>): Promise<void>;
  /** Must take effect before it returns (the promise only reports completion). */
  truncate?(size: number): Promise<void>;
  /**
   * Allocates the range's blocks, so writes there need no new space; grows the device to
   * its end. Rejects with code ENOSPC when the space is not there. Optional: devices
   * without it cannot reserve (stores on them are sparse whatever was asked).
   */
  allocate?(offset: number, length: number): Promise<void>;
  /** Bytes an unprivileged writer may still allocate on the device's file system. */
  freeBytes?(): Promise<number>;
  close(): Promise<void>;
}

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create the file if missing (never for origins: the daemon owns those). */
  create?: boolean;
}

const readP = (fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> =>
  new Promise((res, rej) => fs.read(fd, buf, off, len, pos, (e, n) => (e ? rej(e) : res(n))));
const writeP = (fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> =>
  new Promise((res, rej) => fs.write(fd, buf, off, len, pos, (e, n) => (e ? rej(e) : res(n))));
const fdatasyncP = (fd: number): Promise<void> => new Promise((res, rej) => fs.fdatasync(fd, (e) => (e ? rej(e) : res())));

/**
 * Makes a directory's entries durable: fdatasync of a new file does not promise its name,
 * and a power loss could drop a store (its snapshots acknowledged) or a volume created
 * just before. Journaled filesystems commit the entry with the file's own sync in practice;
 * POSIX asks for this.
 */
export async function syncDirectory(dir: string): Promise<void> {
  const fh = await fs.promises.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * After `mkdir(deepest, { recursive: true })` returned made (the first directory it
 * created, or undefined): syncs the parent of each new directory, so their names last.
 */
export async function syncMadeDirectories(made: string | undefined, deepest: string, sync = syncDirectory): Promise<void> {
  if (made === undefined) return;
  for (let d = deepest; ; d = dirname(d)) {
    await sync(dirname(d));
    if (d === made || dirname(d) === d) return;
  }
}

/** libuv's threadpool size: what the entry point (daemon/cli.cts) or the operator set. */
export function threadpoolSize(env: NodeJS.ProcessEnv = process.env): number {
  const n = Number(env.UV_THREADPOOL_SIZE);
  return Number.isInteger(n) && n > 0 ? Math.min(n, 1024) : 4;
}

/**
 * fdatasyncs in flight at once, across every file: each holds a pool thread as long as the
 * disk takes, and half the pool stays free for reads and writes (docs/tuning.md, syncGate).
 */
export const syncGate = new Limiter(Math.max(1, Math.floor(threadpoolSize() / 2)));

/**
 * Background reads and writes (copies, held writes landing) queued in libuv's FIFO pool at
 * once, so syncs, foreground reads and slot writes do not wait behind a burst of them.
 * Weighed in 64 KiB units; see docs/tuning.md, BACKGROUND_QUEUE_BYTES.
 */
export const BACKGROUND_QUEUE_BYTES = 8 << 20;
const GATE_UNIT = 64 * 1024;
export const backgroundGate = new Limiter(BACKGROUND_QUEUE_BYTES / GATE_UNIT);
/**
 * What a background call weighs at least: a small write holds a pool thread about as long
 * as a 256 KiB one (docs/tuning.md, BACKGROUND_CALL_MIN_BYTES).
 */
export const BACKGROUND_CALL_MIN_BYTES = 256 * 1024;

/** Starts call once gate admits its bytes; the bytes are given back when it settles. */
export function gated<T>(bytes: number, call: () => Promise<T>, gate: Limiter = backgroundGate): Promise<T> {
  const w = Math.ceil(Math.max(bytes, BACKGROUND_CALL_MIN_BYTES) / GATE_UNIT);
  const wait = gate.acquire(w);
  return (wait ? wait.then(call) : call()).finally(() => gate.release(w));
}

/**
 * Reads and writes run on the calling thread while the page cache answers them quickly
 * (a threadpool hop costs more than a small cached copy), and move to libuv's threadpool
 * for asyncForMs once a call takes over slowMs: the disk is in the way, and the loop keeps
 * serving other clients. Large transfers always take the threadpool; reads sooner than
 * writes, so a read's copy runs beside the loop's socket sends (docs/tuning.md, IoPolicy
 * and maxSyncReadBytes).
 *
 * Small writes also take it while the median of the last 16 synchronous ones is over
 * COSTLY_WRITE_US: the kernel's write then keeps the loop busy while the other core has
 * room (docs/tuning.md, COSTLY_WRITE_US).
 */
export const SMALL_WRITE_BYTES = 16 * 1024;
export const COSTLY_WRITE_US = 10;
export const COSTLY_FOR_MS = 250;

export class IoPolicy {
  private asyncUntil = 0;
  /** Small writes take the threadpool until then (0: they do not). */
  private costlyUntil = 0;
  /** Durations (ms) of the last synchronous small writes, up to one sample's worth. */
  private readonly costs = new Float64Array(16);
  private costN = 0;
  /** Duration (ms) and end of the last timed call. */
  private lastMs = 0;
  private lastEnd = 0;
  syncCalls = 0;
  asyncCalls = 0;
  /** COWBD_SYNC_IO=0 sends every call to the threadpool, for an operator who prefers that. */
  constructor(
    private readonly allowSync = process.env.COWBD_SYNC_IO !== '0',
    private readonly slowMs = 2,
    private readonly asyncForMs = 1000,
    private readonly maxSyncBytes = 1024 * 1024,
    private readonly maxSyncReadBytes = Number(process.env.COWBD_SYNC_READ_MAX ?? 256 * 1024),
    private readonly costlyUs = COSTLY_WRITE_US,
    private readonly costlyForMs = COSTLY_FOR_MS,
  ) {}

  useSync(bytes: number, read = false): boolean {
    if (!this.allowSync || bytes > (read ? this.maxSyncReadBytes : this.maxSyncBytes)) return false;
    if (!read && bytes <= SMALL_WRITE_BYTES && this.costlyUntil !== 0 && performance.now() < this.costlyUntil) return false;
    return this.asyncUntil === 0 || performance.now() >= this.asyncUntil;
  }

  /** timed() for a write: a small one also adds to the sample that decides whether small writes are costly. */
  timedWrite<T>(bytes: number, fn: () => T): T {
    if (bytes > SMALL_WRITE_BYTES) return this.timed(fn);
    try {
      return this.timed(fn);
    } finally {
      this.costs[this.costN++] = this.lastMs;
      if (this.costN === this.costs.length) {
        this.costN = 0;
        // The median: one write that met the journal or a new folio's allocation says little.
        this.costs.sort();
        this.costlyUntil = this.costs[this.costs.length >> 1]! * 1000 > this.costlyUs ? this.lastEnd + this.costlyForMs : 0;
      }
    }
  }

  /** Times a synchronous call; a slow one sends the next calls to the threadpool. */
  timed<T>(fn: () => T): T {
    const t0 = performance.now();
    try {
      return fn();
    } finally {
      const t1 = performance.now();
      this.syncCalls++;
      this.lastMs = t1 - t0;
      this.lastEnd = t1;
      if (t1 - t0 > this.slowMs) this.asyncUntil = t1 + this.asyncForMs;
      else this.asyncUntil = 0;
    }
  }
}

export class FileDevice implements BlockDevice {
  private closed = false;
  private readonly fd: number;
  /** A second descriptor opened O_DSYNC on first use by writeDurable. */
  private dsync: Promise<fs.promises.FileHandle> | undefined;
  readonly io = new IoPolicy();
  private constructor(
    readonly path: string,
    private readonly fh: fs.promises.FileHandle,
    private _size: number,
    readonly readOnly: boolean,
  ) {
    this.fd = fh.fd;
  }

  static async open(path: string, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    const flags = readOnly ? 'r' : opts.create ? fs.constants.O_RDWR | fs.constants.O_CREAT : 'r+';
    const fh = await fs.promises.open(path, flags, 0o600);
    const st = await fh.stat();
    // Started with the first writable device, while the daemon is small: see fallocate.ts.
    if (!readOnly) fallocateHelper.start();
    // I/O goes through the callback API on the raw fd: cheaper per call than FileHandle.
    return new FileDevice(path, fh, st.size, readOnly);
  }

  get size(): number {
    return this._size;
  }

  async read(buf: Buffer, offset: number, background = false): Promise<void> {
    let done = 0;
    if (!background && this.io.useSync(buf.length, true)) {
      done = this.io.timed(() => fs.readSync(this.fd, buf, 0, buf.length, offset));
      if (done === 0) {
        buf.fill(0);
        return;
      }
    }
    while (done < buf.length) {
      this.io.asyncCalls++;
      const at = done;
      const len = buf.length - done;
      const n = await (background
        ? gated(len, () => readP(this.fd, buf, at, len, offset + at))
        : readP(this.fd, buf, at, len, offset + at));
      if (n === 0) {
        buf.fill(0, done);
        return;
      }
      done += n;
    }
  }

  async write(buf: Buffer, offset: number, background = false): Promise<void> {
    let done = 0;
    if (!background && this.io.useSync(buf.length))
      done = this.io.timedWrite(buf.length, () => fs.writeSync(this.fd, buf, 0, buf.length, offset));
    while (done < buf.length) {
      this.io.asyncCalls++;
      const at = done;
      const len = buf.length - done;
      done += await (background
        ? gated(len, () => writeP(this.fd, buf, at, len, offset + at))
        : writeP(this.fd, buf, at, len, offset + at));
    }
    if (offset + buf.length > this._size) this._size = offset + buf.length;
  }

  async sync(): Promise<void> {
    const wait = syncGate.acquire();
    if (wait) await wait;
    try {
      await fdatasyncP(this.fd);
    } finally {
      syncGate.release();
    }
  }

  async writeDurable(buf: Buffer, offset: number): Promise<void> {
    if (this.closed) throw CowErrors.deviceClosed();
    // With O_DSYNC the kernel syncs only this write's range (and what the journal needs
    // for it), where fdatasync would first write back every dirty page of the file.
    this.dsync ??= fs.promises.open(this.path, fs.constants.O_RDWR | fs.constants.O_DSYNC);
    let fd: number;
    try {
      fd = (await this.dsync).fd;
    } catch (e) {
      this.dsync = undefined;
      throw e;
    }
    let done = 0;
    while (done < buf.length) done += await writeP(fd, buf, done, buf.length - done, offset + done);
    if (offset + buf.length > this._size) this._size = offset + buf.length;
  }

  punchHole(offset: number, length: number): Promise<void> {
    return this.punchHoles([[offset, length]]);
  }

  punchHoles(ranges: ReadonlyArray<readonly [number, number]>): Promise<void> {
    return fallocateHelper.punch(this.path, ranges);
  }

  async allocate(offset: number, length: number): Promise<void> {
    await fallocateHelper.allocate(this.path, offset, length);
    if (offset + length > this._size) this._size = offset + length;
  }

  async freeBytes(): Promise<number> {
    const st = await fs.promises.statfs(this.path);
    return Number(st.bavail) * Number(st.bsize);
  }

  truncate(size: number): Promise<void> {
    // Synchronous on purpose: see BlockDevice.truncate. ftruncate is a short metadata call.
    try {
      fs.ftruncateSync(this.fd, size);
    } catch (e) {
      return Promise.reject(e);
    }
    this._size = size;
    return Promise.resolve();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const dsync = this.dsync;
    this.dsync = undefined;
    if (dsync)
      await dsync.then(
        (fh) => fh.close(),
        () => {},
      );
    await this.fh.close();
  }
}
