// The exception store's table, after dm-exception-store.h: what a pool of snapshots asks
// of the file that holds their exceptions. persistent-store.ts keeps them across restarts
// (dm-snap-persistent.c), transient-store.ts in memory only (dm-snap-transient.c); the
// policy of when to copy, invalidate or free lives in the pool, not here.
import type { Allocator } from './allocator.js';
import type { BlockDevice } from './device.js';
import { CowErrors } from './errors.js';
import { validChunkSize } from './format.js';
import type { SnapshotRecord } from './snapshot-record.js';

/** Exceptions committed together: for each, the snapshot, its chunk and the store chunk now holding it. */
export interface ExceptionBatch {
  /** Data chunks were written for it: they must be durable before the metadata naming them. */
  dataSync: boolean;
  count: number;
  forEach(fn: (rec: SnapshotRecord, chunk: number, phys: number) => void): void;
  /** In-memory effects, run in commit order once the batch is durable. */
  apply(): void;
}

export interface StoreGeometry {
  chunkSize: number;
  originSize: number;
  originName: string;
}

export interface ExceptionStore {
  readonly dev: BlockDevice;
  readonly chunkSize: number;
  /** False for a store whose exceptions are gone on restart. */
  readonly persistent: boolean;
  /** Exceptions per metadata area, 0 when metadata costs no store chunks. */
  readonly entriesPerArea: number;
  /** The file's chunks, data and metadata alike: allocating one is dm's prepare_exception. */
  readonly alloc: Allocator;
  /** A new snapshot's slot (and first metadata area): durable when it resolves. */
  addSnapshot(rec: SnapshotRecord): Promise<void>;
  /** The snapshot's slot (state, size) in the next group commit. */
  updateSnapshot(rec: SnapshotRecord): Promise<void>;
  /**
   * Slots written even after a failed commit (invalid marks, removals), which need no
   * new space: recs is read when they are encoded, apply runs once they are durable.
   */
  saveSlots(recs: () => Iterable<SnapshotRecord>, inUse: boolean, apply: () => void): Promise<void>;
  /** dm's commit_exception, batched: resolves once the batch is durable and applied. */
  commit(batch: ExceptionBatch): Promise<void>;
  /** Metadata chunks a removed snapshot held, to be freed with its data. */
  dropSnapshot(rec: SnapshotRecord): number[];
  /** Makes written data durable (FLUSH, FUA). */
  sync(): Promise<void>;
  /** Resolves once every queued commit is done. */
  idle(): Promise<void>;
  close(): Promise<void>;
}

export type CommitListener = (seconds: number, exceptions: number) => void;

export function checkGeometry(g: StoreGeometry): void {
  if (!validChunkSize(g.chunkSize)) throw CowErrors.badChunkSize(g.chunkSize);
  if (Math.ceil(g.originSize / g.chunkSize) >= 0xffffffff) throw CowErrors.originTooLarge();
}
