// Crash-proof changed-chunk tracking of one origin, in the manner of dm-era: a write to a
// chunk not yet durably marked in the current generation waits until its mark is synced,
// so after a kill or a power loss the marks cover every write that may have reached the
// disk. Layout and order of writes: cow/tracker-format.ts and docs/cow-design.md.
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from './device.js';
import { CowErrors } from './errors.js';
import type { ChangeMarks } from './origin-contract.js';
import {
  GENERATIONS,
  MAX_NAMED_CHECKPOINTS,
  PAGE,
  TRACKER_CHUNK,
  baseOffset,
  bitmapBytes,
  decodeHeader,
  encodeHeader,
  hasBit,
  headerOffset,
  orInto,
  setBit,
  slotOffset,
  trackerFileSize,
  type TrackerHeader,
} from './tracker-format.js';

/** What the tracker needs to know of the volume file (fs.stat's fields). */
export interface VolumeFileState {
  blocks: number;
  mtimeMs: number;
  size: number;
}

export interface ChangeTrackerOptions {
  volumeSize: number;
  /** Read at open (is the volume empty? written while untracked?) and at close (the clean record). */
  volumeState(): Promise<VolumeFileState>;
}

export type TrackerDevice = BlockDevice & { truncate(size: number): Promise<void> };

const BITS_PER_PAGE = PAGE * 8;
const noop = (): void => {};

export class ChangeTracker implements ChangeMarks {
  readonly chunkSize = TRACKER_CHUNK;
  readonly chunks: number;
  /** Bytes of one bitmap on disk (whole pages). */
  private readonly bytes: number;
  /** Bits of the current generation set in memory, durable or not. */
  private readonly cur: Buffer;
  /** Bits of the current generation known durable: the hot path reads only this. */
  private readonly durable: Buffer;
  private readonly base: Buffer;
  /** Chunks that may hold data (base and every generation), while allocation is known. */
  private readonly ever: Buffer;
  private readonly dirty: Uint8Array;
  private dirtyPages: number[] = [];
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;
  /** Checkpoints and bitmap reads, one at a time: a checkpoint reuses a slot. */
  private lock: Promise<unknown> = Promise.resolve();
  private failed: Error | undefined;
  private closed = false;

  private constructor(
    private readonly dev: TrackerDevice,
    private readonly opts: ChangeTrackerOptions,
    private h: TrackerHeader,
  ) {
    this.chunks = Math.ceil(opts.volumeSize / TRACKER_CHUNK);
    this.bytes = bitmapBytes(this.chunks);
    this.cur = Buffer.alloc(this.bytes);
    this.durable = Buffer.alloc(this.bytes);
    this.base = Buffer.alloc(this.bytes);
    this.ever = Buffer.alloc(this.bytes);
    this.dirty = new Uint8Array(this.bytes / PAGE);
  }

  get id(): string {
    return this.h.id;
  }
  get generation(): number {
    return this.h.generation;
  }
  /** allocatedBefore is exact. */
  get trusted(): boolean {
    return this.h.allocationKnown;
  }
  /** The oldest generation whose own bitmap is still kept. */
  get oldest(): number {
    return Math.max(this.h.trustedFrom, this.h.foldedBelow);
  }

  /** Opens the tracker file, or starts one (an empty dev), and records the open (unclean) state. */
  static async open(dev: TrackerDevice, opts: ChangeTrackerOptions): Promise<ChangeTracker> {
    let h: TrackerHeader | undefined;
    if (dev.size > 0) {
      const pick: TrackerHeader[] = [];
      for (let i = 0; i < 2; i++) {
        const b = Buffer.alloc(PAGE);
        await dev.read(b, headerOffset(i));
        const got = decodeHeader(b);
        if (typeof got !== 'string') pick.push(got);
      }
      h = pick.sort((a, b) => b.seq - a.seq)[0];
    }
    let t: ChangeTracker;
    const stale =
      h &&
      (h.volumeSize !== opts.volumeSize ||
        (h.clean && (await opts.volumeState().then((s) => s.mtimeMs !== h!.cleanMtimeMs || s.size !== h!.cleanSize))));
    if (!h || stale) {
      // No header: a new file, or its creation was cut short before any origin write could
      // be issued, so the volume's allocation says whether tracking starts exact.
      const known = !h && (await opts.volumeState()).blocks === 0;
      t = new ChangeTracker(dev, opts, {
        volumeSize: opts.volumeSize,
        id: randomBytes(16).toString('hex'),
        seq: (h?.seq ?? 0) + 1,
        generation: 0,
        trustedFrom: known ? 0 : 1,
        allocationKnown: known,
        foldedBelow: 0,
        clean: false,
        cleanMtimeMs: 0,
        cleanSize: 0,
        names: [],
      });
      // Every bitmap reads as zeros before the header naming them is written.
      await dev.truncate(0);
      await dev.truncate(trackerFileSize(t.bytes));
    } else {
      t = new ChangeTracker(dev, opts, { ...h, clean: false, seq: h.seq + 1 });
      await dev.read(t.base, baseOffset());
      await dev.read(t.cur, slotOffset(t.bytes, h.generation));
      t.cur.copy(t.durable);
      if (h.allocationKnown) {
        t.base.copy(t.ever);
        const scratch = Buffer.alloc(t.bytes);
        for (let g = h.foldedBelow; g <= h.generation; g++) await t.orGeneration(t.ever, g, scratch);
      }
    }
    // Before any write this tracker lets through: an unclean stop then keeps the marks.
    await t.writeHeader();
    return t;
  }

  private async writeHeader(): Promise<void> {
    // Through the O_DSYNC descriptor where there is one, so it is open from the start, as
    // every other descriptor the daemon holds; the sync also covers what came before.
    const b = encodeHeader(this.h);
    const at = headerOffset(this.h.seq);
    await (this.dev.writeDurable ? this.dev.writeDurable(b, at) : this.dev.write(b, at));
    await this.dev.sync();
  }

  /**
   * Undefined when every chunk of the range is durably marked in the current generation;
   * else a promise that resolves once they are. The origin's write must wait for it.
   */
  mark(offset: number, length: number): Promise<void> | undefined {
    if (length <= 0) return undefined;
    const d = this.durable;
    const last = Math.min(this.chunks - 1, Math.floor((offset + length - 1) / TRACKER_CHUNK));
    for (let c = Math.floor(offset / TRACKER_CHUNK); c <= last; c++) {
      if ((d[c >>> 3]! & (1 << (c & 7))) === 0) return this.markSlow(c, last);
    }
    return undefined;
  }

  /**
   * mark() for a range made zero: a chunk that never held data reads as zeros before and
   * after, so it stays unmarked (mkfs's discard of a new volume then costs a backup nothing).
   */
  markZeroing(offset: number, length: number): Promise<void> | undefined {
    if (!this.h.allocationKnown || length <= 0) return this.mark(offset, length);
    const last = Math.min(this.chunks - 1, Math.floor((offset + length - 1) / TRACKER_CHUNK));
    let waits: Set<Promise<void>> | undefined;
    for (let c = Math.floor(offset / TRACKER_CHUNK); c <= last; c++) {
      if (!hasBit(this.ever, c)) continue;
      const first = c;
      while (c < last && hasBit(this.ever, c + 1)) c++;
      const p = this.mark(first * TRACKER_CHUNK, (c - first + 1) * TRACKER_CHUNK);
      if (p) {
        waits ??= new Set();
        waits.add(p);
      }
    }
    return waits && Promise.all(waits).then(noop);
  }

  private markSlow(first: number, last: number): Promise<void> {
    if (this.failed) return Promise.reject(CowErrors.trackerFailed(this.failed.message));
    let queued = false;
    for (let c = first; c <= last; c++) {
      if (hasBit(this.durable, c)) continue;
      const page = Math.floor(c / BITS_PER_PAGE);
      if (!hasBit(this.cur, c)) {
        setBit(this.cur, c);
        setBit(this.ever, c);
      } else if (!this.dirty[page] && this.running) continue; // the commit in flight writes it
      if (!this.dirty[page]) {
        this.dirty[page] = 1;
        this.dirtyPages.push(page);
      }
      queued = true;
    }
    return queued ? this.nextCommit() : this.running!;
  }

  /** Group commit: callers arriving while one is in flight share the next. */
  private nextCommit(): Promise<void> {
    if (!this.next) {
      const p: Promise<void> = (this.running ?? Promise.resolve()).then(noop, noop).then(() => this.commit(p));
      this.next = p;
    }
    return this.next;
  }

  private async commit(self: Promise<void>): Promise<void> {
    this.next = null;
    this.running = self;
    try {
      if (this.failed) throw CowErrors.trackerFailed(this.failed.message);
      const pages = this.dirtyPages;
      this.dirtyPages = [];
      const at = slotOffset(this.bytes, this.h.generation);
      const copies = pages.map((pg) => {
        this.dirty[pg] = 0;
        return Buffer.from(this.cur.subarray(pg * PAGE, (pg + 1) * PAGE));
      });
      // O_DSYNC writes where the device has them: an fdatasync can wait for the journal to
      // take the file system's other dirty data, seconds under a write load.
      const dev = this.dev;
      if (dev.writeDurable) await Promise.all(copies.map((b, i) => dev.writeDurable!(b, at + pages[i]! * PAGE)));
      else {
        await Promise.all(copies.map((b, i) => dev.write(b, at + pages[i]! * PAGE)));
        await dev.sync();
      }
      for (let i = 0; i < pages.length; i++) copies[i]!.copy(this.durable, pages[i]! * PAGE);
    } catch (e) {
      this.fail(e);
      throw CowErrors.trackerFailed(this.failed!.message);
    } finally {
      if (this.running === self) this.running = null;
    }
  }

  private fail(e: unknown): void {
    this.failed ??= e instanceof Error ? e : new Error(String(e));
  }

  private async idle(): Promise<void> {
    while (this.next || this.running) await (this.next ?? this.running)!.catch(noop);
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.lock.then(fn);
    this.lock = p.catch(noop);
    return p;
  }

  /**
   * Starts generation k = generation + 1 and returns k; call with the origin quiesced, so
   * the writes in snapshotName's snapshot are marked below k and every later one at k or more.
   */
  checkpoint(snapshotName: string): Promise<number> {
    return this.serial(async () => {
      if (this.failed) throw CowErrors.trackerFailed(this.failed.message);
      if (this.closed) throw CowErrors.deviceClosed();
      await this.idle();
      const g = this.h.generation + 1;
      const slot = slotOffset(this.bytes, g);
      let reuse = false;
      if (g >= GENERATIONS) {
        // The slot holds generation g - GENERATIONS: into the base first, durably, so no
        // crash leaves its bits in neither place (twice is fine: over-marking).
        const old = Buffer.alloc(this.bytes);
        await this.dev.read(old, slot);
        reuse = old.some((x) => x !== 0);
        if (reuse) {
          orInto(this.base, old);
          await this.dev.write(this.base, baseOffset());
          await this.dev.sync();
        }
      }
      const names = this.h.names.filter(([n]) => n !== snapshotName);
      names.push([snapshotName, g]);
      const next: TrackerHeader = {
        ...this.h,
        seq: this.h.seq + 1,
        generation: g,
        foldedBelow: Math.max(this.h.foldedBelow, g - GENERATIONS + 1),
        names: names.slice(-MAX_NAMED_CHECKPOINTS),
      };
      try {
        await this.dev.write(encodeHeader(next), headerOffset(next.seq));
        await this.dev.sync();
        this.h = next;
        this.cur.fill(0);
        this.durable.fill(0);
        // Cleared only once the header no longer names the old generation: until then its
        // bits stand in generation g's slot, which over-marks g and loses nothing.
        if (reuse) {
          await this.dev.write(Buffer.alloc(this.bytes), slot);
          await this.dev.sync();
        }
      } catch (e) {
        // What the header or the slot hold on disk is no longer known.
        this.fail(e);
        throw e;
      }
      return g;
    });
  }

  checkpointOf(snapshot: string): number | undefined {
    for (const [n, g] of this.h.names) if (n === snapshot) return g;
    return undefined;
  }

  /** Bits of a generation's bitmap: memory for the current one (durable or not), else its slot. */
  private async orGeneration(into: Uint8Array, g: number, scratch: Buffer): Promise<void> {
    if (g === this.h.generation) return orInto(into, this.cur);
    await this.dev.read(scratch, slotOffset(this.bytes, g));
    orInto(into, scratch);
  }

  private checkRange(from: number, to: number): number {
    if (!Number.isInteger(from) || !Number.isInteger(to) || from < 0 || to < from) throw CowErrors.trackerRange(from, to);
    return Math.min(to, this.h.generation + 1);
  }

  /** Chunks written after checkpoint from and before checkpoint to; undefined when from is no longer known. */
  changedBetween(from: number, to: number): Promise<Uint8Array | undefined> {
    return this.serial(async () => {
      const end = this.checkRange(from, to);
      if (from < this.oldest) return undefined;
      const out = new Uint8Array(this.bytes);
      const scratch = Buffer.alloc(this.bytes);
      for (let g = from; g < end; g++) await this.orGeneration(out, g, scratch);
      return out.subarray(0, Math.ceil(this.chunks / 8));
    });
  }

  /** Chunks ever written before checkpoint to; undefined when the volume held data before tracking began. */
  allocatedBefore(to: number): Promise<Uint8Array | undefined> {
    return this.serial(async () => {
      const end = this.checkRange(0, to);
      if (!this.h.allocationKnown) return undefined;
      const out = new Uint8Array(this.bytes);
      out.set(this.base);
      const scratch = Buffer.alloc(this.bytes);
      for (let g = this.h.foldedBelow; g < end; g++) await this.orGeneration(out, g, scratch);
      return out.subarray(0, Math.ceil(this.chunks / 8));
    });
  }

  /** Call once the volume file is closed: records its mtime and size as of this clean close. */
  close(): Promise<void> {
    return this.serial(async () => {
      if (this.closed) return;
      this.closed = true;
      try {
        await this.idle();
        if (!this.failed) {
          const s = await this.opts.volumeState();
          this.h = { ...this.h, seq: this.h.seq + 1, clean: true, cleanMtimeMs: s.mtimeMs, cleanSize: s.size };
          await this.writeHeader();
        }
      } finally {
        await this.dev.close();
      }
    });
  }
}
