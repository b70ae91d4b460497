// A pool of snapshots of one origin that share one exception store (one chunk size): an
// origin write copies a chunk once and every snapshot lacking it maps the copy, reference
// counted; each is still charged one chunk for it, so its bounded size reads exactly as
// if it had a store of its own. The pool keeps the snapshots' lifecycle; the store keeps
// their metadata, OriginCopy the copy path, SnapshotPolicy the invalidation policy.
import { ChunkLocks, ReaderTable } from './chunk-locks.js';
import { ZERO_CHUNK, MAX_SNAPSHOTS, randomU32, type OverflowPolicy } from './format.js';
import type { BlockDevice } from './device.js';
import { CowErrors } from './errors.js';
import type { CommitListener, ExceptionStore, StoreGeometry } from './exception-store.js';
import { OriginCopy } from './origin-copy.js';
import type { OriginView } from './origin-contract.js';
import { PersistentStore } from './persistent-store.js';
import { Reclaimer } from './reclaim.js';
import { StoreReservation, type Claim } from './reservation.js';
import { SnapshotPolicy, type PolicyEvents } from './snapshot-policy.js';
import { SnapshotRecord } from './snapshot-record.js';
import { TransientStore } from './transient-store.js';

export interface PoolEvents extends PolicyEvents {
  onCommit?(seconds: number, exceptions: number): void;
  onCopy?(chunks: number, bytes: number): void;
}

export interface PoolOptions {
  events?: PoolEvents;
  /** Usage percentages that raise onUsage once each as a snapshot fills. */
  usageThresholds?: number[];
  /** Chunk copies in flight per pool (default: 16 MiB of chunks, at least 16). */
  maxCopies?: number;
  /** Reserve nothing on disk: snapshots may be invalidated when the file system fills (a thin pool). */
  sparse?: boolean;
}

/** A store's space, in bytes. */
export interface StoreSpace {
  /** What its snapshots need kept allocated (0 for a sparse store). */
  neededBytes: number;
  /** What is known allocated for them: below neededBytes only when a restart could not reserve it all. */
  reservedBytes: number;
  /** Chunks holding data or metadata, header included. */
  usedBytes: number;
  /** The file's length. */
  fileBytes: number;
}

export interface NewSnapshot {
  name: string;
  capacityChunks: number;
  policy: OverflowPolicy;
  readOnly: boolean;
}

export interface PoolStats {
  copies: number;
  bytesCopied: number;
  exceptions: number;
  commits: number;
  commitSeconds: number;
}

/** A pool's counters, and the commit listener that keeps them, for the store made before the pool. */
function counters(events: PoolEvents = {}): { stats: PoolStats; onCommit: CommitListener } {
  const stats: PoolStats = { copies: 0, bytesCopied: 0, exceptions: 0, commits: 0, commitSeconds: 0 };
  const onCommit: CommitListener = (seconds, exceptions) => {
    stats.commits++;
    stats.commitSeconds += seconds;
    stats.exceptions += exceptions;
    events.onCommit?.(seconds, exceptions);
  };
  return { stats, onCommit };
}

export class SnapshotPool {
  readonly chunkSize: number;
  readonly alloc: ExceptionStore['alloc'];
  readonly records = new Array<SnapshotRecord | undefined>(MAX_SNAPSHOTS);
  /** Snapshots that still get copies, as an array for the per-chunk hot loop. */
  live: SnapshotRecord[] = [];
  readonly locks = new ChunkLocks();
  /** Chunks snapshot reads are reading from the origin: an origin write waits them out. */
  readonly originReaders = new ReaderTable();
  readonly policy: SnapshotPolicy;
  readonly reclaimer: Reclaimer;
  readonly reservation: StoreReservation;
  readonly copy: OriginCopy;
  private readonly events: PoolEvents;

  private constructor(
    readonly store: ExceptionStore,
    readonly origin: OriginView,
    opts: PoolOptions,
    readonly stats: PoolStats,
    recovered: SnapshotRecord[] = [],
  ) {
    this.chunkSize = store.chunkSize;
    this.alloc = store.alloc;
    this.events = opts.events ?? {};
    this.policy = new SnapshotPolicy(this, store, this.events, opts.usageThresholds);
    this.reservation = new StoreReservation(store.dev, store.alloc, store.chunkSize, !opts.sparse && !!store.dev.allocate, () =>
      this.heldChunks(),
    );
    this.reclaimer = new Reclaimer(
      store.dev,
      store.alloc,
      store.chunkSize,
      (e) => this.events.onError?.(e, 'hole punch'),
      this.reservation,
    );
    this.copy = new OriginCopy(this, opts.maxCopies);
    for (const rec of recovered) this.records[rec.slot] = rec;
    this.refreshLive();
  }

  /** A new persistent pool on an empty device; see PersistentStore.create for firstSnapshot. */
  static async create(
    dev: BlockDevice,
    origin: OriginView,
    opts: PoolOptions & StoreGeometry,
    firstSnapshot = false,
  ): Promise<SnapshotPool> {
    const { stats, onCommit } = counters(opts.events);
    const store = await PersistentStore.create(dev, opts, onCommit, firstSnapshot);
    return new SnapshotPool(store, origin, opts, stats);
  }

  /**
   * Replays a persistent pool and re-makes its reservation; a file system that cannot
   * hold it any more is reported through onError, and the pool opens all the same.
   */
  static async open(dev: BlockDevice, origin: OriginView, opts: PoolOptions = {}): Promise<SnapshotPool> {
    const { stats, onCommit } = counters(opts.events);
    const { store, records } = await PersistentStore.open(dev, origin.size, onCommit);
    const pool = new SnapshotPool(store, origin, opts, stats, records);
    if (!(await pool.reservation.restore())) {
      const s = pool.space();
      pool.events.onError?.(
        new Error(`reserved ${s.reservedBytes} of the ${s.neededBytes} bytes its snapshots need: the file system is full`),
        'space reservation',
      );
    }
    // Space reserved for a snapshot whose creation a crash cut short goes back.
    pool.reclaimer.trim();
    await pool.reclaimer.idle();
    return pool;
  }

  /** Whether the pool reserves its snapshots' space on disk. */
  get sparse(): boolean {
    return !this.reservation.enabled;
  }

  /** Header chunks plus what every snapshot in a slot holds reserved. */
  private heldChunks(): number {
    let n = this.alloc.firstChunk;
    for (const r of this.records) if (r) n += r.reservedChunks;
    return n;
  }

  /** Reserves room for a snapshot of `chunks` about to be made or grown (reservation.ts). */
  claim(chunks: number, what: string): Promise<Claim> {
    return this.reservation.claim(chunks, what);
  }

  space(): StoreSpace {
    const cs = this.chunkSize;
    return {
      neededBytes: this.reservation.neededChunks * cs,
      reservedBytes: this.reservation.allocatedChunks * cs,
      usedBytes: (this.alloc.end - this.alloc.freeChunks) * cs,
      fileBytes: this.store.dev.size,
    };
  }

  /** A pool whose exceptions live in memory only: gone on restart. */
  static transient(dev: BlockDevice, origin: OriginView, opts: PoolOptions & StoreGeometry): SnapshotPool {
    const { stats, onCommit } = counters(opts.events);
    return new SnapshotPool(new TransientStore(dev, opts, onCommit), origin, opts, stats);
  }

  static unfinished(dev: BlockDevice): Promise<boolean> {
    return PersistentStore.unfinished(dev);
  }

  holds(rec: SnapshotRecord): boolean {
    return this.records[rec.slot] === rec;
  }

  refreshLive(): void {
    this.live = this.records.filter((r): r is SnapshotRecord => r !== undefined && this.policy.copiesFor(r));
  }

  countCopies(chunks: number): void {
    if (!chunks) return;
    this.stats.copies += chunks;
    this.stats.bytesCopied += chunks * this.chunkSize;
    this.events.onCopy?.(chunks, chunks * this.chunkSize);
  }

  get snapshotCount(): number {
    return this.records.filter((r) => r !== undefined && !r.removing).length;
  }

  get fileChunks(): number {
    return this.alloc.end;
  }

  get memoryBytes(): number {
    let n = this.alloc.bytes;
    for (const r of this.records) if (r) n += r.map.bytes;
    return n;
  }

  /** Durable when it resolves. The caller has quiesced the origin (Origin.quiesced). */
  async createSnapshot(o: NewSnapshot): Promise<SnapshotRecord> {
    // biome-ignore lint/complexity/useIndexOf: records is sparse, and indexOf skips holes.
    const slot = this.records.findIndex((r) => r === undefined);
    if (slot < 0) throw CowErrors.storeSlotsFull(MAX_SNAPSHOTS);
    const rec = new SnapshotRecord(
      slot,
      randomU32(),
      o.name,
      'valid',
      o.policy,
      o.readOnly,
      o.capacityChunks,
      Date.now(),
      this.store.entriesPerArea,
    );
    rec.epoch = this.origin.epoch;
    if (!rec.fits(0, 0)) throw CowErrors.snapshotTooSmall(rec.usedChunks);
    rec.removing = true; // not live until durable
    this.records[slot] = rec;
    try {
      await this.store.addSnapshot(rec);
    } catch (e) {
      this.records[slot] = undefined;
      throw e;
    }
    rec.removing = false;
    this.refreshLive();
    return rec;
  }

  /** Grows a snapshot, its space reserved first: a file system that cannot hold it changes nothing. */
  async extend(rec: SnapshotRecord, capacityChunks: number): Promise<void> {
    if (capacityChunks < rec.capacityChunks) throw CowErrors.snapshotShrink();
    const claim = await this.claim(capacityChunks - rec.capacityChunks, `growing snapshot ${rec.name}`);
    const old = rec.capacityChunks;
    const oldState = rec.state;
    rec.capacityChunks = capacityChunks;
    if (rec.state === 'overflow') rec.state = 'valid';
    try {
      await this.store.updateSnapshot(rec);
    } catch (e) {
      rec.capacityChunks = old;
      rec.state = oldState;
      throw e;
    } finally {
      claim.done();
      if (rec.capacityChunks === old) this.reclaimer.trim();
    }
    rec.reportedPct = 0;
    this.policy.reportUsage(rec);
  }

  /** Frees the snapshot's chunks at once: durable removal first, then holes punched. */
  async remove(rec: SnapshotRecord): Promise<void> {
    // Origin writes stop copying for a snapshot being removed; were the removal cut short
    // by a crash, it would come back valid reading what the origin wrote meanwhile. So it
    // is first marked invalid, durably, while it still gets its copies. A merged one gets
    // no copies: cut short, it comes back merging with nothing left, and goes.
    if (rec.state !== 'merging') await this.policy.invalidateDurably(rec);
    rec.removing = true;
    this.refreshLive();
    while (rec.busy > 0) await new Promise<void>((r) => setImmediate(r));
    await this.store.saveSlots(
      () => [rec],
      false,
      () => {
        this.policy.forget(rec);
        const freed: number[] = [];
        rec.map.forEach((_c, p) => {
          if (p !== ZERO_CHUNK && this.alloc.unref(p)) freed.push(p);
        });
        freed.push(...this.store.dropSnapshot(rec));
        this.records[rec.slot] = undefined;
        this.reclaimer.release(freed);
      },
    );
    await this.reclaimer.idle();
  }

  /** Waits for every queued commit and hole punch. */
  async idle(): Promise<void> {
    await this.store.idle();
    await this.reclaimer.idle();
  }

  async close(): Promise<void> {
    await this.idle();
    await this.store.close();
  }
}
