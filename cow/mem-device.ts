// An in-memory block device that models a volatile write cache, for crash tests.
// Completed writes are visible to reads at once but only become durable at sync();
// crashImage() builds what a disk could hold after a power loss at this instant:
// each unsynced write lost, applied, or torn at 512-byte sector granularity (the
// atomic unit every journaling design, dm-snapshot's included, relies on).
import type { BlockDevice } from './device.js';
import { injectedError } from './fault-device.js';

export const SECTOR = 512;

interface PendingWrite {
  offset: number;
  data: Buffer;
}

export class MemDevice implements BlockDevice {
  private cur: Buffer;
  private durable: Buffer;
  private _size: number;
  private durableSize: number;
  private pending: PendingWrite[] = [];
  /** Batches a sync has taken and not yet made durable. */
  private readonly syncing = new Set<PendingWrite[]>();
  /** Called before every write and sync: the crash tests take crash images from here. */
  onIo: ((kind: 'write' | 'sync') => void) | undefined;
  /** Simulated I/O latency in event-loop turns, so concurrent requests interleave. */
  yieldTurns = 0;
  failWrites = false;
  /** Bytes the device may span: writes and allocations past it fail with ENOSPC, as on a full disk. */
  spaceLimit = Number.POSITIVE_INFINITY;

  constructor(size = 0, image?: Buffer) {
    const cap = Math.max(4096, image?.length ?? 0, size);
    this.cur = Buffer.alloc(cap);
    this.durable = Buffer.alloc(cap);
    if (image) {
      image.copy(this.cur);
      image.copy(this.durable);
    }
    this._size = Math.max(size, image?.length ?? 0);
    this.durableSize = this._size;
  }

  get size(): number {
    return this._size;
  }

  private async turn(): Promise<void> {
    for (let i = 0; i < this.yieldTurns; i++) await new Promise<void>((r) => setImmediate(r));
  }

  private ensure(end: number): void {
    if (end <= this.cur.length) return;
    let cap = this.cur.length;
    while (cap < end) cap *= 2;
    const grow = (b: Buffer): Buffer => {
      const n = Buffer.alloc(cap);
      b.copy(n);
      return n;
    };
    this.cur = grow(this.cur);
    this.durable = grow(this.durable);
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await this.turn();
    buf.fill(0);
    if (offset < this._size) this.cur.copy(buf, 0, offset, Math.min(this._size, offset + buf.length));
  }

  /** The start of every write: the crash tests' hook, an injected failure, the latency. */
  private async beginWrite(end: number): Promise<void> {
    this.onIo?.('write');
    if (this.failWrites) throw injectedError('EIO', 'write', 'memory');
    if (end > this.spaceLimit) throw injectedError('ENOSPC', 'write', 'memory');
    await this.turn();
  }

  /** Makes the bytes visible to reads (not durable). */
  private put(buf: Buffer, offset: number): void {
    this.ensure(offset + buf.length);
    buf.copy(this.cur, offset);
    if (offset + buf.length > this._size) this._size = offset + buf.length;
  }

  async write(buf: Buffer, offset: number): Promise<void> {
    await this.beginWrite(offset + buf.length);
    this.put(buf, offset);
    this.pending.push({ offset, data: Buffer.from(buf) });
  }

  async sync(): Promise<void> {
    this.onIo?.('sync');
    // Only writes completed before the sync started are guaranteed, as with fdatasync.
    const done = this.pending;
    this.pending = [];
    this.syncing.add(done);
    await this.turn();
    this.syncing.delete(done);
    for (const w of done) w.data.copy(this.durable, w.offset);
    this.durableSize = Math.max(this.durableSize, this._size);
  }

  /** Durable on return, like an O_DSYNC write: it syncs nothing else. */
  async writeDurable(buf: Buffer, offset: number): Promise<void> {
    await this.beginWrite(offset + buf.length);
    this.put(buf, offset);
    buf.copy(this.durable, offset);
    this.durableSize = Math.max(this.durableSize, offset + buf.length);
    // An older unsynced write of these bytes can no longer surface over them.
    const end = offset + buf.length;
    for (const w of this.pending) {
      const a = Math.max(offset, w.offset);
      const b = Math.min(end, w.offset + w.data.length);
      if (b > a) buf.copy(w.data, a - w.offset, a - offset, b - offset);
    }
  }

  // Hole punching, truncation and allocation are modelled as immediately durable: the engine only
  // does them to space no durable metadata references, and this is the harsher model.
  async punchHole(offset: number, length: number): Promise<void> {
    const end = Math.min(offset + length, this.cur.length);
    if (end > offset) {
      this.cur.fill(0, offset, end);
      this.durable.fill(0, offset, end);
      // Writes a sync in progress is about to make durable must not bring the bytes back.
      for (const w of [this.pending, ...this.syncing].flat()) {
        const a = Math.max(offset, w.offset);
        const b = Math.min(end, w.offset + w.data.length);
        if (b > a) w.data.fill(0, a - w.offset, b - w.offset);
      }
    }
  }

  async punchHoles(ranges: ReadonlyArray<readonly [number, number]>): Promise<void> {
    for (const [o, l] of ranges) await this.punchHole(o, l);
  }

  async allocate(offset: number, length: number): Promise<void> {
    const end = offset + length;
    if (end > this.spaceLimit) throw injectedError('ENOSPC', 'write', 'memory');
    await this.turn();
    if (end <= this._size) return;
    this.ensure(end);
    this._size = end;
    this.durableSize = Math.max(this.durableSize, end);
  }

  async freeBytes(): Promise<number> {
    return Math.max(0, this.spaceLimit - this._size);
  }

  async truncate(size: number): Promise<void> {
    this.ensure(size);
    this.cur.fill(0, size);
    this.durable.fill(0, size);
    this._size = size;
    this.durableSize = size;
    this.pending = this.pending.filter((w) => w.offset < size);
    for (const w of this.pending) if (w.offset + w.data.length > size) w.data = w.data.subarray(0, size - w.offset);
  }

  async close(): Promise<void> {}

  /** Bytes a power loss now could leave behind. rng() in [0,1). */
  crashImage(rng: () => number): Buffer {
    const img = Buffer.alloc(Math.max(this.durableSize, this._size));
    this.durable.copy(img, 0, 0, img.length);
    for (const w of this.pending) {
      const r = rng();
      if (r < 0.34) continue;
      if (r < 0.67) {
        w.data.copy(img, w.offset);
        continue;
      }
      for (let s = 0; s < w.data.length; s += SECTOR) {
        if (rng() < 0.5) w.data.copy(img, w.offset + s, s, Math.min(w.data.length, s + SECTOR));
      }
    }
    return img;
  }

  /** The durable image only, as if every unsynced write were lost. */
  durableImage(): Buffer {
    return Buffer.from(this.durable.subarray(0, this.durableSize));
  }

  get unsyncedWrites(): number {
    return this.pending.length;
  }
}
