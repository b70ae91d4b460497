// Merging a snapshot back into its origin, as dm-snapshot's snapshot-merge target does
// for `lvconvert --merge`: each of the snapshot's exceptions is copied back into the
// origin's file in the background, made durable there, and only then dropped from the
// snapshot's store (an entry naming MERGED_CHUNK). Until a chunk is copied back the
// origin reads it from the store, and a write to it copies it back first, so the origin
// reads as the snapshot from the moment the merge begins. A crash leaves the snapshot in
// state 'merging' with the exceptions not yet dropped: the merge resumes at the next
// start and copies them again, which is harmless. Other snapshots get their copies of
// the origin's old data first, through the origin-write path (Origin.writeMerged).
import { ChunkLocks } from './chunk-locks.js';
import { firstChunk, lastChunk } from './chunks.js';
import { ABSENT } from './chunk-map.js';
import { MERGED_CHUNK, ZERO_CHUNK } from './format.js';
import type { OriginMerge } from './origin-contract.js';
import type { Origin } from './origin.js';
import type { SnapshotPool } from './snapshot-pool.js';
import type { SnapshotRecord } from './snapshot-record.js';

/** Chunks copied back per batch: one origin sync and one store commit each (docs/tuning.md, MERGE_BATCH_BYTES). */
export const MERGE_BATCH_BYTES = 16 << 20;
/** Batches of the background copy in flight at once (docs/tuning.md, MERGE_IN_FLIGHT). */
export const MERGE_IN_FLIGHT = 2;
/** The background copy's default share of the disk, in bytes a second (docs/tuning.md, DEFAULT_MERGE_RATE). */
export const DEFAULT_MERGE_RATE = 64 << 20;
/** A failed batch is tried again after this long: the origin keeps reading the store meanwhile. */
const RETRY_MS = 5000;

export interface MergeOptions {
  /** Bytes a second the background copy may take; 0 for no bound. */
  rate?: number;
  /** Bytes copied back per batch (default MERGE_BATCH_BYTES). */
  batchBytes?: number;
  /** The last chunk is back: the caller removes the snapshot. */
  onDone(merge: SnapshotMerge): void;
  /** A batch failed; it is tried again after RETRY_MS. */
  onError(err: unknown, merge: SnapshotMerge): void;
}

export interface MergeProgress {
  totalChunks: number;
  mergedChunks: number;
  mergedBytes: number;
  startedAt: Date;
  /** The bound on the background copy, bytes a second (0: none). */
  rate: number;
}

export class SnapshotMerge implements OriginMerge {
  readonly epoch: number;
  readonly totalChunks: number;
  mergedChunks = 0;
  readonly startedAt = new Date();
  rate: number;
  private readonly cs: number;
  private readonly locks = new ChunkLocks();
  /** The snapshot's exceptions when the merge began, in chunk order: the background copy's to-do list. */
  private readonly todo: Uint32Array;
  private next = 0;
  private stopped = false;
  private wake: (() => void) | undefined;
  private running: Promise<void> | undefined;

  constructor(
    readonly origin: Origin,
    readonly pool: SnapshotPool,
    readonly rec: SnapshotRecord,
    private readonly opts: MergeOptions,
  ) {
    this.epoch = origin.epoch;
    this.cs = pool.chunkSize;
    this.rate = opts.rate ?? DEFAULT_MERGE_RATE;
    const todo = new Uint32Array(rec.map.size);
    let n = 0;
    rec.map.forEach((c) => {
      todo[n++] = c;
    });
    this.todo = todo.sort();
    this.totalChunks = this.todo.length;
  }

  get name(): string {
    return this.rec.name;
  }

  progress(): MergeProgress {
    return {
      totalChunks: this.totalChunks,
      mergedChunks: this.mergedChunks,
      mergedBytes: this.mergedChunks * this.cs,
      startedAt: this.startedAt,
      rate: this.rate,
    };
  }

  pending(offset: number, length: number): boolean {
    const map = this.rec.map;
    const last = lastChunk(offset, length, this.cs);
    for (let c = firstChunk(offset, this.cs); c <= last; c++) if (map.has(c)) return true;
    return false;
  }

  async read(buf: Buffer, offset: number, file: () => Promise<void>): Promise<void> {
    const cs = this.cs;
    const map = this.rec.map;
    // Where each unmerged chunk lies, taken before the file is read: a chunk copied back
    // meanwhile reads the same from either, and its store chunk is not reused while
    // this read is under way (readStarted).
    const from: number[] = [];
    const first = firstChunk(offset, cs);
    const last = lastChunk(offset, buf.length, cs);
    for (let c = first; c <= last; c++) {
      const p = map.get(c);
      if (p !== ABSENT) from.push(c, p);
    }
    const reclaimer = this.pool.reclaimer;
    reclaimer.readStarted();
    try {
      // A range the store holds whole (a small read, mostly) needs nothing of the file.
      if (from.length / 2 < last - first + 1) await file();
      const reads: Promise<void>[] = [];
      for (let i = 0; i < from.length; i += 2) {
        const c = from[i]!;
        const p = from[i + 1]!;
        const a = Math.max(offset, c * cs);
        const b = Math.min(offset + buf.length, (c + 1) * cs);
        const sub = buf.subarray(a - offset, b - offset);
        if (p === ZERO_CHUNK) sub.fill(0);
        else reads.push(this.pool.store.dev.read(sub, p * cs + (a - c * cs)));
      }
      await Promise.all(reads);
    } finally {
      reclaimer.readDone();
    }
  }

  async mergeRange(offset: number, length: number): Promise<void> {
    const chunks: number[] = [];
    const last = lastChunk(offset, length, this.cs);
    for (let c = firstChunk(offset, this.cs); c <= last; c++) if (this.rec.map.has(c)) chunks.push(c);
    if (chunks.length) await this.mergeChunks(chunks);
  }

  /** Starts (or resumes) the background copy. */
  start(): void {
    this.running ??= this.run();
  }

  /** Stops the background copy (close): the merge resumes at the next open. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wake?.();
    await this.running;
  }

  /** Changes the bound on the background copy at once. */
  setRate(rate: number): void {
    this.rate = rate;
    this.wake?.();
  }

  private async run(): Promise<void> {
    let began = performance.now();
    let bytes = 0;
    // Two batches in flight: one reads the store while the other writes and syncs the
    // origin (docs/tuning.md, MERGE_IN_FLIGHT).
    const inflight = new Set<Promise<void>>();
    let failed: { error: unknown; from: number } | undefined;
    while (!this.stopped) {
      const from = this.next;
      const chunks: number[] = [];
      const batch = this.batchChunks();
      while (this.next < this.todo.length && chunks.length < batch) {
        const c = this.todo[this.next++]!;
        if (this.rec.map.has(c)) chunks.push(c);
      }
      if (!chunks.length) break;
      const job: Promise<void> = this.mergeChunks(chunks).then(
        () => {
          inflight.delete(job);
        },
        (error: unknown) => {
          inflight.delete(job);
          if (!failed || from < failed.from) failed = { error, from };
        },
      );
      inflight.add(job);
      if (inflight.size >= MERGE_IN_FLIGHT) await Promise.race(inflight);
      if (failed) {
        await Promise.all(inflight);
        this.opts.onError(failed.error, this);
        // Chunks already back are skipped when the list is walked again.
        this.next = Math.min(this.next, failed.from);
        failed = undefined;
        await this.pause(RETRY_MS);
        continue;
      }
      bytes += chunks.length * this.cs;
      if (this.rate > 0) {
        const due = began + (bytes / this.rate) * 1000;
        const now = performance.now();
        if (due > now) await this.pause(due - now);
        // A long pause (a lowered rate, a retry) does not earn a burst afterwards.
        if (performance.now() - due > 1000) {
          began = performance.now();
          bytes = 0;
        }
      }
    }
    await Promise.all(inflight);
    if (failed && !this.stopped) {
      // The last batches failed: try again as the loop does.
      this.opts.onError(failed.error, this);
      this.next = Math.min(this.next, failed.from);
      await this.pause(RETRY_MS);
      if (!this.stopped) return this.run();
    }
    if (!this.stopped && this.rec.map.size === 0) this.opts.onDone(this);
  }

  /** A batch takes at most a tenth of a second's worth of the rate, so a bound holds from the start. */
  private batchChunks(): number {
    const most = this.opts.batchBytes ?? MERGE_BATCH_BYTES;
    const bytes = this.rate > 0 ? Math.min(most, this.rate / 10) : most;
    return Math.max(1, Math.floor(bytes / this.cs));
  }

  private pause(ms: number): Promise<void> {
    return new Promise<void>((res) => {
      const t = setTimeout(res, ms);
      this.wake = () => {
        clearTimeout(t);
        res();
      };
    }).finally(() => {
      this.wake = undefined;
    });
  }

  /**
   * Copies chunks back: each one's content is written over the origin's (other snapshots
   * get their copies first), the origin is synced, and only then are the exceptions
   * dropped, durably. Chunks another call is merging are waited for, then skipped.
   */
  private async mergeChunks(chunks: number[]): Promise<void> {
    const { pool, rec, cs, origin } = this;
    chunks.sort((a, b) => a - b);
    for (const c of chunks) {
      const held = this.locks.acquire(c);
      if (held) await held;
    }
    try {
      const todo = chunks.filter((c) => rec.map.has(c));
      if (!todo.length) return;
      const buf = Buffer.allocUnsafe(todo.length * cs);
      await Promise.all(
        todo.map((c, i) => {
          const p = rec.map.get(c);
          const sub = buf.subarray(i * cs, (i + 1) * cs);
          if (p === ZERO_CHUNK) {
            sub.fill(0);
            return undefined;
          }
          return pool.store.dev.read(sub, p * cs, true);
        }),
      );
      // One origin write per run of consecutive chunks.
      const writes: Promise<void>[] = [];
      let i = 0;
      while (i < todo.length) {
        let j = i + 1;
        while (j < todo.length && todo[j] === todo[j - 1]! + 1) j++;
        // The last chunk may reach past the origin's end: only its own bytes go back.
        const at = todo[i]! * cs;
        const end = Math.min(todo[j - 1]! * cs + cs, origin.size);
        writes.push(origin.writeMerged(buf.subarray(i * cs, i * cs + (end - at)), at, this.epoch));
        i = j;
      }
      for (const r of await Promise.allSettled(writes)) if (r.status === 'rejected') throw r.reason;
      // The origin holds them durably before the snapshot lets go of them.
      await origin.sync();
      await pool.store.commit({
        dataSync: false,
        count: todo.length,
        forEach: (fn) => {
          for (const c of todo) fn(rec, c, MERGED_CHUNK);
        },
        apply: () => {
          for (const c of todo) {
            const p = rec.map.get(c);
            rec.map.delete(c);
            if (p !== ZERO_CHUNK && p !== ABSENT) {
              rec.reserve(-1, 0);
              if (pool.alloc.unref(p)) pool.reclaimer.free(p);
            }
          }
          this.mergedChunks += todo.length;
        },
      });
    } finally {
      for (const c of chunks) this.locks.release(c);
    }
  }
}
