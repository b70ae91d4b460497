// Origin writes held in memory while their chunks are copied.
//
// An origin write that needs copies may not reach the volume file before those copies
// are durable: the page cache could write it back first, and a power loss would then
// leave a snapshot reading data written after it. Waiting for the copy's fdatasync would
// bound first writes by the disk's synced speed (docs/tuning.md, WriteBehind). So the
// write is held here instead and acknowledged at once, like a write into a disk's
// volatile cache; it lands in the file once its copies are committed. Until then reads
// of the origin see it through this table, and so do snapshots created after it (their
// `epoch` is above its own), while older snapshots keep reading the file. FLUSH and FUA
// wait for landing, so durability is unchanged; a power loss may lose a held write
// exactly as it may lose any unflushed write.
//
// The table is bounded: over `maxBytes`, or with MAX_HELD_WRITES writes held, a writer
// waits for its own write to land, which is the synchronous behaviour and the
// backpressure. A write that cannot land (its copy and the snapshot's invalid mark both
// failed) is dropped and fails the next FLUSH, as a disk's failed write-back does; until
// a write lands again, writers wait for their own, so each gets its error.

import { BufferPool } from './buffer-pool.js';
import type { KeepBuffer } from './volume.js';

/** Bookkeeping granularity for overlap lookups; overlap itself is byte-exact. */
const UNIT = 64 * 1024;
/**
 * Copies of held writes come from free lists kept this long after the table empties:
 * fresh memory costs a page fault and a clear per 4 KiB (docs/tuning.md, KEEP_FREE_MS).
 */
const KEEP_FREE_MS = 15_000;
export const NONE: readonly HeldWrite[] = [];
/**
 * Bytes alone do not bound the commit backlog in time: each small write held is an
 * exception to commit, and what queues behind them waits (docs/tuning.md, MAX_HELD_WRITES).
 */
export const MAX_HELD_WRITES = 4096;

export interface HeldWrite {
  readonly seq: number;
  /** The origin's snapshot epoch when the write was acknowledged. */
  readonly epoch: number;
  readonly offset: number;
  readonly end: number;
  readonly data: Buffer;
  /** The pooled buffer data is a view of, when the table owns a copy. */
  readonly block: Buffer | undefined;
  /** Gives data back to the caller's pool, when the table kept the caller's buffer itself. */
  readonly giveBack: (() => void) | undefined;
  /** Counted in heldBytes: acknowledged before landing, so the table owns its data (a copy, or the caller's buffer kept). */
  readonly owned: boolean;
  /** Resolves (never rejects) once the write is in the file, or has failed: see error. */
  landed: Promise<void>;
  error?: Error;
  /** Reads that will still copy from data: it is recycled only once they are done. */
  pins: number;
  released: boolean;
}

export class WriteBehind {
  private readonly byUnit = new Map<number, HeldWrite[]>();
  private readonly all = new Set<HeldWrite>();
  private seq = 0;
  /** Bytes of acknowledged writes held (copies the table owns). */
  heldBytes = 0;
  private failure: Error | undefined;
  /** Copy buffers by size (powers of two from 4 KiB), at most maxBytes of them free. */
  private readonly pool: BufferPool;
  private trimTimer: NodeJS.Timeout | undefined;
  /** The last write to land failed: acknowledge nothing early until one lands again. */
  private degraded = false;

  constructor(
    readonly maxBytes: number,
    readonly maxWrites = MAX_HELD_WRITES,
  ) {
    this.pool = new BufferPool(Infinity, maxBytes);
  }

  get empty(): boolean {
    return this.all.size === 0;
  }

  get count(): number {
    return this.all.size;
  }

  /** True when a write of n more bytes may be acknowledged before it lands. */
  hasRoom(n: number): boolean {
    return !this.degraded && this.heldBytes + n <= this.maxBytes && this.all.size < this.maxWrites;
  }

  /** Held writes overlapping [offset, end), oldest first; taken before a read of the file. */
  overlapping(offset: number, end: number): readonly HeldWrite[] {
    if (this.all.size === 0) return NONE;
    let out: HeldWrite[] | undefined;
    const u0 = Math.floor(offset / UNIT);
    const u1 = Math.floor((end - 1) / UNIT);
    if (u1 - u0 >= this.all.size) {
      for (const h of this.all)
        if (h.offset < end && h.end > offset) {
          out ??= [];
          out.push(h);
        }
      return out ?? NONE;
    }
    for (let u = u0; u <= u1; u++) {
      const list = this.byUnit.get(u);
      if (!list) continue;
      for (const h of list) {
        if (h.offset < end && h.end > offset && !out?.includes(h)) {
          out ??= [];
          out.push(h);
        }
      }
    }
    if (out && out.length > 1) out.sort((a, b) => a.seq - b.seq);
    return out ?? NONE;
  }

  /**
   * Registers a write. With own=true the table owns its data past the caller's await:
   * the caller's buffer itself when keep hands it over, else a copy, which costs the
   * event loop a memmove and fresh memory (docs/tuning.md, KeepPayload).
   */
  hold(data: Buffer, offset: number, epoch: number, own: boolean, keep?: KeepBuffer): HeldWrite {
    let block: Buffer | undefined;
    let giveBack: (() => void) | undefined;
    if (own && keep) giveBack = keep();
    else if (own) {
      block = this.pool.get(bucket(data.length));
      data.copy(block);
    }
    const copy = block ? block.subarray(0, data.length) : data;
    const h: HeldWrite = {
      seq: ++this.seq,
      epoch,
      offset,
      end: offset + data.length,
      data: copy,
      block,
      giveBack,
      owned: own,
      landed: Promise.resolve(),
      pins: 0,
      released: false,
    };
    this.all.add(h);
    for (let u = Math.floor(offset / UNIT); u <= Math.floor((h.end - 1) / UNIT); u++) {
      const list = this.byUnit.get(u);
      if (list) list.push(h);
      else this.byUnit.set(u, [h]);
    }
    if (own) this.heldBytes += data.length;
    return h;
  }

  /** Takes a write out of the table once it is in the file (or failed). */
  release(h: HeldWrite): void {
    if (!this.all.delete(h)) return;
    for (let u = Math.floor(h.offset / UNIT); u <= Math.floor((h.end - 1) / UNIT); u++) {
      const list = this.byUnit.get(u)!;
      if (list.length === 1) this.byUnit.delete(u);
      else list.splice(list.indexOf(h), 1);
    }
    h.released = true;
    if (h.owned) {
      this.heldBytes -= h.data.length;
      if (h.pins === 0) this.recycle(h);
    }
    this.degraded = h.error !== undefined;
    if (h.error && h.owned) this.failure ??= h.error;
  }

  private recycle(h: HeldWrite): void {
    if (h.block) this.pool.put(h.block);
    else h.giveBack?.();
    if (this.all.size === 0) {
      // Idle: give the memory back unless writes resume soon.
      clearTimeout(this.trimTimer);
      this.trimTimer = setTimeout(() => this.trim(), KEEP_FREE_MS).unref();
    }
  }

  /** Drops the free buffers. */
  trim(): void {
    clearTimeout(this.trimTimer);
    this.pool.trim();
  }

  /** Resolves once every write held now has landed. */
  async settle(list: Iterable<HeldWrite> = this.all): Promise<void> {
    const waits: Promise<void>[] = [];
    for (const h of list) waits.push(h.landed);
    await Promise.all(waits);
  }

  /** A landing failure of a write already acknowledged, reported once (by the next FLUSH). */
  takeFailure(): Error | undefined {
    const f = this.failure;
    this.failure = undefined;
    return f;
  }

  /** Keeps the writes' data from being recycled until unpin: a read copies from it after its file read. */
  pin(list: readonly HeldWrite[]): void {
    for (const h of list) h.pins++;
  }

  unpin(list: readonly HeldWrite[]): void {
    for (const h of list) if (--h.pins === 0 && h.released && h.owned) this.recycle(h);
  }

  /** Copies the bytes of each held write (oldest first) over what was read from the file at offset. */
  static apply(list: readonly HeldWrite[], buf: Buffer, offset: number, beforeEpoch = Infinity): void {
    const end = offset + buf.length;
    for (const h of list) {
      if (h.epoch >= beforeEpoch) continue;
      const a = Math.max(offset, h.offset);
      const b = Math.min(end, h.end);
      if (b > a) h.data.copy(buf, a - offset, a - h.offset, b - h.offset);
    }
  }
}

function bucket(n: number): number {
  let b = 4096;
  while (b < n) b *= 2;
  return b;
}
