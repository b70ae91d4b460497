// A snapshot volume: reads find each chunk in its exception store or, where it has none,
// in the origin as of its epoch; its own writes go to private chunks of the store.
import { ZEROS, copyBuffers } from './buffer-pool.js';
import { ABSENT } from './chunk-map.js';
import { firstChunk, forEachChunk } from './chunks.js';
import { CowErrors } from './errors.js';
import { ZERO_CHUNK, type InvalidReason, type OverflowPolicy, type SnapshotStateName } from './format.js';
import type { Origin } from './origin.js';
import type { SnapshotPool } from './snapshot-pool.js';
import type { SnapshotRecord } from './snapshot-record.js';
import type { Volume } from './volume.js';
import type { MergeProgress } from './merge.js';

export interface SnapshotUsage {
  name: string;
  origin: string;
  state: SnapshotStateName;
  policy: OverflowPolicy;
  transient: boolean;
  readOnly: boolean;
  chunkSize: number;
  /** Chunks charged to this snapshot: data it maps (shared or not) plus its metadata. */
  usedChunks: number;
  capacityChunks: number;
  usedBytes: number;
  capacityBytes: number;
  /** Exceptions (chunks that no longer read from the origin). */
  exceptions: number;
  createdAt: Date;
  /** Its store reserves nothing on disk (--sparse): a full file system may invalidate it. */
  sparse: boolean;
  /** Bytes its store keeps allocated on disk for it (0 when sparse). */
  reservedBytes: number;
  /** Why it is invalid, and what it held then; null while it is not. */
  invalid: InvalidInfo | null;
  /** How far its merge into the origin is; null unless it is merging. */
  merge: MergeProgress | null;
}

export interface InvalidInfo {
  reason: InvalidReason;
  usedChunks: number;
  usedBytes: number;
}

/** Where a piece of a snapshot read comes from. */
const FROM_ORIGIN = 0;
const FROM_STORE = 1;
const FROM_ZEROS = 2;

export class Snapshot implements Volume {
  private readonly cs: number;
  /** Its merge into the origin, while one runs (manager.ts). */
  merging: { progress(): MergeProgress } | undefined;

  constructor(
    readonly origin: Origin,
    readonly pool: SnapshotPool,
    readonly record: SnapshotRecord,
  ) {
    this.cs = pool.chunkSize;
  }

  get name(): string {
    return this.record.name;
  }

  get size(): number {
    return this.origin.size;
  }

  get state(): SnapshotStateName {
    return this.record.state;
  }

  get readOnly(): boolean {
    return this.record.readOnly;
  }

  private checkReadable(): void {
    const rec = this.record;
    if (rec.removing || !this.pool.holds(rec)) throw CowErrors.snapshotRemoved(rec.name);
    if (rec.state === 'merging') throw CowErrors.snapshotMerging(rec.name);
    if (rec.state === 'invalid') throw CowErrors.snapshotInvalid(rec.name, rec.invalidReason);
  }

  private checkWritable(): void {
    this.checkReadable();
    const rec = this.record;
    if (rec.readOnly) throw CowErrors.snapshotReadOnly(rec.name);
    if (rec.state === 'overflow') throw CowErrors.snapshotFull(rec.name);
  }

  /** The origin as this snapshot sees it. */
  private readOrigin(buf: Buffer, offset: number): Promise<void> {
    return this.pool.origin.readAsOf(buf, offset, this.record.epoch);
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.checkReadable();
    const rec = this.record;
    const c = firstChunk(offset, this.cs);
    rec.busy++;
    this.pool.reclaimer.readStarted();
    try {
      // Most small reads lie in one chunk: no segment bookkeeping for them.
      if (offset + buf.length <= (c + 1) * this.cs) await this.readWithin(buf, offset, c);
      else await this.readSpan(buf, offset);
    } finally {
      rec.busy--;
      this.pool.reclaimer.readDone();
    }
    // Invalidated meanwhile: what was read may mix in origin writes the snapshot never saw.
    if (rec.state === 'invalid') throw CowErrors.snapshotInvalid(rec.name, rec.invalidReason);
  }

  private async readWithin(buf: Buffer, offset: number, c: number): Promise<void> {
    const p = this.record.map.get(c);
    if (p === ZERO_CHUNK) {
      buf.fill(0);
    } else if (p !== ABSENT) {
      await this.pool.store.dev.read(buf, p * this.cs + (offset - c * this.cs));
    } else {
      const readers = this.pool.originReaders;
      readers.enter(c);
      try {
        await this.readOrigin(buf, offset);
      } finally {
        readers.leave(c);
      }
    }
  }

  /** Consecutive chunks from the origin, or from consecutive store chunks, become one read each. */
  private async readSpan(buf: Buffer, offset: number): Promise<void> {
    const ios: Promise<void>[] = [];
    const readers: number[] = [];
    const map = this.record.map;
    const dev = this.pool.store.dev;
    let kind = -1;
    let segBuf = 0;
    let segDev = 0;
    let segLen = 0;
    const flush = (): void => {
      if (segLen === 0) return;
      const sub = buf.subarray(segBuf, segBuf + segLen);
      if (kind === FROM_ORIGIN) ios.push(this.readOrigin(sub, segDev));
      else if (kind === FROM_STORE) ios.push(dev.read(sub, segDev));
      else sub.fill(0);
    };
    try {
      forEachChunk(offset, buf.length, this.cs, (c, within, n, pos) => {
        const p = map.get(c);
        let k: number;
        let at: number;
        if (p === ABSENT) {
          k = FROM_ORIGIN;
          at = offset + pos;
          this.pool.originReaders.enter(c);
          readers.push(c);
        } else if (p === ZERO_CHUNK) {
          k = FROM_ZEROS;
          at = 0;
        } else {
          k = FROM_STORE;
          at = p * this.cs + within;
        }
        if (k === kind && (k === FROM_ZEROS || at === segDev + segLen)) {
          segLen += n;
        } else {
          flush();
          kind = k;
          segBuf = pos;
          segDev = at;
          segLen = n;
        }
      });
      flush();
      await Promise.all(ios);
    } finally {
      for (const c of readers) this.pool.originReaders.leave(c);
    }
  }

  write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.eachChunk(offset, buf.length, fua, (c, within, n, pos) => this.writeChunk(c, within, buf.subarray(pos, pos + n)));
  }

  /** Changes only this snapshot: whole chunks become zero exceptions, which cost no data chunk. */
  discard(offset: number, length: number, fua: boolean): Promise<void> {
    return this.writeZeroes(offset, length, fua);
  }

  writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    return this.eachChunk(offset, length, fua, (c, within, n) =>
      n === this.cs ? this.zeroChunk(c) : this.writeChunk(c, within, ZEROS.subarray(0, n)),
    );
  }

  /** Runs a write's per-chunk parts concurrently, the snapshot held busy (a removal waits for it). */
  private async eachChunk(
    offset: number,
    length: number,
    fua: boolean,
    part: (chunk: number, within: number, n: number, pos: number) => Promise<void>,
  ): Promise<void> {
    this.checkWritable();
    const rec = this.record;
    rec.busy++;
    try {
      const parts: Promise<void>[] = [];
      forEachChunk(offset, length, this.cs, (c, within, n, pos) => parts.push(part(c, within, n, pos)));
      // Every part settles before the first error is thrown: one still running after the
      // reply would write from a buffer the caller reuses, and commit past a removal.
      for (const r of await Promise.allSettled(parts)) if (r.status === 'rejected') throw r.reason;
      if (fua) await this.pool.store.sync();
    } finally {
      rec.busy--;
    }
  }

  async flush(): Promise<void> {
    this.checkReadable();
    await this.pool.store.sync();
  }

  /** Commits one exception of this snapshot; on success runs apply, with p the chunk it replaces. */
  private commitOne(c: number, np: number, dataSync: boolean, apply: () => void): Promise<void> {
    const rec = this.record;
    return this.pool.store.commit({
      dataSync,
      count: 1,
      forEach: (fn) => fn(rec, c, np),
      apply: () => {
        rec.map.set(c, np);
        apply();
      },
    });
  }

  /** Drops the pool's reference to a chunk this snapshot no longer maps. */
  private unmap(p: number): void {
    if (p !== ABSENT && p !== ZERO_CHUNK && this.pool.alloc.unref(p)) this.pool.reclaimer.free(p);
  }

  private async writeChunk(c: number, within: number, data: Buffer): Promise<void> {
    const { pool, record: rec, cs } = this;
    const wait = pool.locks.acquire(c);
    if (wait) await wait;
    try {
      this.checkWritable();
      const p = rec.map.get(c);
      if (p !== ABSENT && p !== ZERO_CHUNK && pool.alloc.refs[p] === 1) {
        // Only this snapshot maps it: overwrite in place, like any disk.
        await pool.store.dev.write(data, p * cs + within);
        return;
      }
      // Unmapped, zero or shared: the write goes to a new private chunk.
      const dataDelta = p === ABSENT || p === ZERO_CHUNK ? 1 : 0;
      pool.policy.ensureFits(rec, dataDelta, 1);
      rec.reserve(dataDelta, 1);
      const np = pool.alloc.allocOne(1);
      let ok = false;
      const full = data.length === cs;
      const buf = full ? data : copyBuffers.get(cs);
      try {
        if (!full) {
          if (p === ABSENT) await this.readOrigin(buf, c * cs);
          else if (p === ZERO_CHUNK) buf.fill(0);
          else await pool.store.dev.read(buf, p * cs);
          data.copy(buf, within);
        }
        await pool.store.dev.write(buf, np * cs);
        await this.commitOne(c, np, true, () => this.unmap(p));
        ok = true;
      } finally {
        if (!full) copyBuffers.put(buf);
        if (!ok) {
          pool.alloc.free(np);
          rec.reserve(-dataDelta, -1);
        }
      }
      pool.policy.reportUsage(rec);
    } finally {
      pool.locks.release(c);
    }
  }

  private async zeroChunk(c: number): Promise<void> {
    const { pool, record: rec } = this;
    const wait = pool.locks.acquire(c);
    if (wait) await wait;
    try {
      this.checkWritable();
      const p = rec.map.get(c);
      if (p === ZERO_CHUNK) return;
      pool.policy.ensureFits(rec, 0, 1);
      rec.reserve(0, 1);
      let ok = false;
      try {
        await this.commitOne(c, ZERO_CHUNK, false, () => {
          if (p !== ABSENT) {
            rec.reserve(-1, 0);
            this.unmap(p);
          }
        });
        ok = true;
      } finally {
        if (!ok) rec.reserve(0, -1);
      }
    } finally {
      pool.locks.release(c);
    }
  }

  usage(): SnapshotUsage {
    const r = this.record;
    const cs = this.cs;
    return {
      name: r.name,
      origin: this.origin.name,
      state: r.state,
      policy: r.policy,
      transient: !this.pool.store.persistent,
      readOnly: r.readOnly,
      chunkSize: cs,
      usedChunks: r.usedChunks,
      capacityChunks: r.capacityChunks,
      usedBytes: r.usedChunks * cs,
      capacityBytes: r.capacityChunks * cs,
      exceptions: r.map.size,
      createdAt: new Date(r.createdAt),
      sparse: this.pool.sparse,
      reservedBytes: this.pool.sparse ? 0 : r.reservedChunks * cs,
      merge: this.merging?.progress() ?? null,
      invalid:
        r.state === 'invalid'
          ? { reason: r.invalidReason ?? 'unknown', usedChunks: r.usedAtInvalidation, usedBytes: r.usedAtInvalidation * cs }
          : null,
    };
  }
}
