// The origin-write copy, dm-snap.c's __origin_write: before an origin write lands, every
// chunk of it that some live snapshot still reads from the origin is copied into the
// pool's store once, shared by every snapshot that lacks it, and committed.
import type { Allocator } from './allocator.js';
import { copyBuffers, ZEROS } from './buffer-pool.js';
import { type ChunkLocks, Limiter, type ReaderTable } from './chunk-locks.js';
import { chunkRanges, firstChunk, lastChunk } from './chunks.js';
import type { ExceptionStore } from './exception-store.js';
import { ZERO_CHUNK } from './format.js';
import { isNoSpace } from './errors.js';
import type { CopyOnWrite, OriginView } from './origin-contract.js';
import type { SnapshotPolicy } from './snapshot-policy.js';
import type { SnapshotRecord } from './snapshot-record.js';

/** Longest run of chunks copied with one read and one write (see docs/tuning.md, MAX_RUN_BYTES). */
const MAX_RUN_BYTES = 1 << 20;
/** Bytes of chunk copies in flight per pool (see docs/tuning.md, MAX_COPY_BYTES). */
const MAX_COPY_BYTES = 16 << 20;

/** What the copy path uses of its pool (snapshot-pool.ts). */
export interface CopyPool {
  readonly chunkSize: number;
  /** Snapshots that still get copies. */
  readonly live: readonly SnapshotRecord[];
  readonly store: ExceptionStore;
  readonly alloc: Allocator;
  readonly origin: OriginView;
  readonly policy: SnapshotPolicy;
  readonly locks: ChunkLocks;
  readonly originReaders: ReaderTable;
  readonly copy: OriginCopy;
  /** Its space is not reserved on disk: a full file system invalidates its snapshots. */
  readonly sparse: boolean;
  countCopies(chunks: number): void;
}

export class OriginCopy {
  private readonly copies: Limiter;
  private readonly bufs = copyBuffers;

  constructor(
    private readonly pool: CopyPool,
    maxCopies?: number,
  ) {
    this.copies = new Limiter(maxCopies ?? Math.max(16, Math.floor(MAX_COPY_BYTES / pool.chunkSize)));
  }

  /** True when some live snapshot of an epoch up to `epoch` has no exception for the chunk. */
  private anyLacks(chunk: number, epoch = Infinity): boolean {
    for (const r of this.pool.live) if (r.lacks(chunk) && r.epoch <= epoch) return true;
    return false;
  }

  needsCopy(offset: number, length: number): boolean {
    const last = lastChunk(offset, length, this.pool.chunkSize);
    for (let c = firstChunk(offset, this.pool.chunkSize); c <= last; c++) if (this.anyLacks(c)) return true;
    return false;
  }

  /** No snapshot reads the chunk from the origin any more. */
  discardable(chunk: number): boolean {
    return !this.anyLacks(chunk);
  }

  /**
   * Copies every chunk of the range some live snapshot still reads from the origin,
   * commits the exceptions, and waits out snapshot reads of those chunks from the
   * origin, so the write can land. A write held since `epoch` copies only for snapshots
   * of that epoch or older: later ones already see it.
   */
  async beforeWrite(offset: number, length: number, epoch = Infinity): Promise<void> {
    const cs = this.pool.chunkSize;
    const last = lastChunk(offset, length, cs);
    let need: number[] | undefined;
    for (let c = firstChunk(offset, cs); c <= last; c++)
      if (this.anyLacks(c, epoch)) {
        need ??= [];
        need.push(c);
      }
    if (need) {
      const locks = this.pool.locks;
      // Only a held lock is awaited: an await of undefined still costs a turn and a promise.
      for (const c of need) {
        const held = locks.acquire(c);
        if (held) await held;
      }
      try {
        await this.copyChunks(need, epoch);
      } finally {
        for (const c of need) locks.release(c);
      }
    }
    const reads = this.readsDone(offset, length);
    if (reads) await reads;
  }

  /** Resolves once no snapshot read is reading a chunk of the range from the origin; undefined when none is. */
  readsDone(offset: number, length: number): Promise<void> | undefined {
    const cs = this.pool.chunkSize;
    const first = firstChunk(offset, cs);
    const last = lastChunk(offset, length, cs);
    const readers = this.pool.originReaders;
    return readers.busy(first, last) ? readers.waitRange(first, last) : undefined;
  }

  private async copyChunks(chunks: number[], epoch: number): Promise<void> {
    const { pool } = this;
    const policy = pool.policy;
    // Invalid snapshots whose mark must be durable before this origin write lands.
    const marks = new Set<SnapshotRecord>();
    const needers: SnapshotRecord[][] = [];
    const todo: number[] = [];
    for (const c of chunks) {
      const who: SnapshotRecord[] = [];
      for (const r of pool.live) {
        if (!r.lacks(c) || r.epoch > epoch) continue;
        if (r.state === 'invalid') {
          marks.add(r); // invalidated earlier, its mark not yet durable
          continue;
        }
        if (!r.fits(1, 1)) {
          policy.invalidate(r, 'full');
          marks.add(r);
          continue;
        }
        r.reserve(1, 1);
        who.push(r);
      }
      if (who.length) {
        todo.push(c);
        needers.push(who);
      }
    }
    const involved = new Set<SnapshotRecord>();
    for (const w of needers) for (const r of w) involved.add(r);
    for (const r of involved) r.busy++;
    try {
      const jobs: Promise<void>[] = [];
      const maxRun = Math.max(1, MAX_RUN_BYTES / pool.chunkSize);
      let i = 0;
      while (i < todo.length) {
        let j = i + 1;
        while (j < todo.length && j - i < maxRun && todo[j] === todo[j - 1]! + 1) j++;
        jobs.push(this.copyRun(todo.slice(i, j), needers.slice(i, j)));
        i = j;
      }
      const copyJobs = jobs.length;
      if (marks.size) jobs.push(policy.markInvalid(marks));
      const results = await Promise.allSettled(jobs);
      const failed = results.slice(0, copyJobs).find((r) => r.status === 'rejected');
      const markFailed = results[copyJobs];
      if (failed) {
        const reason = (failed as PromiseRejectedResult).reason;
        const full = isNoSpace(reason);
        // A reserved store out of space was short of its reservation (it could not be
        // re-made at a restart): the origin write fails instead, and no snapshot is lost.
        if (full && !pool.sparse) throw markFailed?.status === 'rejected' ? markFailed.reason : reason;
        // Otherwise the copies are unusable: the snapshots that needed them cannot stay
        // valid, and the origin write goes ahead as dm-snapshot's does, once that is durable.
        const detail = reason instanceof Error ? reason.message : String(reason);
        for (const r of involved) policy.invalidate(r, full ? 'disk-full' : 'io-error', detail);
        await policy.markInvalid(involved);
      }
      if (markFailed?.status === 'rejected') throw markFailed.reason;
    } finally {
      for (const r of involved) r.busy--;
      for (const r of involved) policy.reportUsage(r);
    }
  }

  /** Copies a run of consecutive chunks with one origin read; zero chunks become zero exceptions. */
  private async copyRun(chunks: number[], needers: SnapshotRecord[][]): Promise<void> {
    const { pool } = this;
    const { store, alloc } = pool;
    const cs = pool.chunkSize;
    const n = chunks.length;
    const phys: number[] = new Array<number>(n).fill(ZERO_CHUNK);
    const charged: boolean[] = new Array<boolean>(n).fill(true);
    let copied = 0;
    const wait = this.copies.acquire(n);
    if (wait) await wait;
    // Taken once admitted: copies queued behind the cap would otherwise each hold memory.
    const buf = this.bufs.get(n * cs);
    try {
      await pool.origin.readForCopy(buf, chunks[0]! * cs);
      // A chunk of zeros (a hole in a sparse origin, mostly) becomes a zero exception: no
      // data chunk to write, sync or charge. dm-snapshot copies it like any other.
      const data: number[] = [];
      for (let k = 0; k < n; k++) {
        if (buf.compare(ZEROS, 0, cs, k * cs, (k + 1) * cs) === 0) {
          for (const r of needers[k]!) r.reserve(-1, 0);
          charged[k] = false;
        } else data.push(k);
      }
      copied = data.length;
      if (copied) {
        const runs = alloc.alloc(copied, 1);
        let i = 0;
        for (let j = 0; j < runs.length; j += 2) for (let p = runs[j]!; p < runs[j]! + runs[j + 1]!; p++) phys[data[i++]!] = p;
        for (const k of data) alloc.refs[phys[k]!] = needers[k]!.length;
        // One write per stretch that is contiguous both in the origin run and in the store.
        const writes: Promise<void>[] = [];
        let a = 0;
        while (a < copied) {
          let b = a + 1;
          while (b < copied && data[b] === data[b - 1]! + 1 && phys[data[b]!] === phys[data[b - 1]!]! + 1) b++;
          const k0 = data[a]!;
          const k1 = data[b - 1]! + 1;
          writes.push(store.dev.write(buf.subarray(k0 * cs, k1 * cs), phys[k0]! * cs, true));
          a = b;
        }
        // All settled before a failure is handled: the rollback frees the chunks and the
        // buffer goes back to the pool, and no write may still land on them afterwards.
        const results = await Promise.allSettled(writes);
        for (const r of results) if (r.status === 'rejected') throw r.reason;
      }
    } catch (e) {
      this.rollback(phys, charged, needers);
      throw e;
    } finally {
      this.copies.release(n);
      this.bufs.put(buf);
    }
    pool.countCopies(copied);
    let count = 0;
    for (const w of needers) count += w.length;
    try {
      await store.commit({
        dataSync: copied > 0,
        count,
        forEach: (fn) => {
          for (let k = 0; k < n; k++) for (const r of needers[k]!) fn(r, chunks[k]!, phys[k]!);
        },
        apply: () => {
          for (let k = 0; k < n; k++) for (const r of needers[k]!) r.map.set(chunks[k]!, phys[k]!);
        },
      });
    } catch (e) {
      this.rollback(phys, charged, needers);
      throw e;
    }
  }

  private rollback(phys: number[], charged: boolean[], needers: SnapshotRecord[][]): void {
    for (let k = 0; k < phys.length; k++) {
      if (phys[k] !== ZERO_CHUNK) this.pool.alloc.free(phys[k]!);
      for (const r of needers[k]!) r.reserve(charged[k] ? -1 : 0, -1);
    }
  }
}

/** Every pool of one origin's snapshots, as the one CopyOnWrite the origin calls. */
export class OriginPools implements CopyOnWrite {
  private readonly pools: CopyPool[] = [];

  add(pool: CopyPool): void {
    this.pools.push(pool);
  }

  remove(pool: CopyPool): void {
    const i = this.pools.indexOf(pool);
    if (i >= 0) this.pools.splice(i, 1);
  }

  /** Pools with a snapshot that still gets copies; the usual single pool needs no new array. */
  private copying(): readonly CopyPool[] | undefined {
    if (this.pools.length === 1) return this.pools[0]!.live.length ? this.pools : undefined;
    let out: CopyPool[] | undefined;
    for (const p of this.pools)
      if (p.live.length) {
        out ??= [];
        out.push(p);
      }
    return out;
  }

  get active(): boolean {
    return this.copying() !== undefined;
  }

  get chunkSize(): number {
    let cs = 1;
    for (const p of this.pools) cs = Math.max(cs, p.chunkSize);
    return cs;
  }

  needsCopy(offset: number, length: number): boolean {
    return this.copying()?.some((p) => p.copy.needsCopy(offset, length)) ?? false;
  }

  async beforeWrite(offset: number, length: number, epoch = Infinity): Promise<void> {
    const pools = this.copying();
    if (!pools) return;
    if (pools.length === 1) await pools[0]!.copy.beforeWrite(offset, length, epoch);
    else await Promise.all(pools.map((p) => p.copy.beforeWrite(offset, length, epoch)));
  }

  readsDone(offset: number, length: number): Promise<void> | undefined {
    const pools = this.copying();
    if (!pools) return undefined;
    let waits: Promise<void>[] | undefined;
    for (const p of pools) {
      const w = p.copy.readsDone(offset, length);
      if (w) {
        waits ??= [];
        waits.push(w);
      }
    }
    return waits && Promise.all(waits).then(() => {});
  }

  /** Whole units of the largest chunk size whose every chunk, in every pool, is discardable. */
  discardable(offset: number, length: number): Array<[number, number]> {
    const pools = this.copying();
    if (!pools) return [[offset, length]];
    const unit = Math.max(...pools.map((p) => p.chunkSize));
    const units: number[] = [];
    for (let u = Math.ceil(offset / unit); u < Math.floor((offset + length) / unit); u++) {
      if (pools.every((p) => this.unitDiscardable(p, u * unit, unit))) units.push(u);
    }
    return chunkRanges(units, unit);
  }

  private unitDiscardable(p: CopyPool, offset: number, unit: number): boolean {
    for (let c = offset / p.chunkSize; c < (offset + unit) / p.chunkSize; c++) if (!p.copy.discardable(c)) return false;
    return true;
  }
}
