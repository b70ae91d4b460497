// The origin volume: writes go to the volume file after every snapshot that still reads
// the old data has its copy; until then they are held in memory (write-behind.ts). With
// no live snapshot it is a plain file: no locks, no metadata, one pwrite.
import { totalmem } from 'node:os';
import type { BlockDevice } from './device.js';
import { ZEROS } from './buffer-pool.js';
import { CowErrors } from './errors.js';
import type { ChangeMarks, CopyOnWrite, OriginMerge, OriginView } from './origin-contract.js';
import { SyncCoalescer } from './sync-coalescer.js';
import type { KeepBuffer, Volume } from './volume.js';
import { NONE, WriteBehind, type HeldWrite } from './write-behind.js';

/** Default bound on held writes: a sixteenth of RAM, at most 1 GiB (docs/tuning.md, DEFAULT_WRITE_BEHIND). */
export const DEFAULT_WRITE_BEHIND = Math.min(1 << 30, Math.floor(totalmem() / 16));

export interface OriginOptions {
  /** Bytes of acknowledged origin writes held while their copies are made (0: none). */
  writeBehindBytes?: number;
  /** An acknowledged write could not land: the next FLUSH fails; this says so at once. */
  onLost?(err: Error, offset: number, length: number): void;
  /** Marks each write's chunks durably before its data is written (change-tracker.ts). */
  marks?: ChangeMarks;
}

export class Origin implements Volume, OriginView {
  readonly state = 'valid' as const;
  readonly size: number;
  private readonly syncer: SyncCoalescer;
  readonly behind: WriteBehind;
  /** Bumped by each snapshot creation: a held write is visible to snapshots of a later epoch. */
  epoch = 0;
  /** Set while a snapshot is being created: new writes wait behind it. */
  private gate: Promise<void> | null = null;
  private inflight = 0;
  private drained: (() => void) | null = null;
  /** A snapshot being merged back (merge.ts), until its last chunk is. */
  merge: OriginMerge | undefined;

  constructor(
    readonly name: string,
    readonly dev: BlockDevice,
    /** The pools of this origin's snapshots, which every write asks for copies first. */
    readonly snapshots: CopyOnWrite,
    private readonly opts: OriginOptions = {},
  ) {
    this.size = dev.size;
    this.syncer = new SyncCoalescer(() => dev.sync());
    this.behind = new WriteBehind(opts.writeBehindBytes ?? DEFAULT_WRITE_BEHIND);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.readAsOf(buf, offset, Infinity);
  }

  /** Chunks of the range a merge has not copied back yet are copied back now. */
  private unmerged(offset: number, length: number): Promise<void> | undefined {
    const m = this.merge;
    return m?.pending(offset, length) ? m.mergeRange(offset, length) : undefined;
  }

  /**
   * The origin's chunks a merge copies back: a copy for every other snapshot lacking
   * them first, the change tracker told, then the file written (not synced).
   */
  async writeMerged(buf: Buffer, offset: number, mergeEpoch: number): Promise<void> {
    const marked = this.opts.marks?.mark(offset, buf.length);
    if (marked) await marked;
    await this.settleBefore(offset, buf.length);
    // Snapshots taken since the merge began already see this content: no copy for them.
    await this.snapshots.beforeWrite(offset, buf.length, mergeEpoch - 1);
    await this.dev.write(buf, offset, true);
  }

  /** Makes the origin's file durable (a merge's chunks before they leave its snapshot). */
  sync(): Promise<void> {
    return this.syncer.sync();
  }

  readForCopy(buf: Buffer, offset: number): Promise<void> {
    return this.dev.read(buf, offset, true);
  }

  /** The origin as a snapshot of the given epoch sees it: the file plus writes held from before it. */
  readAsOf(buf: Buffer, offset: number, epoch: number): Promise<void> {
    // A merge's chunks not copied back yet are seen by the origin's own reads and by
    // snapshots taken since it began; older snapshots lacking them read the file.
    const m = this.merge;
    const merge = m && epoch >= m.epoch && m.pending(offset, buf.length) ? m : undefined;
    // Taken before the file is read: a write landing meanwhile is then applied twice
    // (the same bytes), never missed.
    const held = this.behind.overlapping(offset, offset + buf.length);
    const file = merge ? merge.read(buf, offset, () => this.dev.read(buf, offset)) : this.dev.read(buf, offset);
    if (!held.length) return file;
    this.behind.pin(held);
    return file.then(
      () => {
        WriteBehind.apply(held, buf, offset, epoch);
        this.behind.unpin(held);
      },
      (e: unknown) => {
        this.behind.unpin(held);
        throw e;
      },
    );
  }

  private async enter(): Promise<void> {
    while (this.gate) await this.gate;
    this.inflight++;
  }

  private leave(): void {
    if (--this.inflight === 0 && this.drained) this.drained();
  }

  async write(buf: Buffer, offset: number, fua: boolean, keep?: KeepBuffer): Promise<void> {
    const merging = this.unmerged(offset, buf.length);
    if (merging) await merging;
    for (;;) {
      if (this.gate) await this.enter();
      else this.inflight++;
      if (!this.olderHeld(offset, buf.length).length) break;
      // Writes held before the last snapshot creation are part of that snapshot's view,
      // so they must be in the file before a copy for it reads any chunk they touch; and
      // one merged into them would leak into it. Rare (right after a creation): wait,
      // outside the quiesce count, so the next creation does not wait for those copies.
      this.leave();
      await this.settleOlder(offset, buf.length);
    }
    let held: HeldWrite | undefined;
    try {
      // Inside the quiesce window: a write the next snapshot holds marks the generation
      // before its checkpoint, any other one a later generation.
      const marked = this.opts.marks?.mark(offset, buf.length);
      if (marked) await marked;
      if (this.behind.empty && !this.snapshots.active) await this.dev.write(buf, offset);
      else {
        const r = this.writeCow(buf, offset, fua, keep);
        if (r instanceof Promise) await r;
        else held = r;
      }
    } finally {
      this.leave();
    }
    // Waited for outside the quiesce count: a snapshot created meanwhile sees it as held.
    if (held && !held.owned) {
      await held.landed;
      if (held.error) throw held.error;
    }
    if (fua) await this.syncer.sync();
  }

  /**
   * A write while snapshots exist or writes are held. The common case, a rewrite of
   * copied chunks, goes straight to the file (the promise of that write); one some
   * snapshot needs copies for, or that follows held writes, is held and returned.
   */
  private writeCow(buf: Buffer, offset: number, fua: boolean, keep?: KeepBuffer): HeldWrite | Promise<void> {
    const prior = this.behind.empty ? NONE : this.behind.overlapping(offset, offset + buf.length);
    if (!prior.length && !this.snapshots.needsCopy(offset, buf.length)) {
      // Nothing to copy: only snapshot reads still reading these chunks from the file.
      const reads = this.snapshots.readsDone(offset, buf.length);
      return reads ? reads.then(() => this.dev.write(buf, offset)) : this.dev.write(buf, offset);
    }
    const own = !fua && this.behind.hasRoom(buf.length);
    const h = this.behind.hold(buf, offset, this.epoch, own, keep);
    h.landed = this.land(h, prior);
    return h;
  }

  /** The range of chunks (of any pool) a copy for this range reads: copies read whole chunks. */
  private chunkSpan(offset: number, length: number): [number, number] {
    const cs = this.snapshots.chunkSize;
    return [Math.floor(offset / cs) * cs, Math.ceil((offset + length) / cs) * cs];
  }

  /** Held writes from before the last snapshot creation that touch the range's chunks. */
  private olderHeld(offset: number, length: number): readonly HeldWrite[] {
    if (this.behind.empty) return NONE;
    const [a, b] = this.chunkSpan(offset, length);
    let out: HeldWrite[] | undefined;
    for (const h of this.behind.overlapping(a, b))
      if (h.epoch < this.epoch) {
        out ??= [];
        out.push(h);
      }
    return out ?? NONE;
  }

  /** Waits until olderHeld is empty (no new ones appear: new writes carry the current epoch). */
  private async settleOlder(offset: number, length: number): Promise<void> {
    for (let held = this.olderHeld(offset, length); held.length; held = this.olderHeld(offset, length)) await this.behind.settle(held);
  }

  /** For an operation that bypasses the table: held writes it follows land first. */
  private async settleBefore(offset: number, length: number): Promise<void> {
    if (this.behind.empty) return;
    await this.behind.settle(this.behind.overlapping(offset, offset + length));
    await this.settleOlder(offset, length);
  }

  /** Lands a held write in the file: after the writes it follows, and after its copies are committed. */
  private async land(h: HeldWrite, prior: readonly HeldWrite[]): Promise<void> {
    try {
      if (prior.length) await this.behind.settle(prior);
      await this.snapshots.beforeWrite(h.offset, h.data.length, h.epoch);
      await this.dev.write(h.data, h.offset, true);
    } catch (e) {
      h.error = e instanceof Error ? e : new Error(String(e));
      if (h.owned) this.opts.onLost?.(h.error, h.offset, h.data.length);
    } finally {
      this.behind.release(h);
    }
  }

  async flush(): Promise<void> {
    if (!this.behind.empty) await this.behind.settle();
    const failed = this.behind.takeFailure();
    if (failed) throw CowErrors.writeLost(failed.message);
    return this.syncer.sync();
  }

  /** Resolves once every held write has landed in the file (not synced). */
  settle(): Promise<void> {
    return this.behind.settle();
  }

  /**
   * Discards only whole chunks that no snapshot reads from the origin any more; the rest
   * is skipped (TRIM is advisory), so no snapshot's view changes and nothing is copied.
   */
  async discard(offset: number, length: number, fua: boolean): Promise<void> {
    if (!this.dev.punchHoles) return;
    const merging = this.unmerged(offset, length);
    if (merging) await merging;
    await this.enter();
    try {
      const m = this.opts.marks;
      const marked = m?.markZeroing ? m.markZeroing(offset, length) : m?.mark(offset, length);
      if (marked) await marked;
      await this.settleBefore(offset, length);
      if (!this.snapshots.active) {
        const a = Math.ceil(offset / 4096) * 4096;
        const b = Math.floor((offset + length) / 4096) * 4096;
        if (b > a) await this.dev.punchHoles([[a, b - a]]);
        if (fua) await this.syncer.sync();
        return;
      }
      const ranges = this.snapshots.discardable(offset, length);
      if (ranges.length) await this.dev.punchHoles(ranges);
      if (fua) await this.syncer.sync();
    } finally {
      this.leave();
    }
  }

  /** A write of zeros: snapshots get their copies first, exactly as for write(). */
  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    const merging = this.unmerged(offset, length);
    if (merging) await merging;
    await this.enter();
    try {
      const m = this.opts.marks;
      const marked = m?.markZeroing ? m.markZeroing(offset, length) : m?.mark(offset, length);
      if (marked) await marked;
      await this.settleBefore(offset, length);
      await this.snapshots.beforeWrite(offset, length);
      for (let at = 0; at < length; at += ZEROS.length) {
        await this.dev.write(ZEROS.subarray(0, Math.min(ZEROS.length, length - at)), offset + at);
      }
      if (fua) await this.syncer.sync();
    } finally {
      this.leave();
    }
  }

  /**
   * Runs fn with the origin quiesced: writes acknowledged before are in the snapshot fn
   * creates, writes after see it. Constant time: nothing is copied, and nothing is
   * synced. An acknowledged write not yet flushed is, as on a disk with a volatile
   * cache, allowed to be lost by a power loss, from the snapshot as from the origin;
   * any chunk copied later carries it durably. A sync here would make creation cost the
   * volume's whole dirty page cache (docs/tuning.md, Origin.quiesced).
   */
  async quiesced<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    try {
      if (this.inflight > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = null;
      // Writes still held belong to what fn's snapshot sees (pool.createSnapshot takes
      // the epoch); their copies go only to the snapshots that existed before them.
      this.epoch++;
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  async close(): Promise<void> {
    await this.quiesced(async () => {});
    await this.behind.settle();
    this.behind.trim();
    await this.dev.close();
  }
}
