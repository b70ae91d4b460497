// The contract between an origin and the pools of its snapshots, one interface each way,
// both handed over when the other side is made: the pool reads the origin through
// OriginView, the origin asks its pools for copies through CopyOnWrite.

/** What a pool of snapshots reads of its origin. */
export interface OriginView {
  readonly size: number;
  /** Snapshots created now get this epoch (the origin bumps it while quiesced). */
  readonly epoch: number;
  /** The origin as a snapshot of that epoch sees it: the file plus writes held from before it. */
  readAsOf(buf: Buffer, offset: number, epoch: number): Promise<void>;
  /** The file alone, for copies: a held write lands only after its copies are made. */
  readForCopy(buf: Buffer, offset: number): Promise<void>;
}

/** What the origin asks of its snapshots before a write lands (dm-snap.c's __origin_write). */
export interface CopyOnWrite {
  /** Some snapshot still reads chunks from the origin: writes must go through the copy path. */
  readonly active: boolean;
  /** The largest chunk size among the pools: copies read whole chunks of it. */
  readonly chunkSize: number;
  /** True when a write of the range would need a copy now. */
  needsCopy(offset: number, length: number): boolean;
  /** Copies and commits every chunk of the range that a snapshot of epoch or older still reads from the origin. */
  beforeWrite(offset: number, length: number, epoch?: number): Promise<void>;
  /** Resolves once no snapshot read is reading the range from the origin; undefined when none is. */
  readsDone(offset: number, length: number): Promise<void> | undefined;
  /** Byte ranges within [offset, offset+length) that no snapshot reads from the origin any more. */
  discardable(offset: number, length: number): Array<[number, number]>;
}

/** Changed-chunk tracking (change-tracker.ts): a write's chunks are marked before its data is written. */
export interface ChangeMarks {
  /** Undefined when the range is already durably marked; else resolves once it is. */
  mark(offset: number, length: number): Promise<void> | undefined;
  /** The same for a range made zero (TRIM, WRITE_ZEROES): chunks that never held data are left unmarked. */
  markZeroing?(offset: number, length: number): Promise<void> | undefined;
}

/**
 * A snapshot being merged into its origin (merge.ts): until a chunk is copied back, the
 * origin reads it from the snapshot's store, and a write to it copies it back first.
 */
export interface OriginMerge {
  /**
   * The origin's epoch when the merge began: snapshots taken since see the merged content
   * (the origin's as it reads), older ones keep their own point in time.
   */
  readonly epoch: number;
  /** Some chunk of the range still reads from the merging snapshot's store. */
  pending(offset: number, length: number): boolean;
  /**
   * Reads the range: `file` fills buf from the origin's file, then the chunks that were
   * not copied back when the read began are read from the store over it.
   */
  read(buf: Buffer, offset: number, file: () => Promise<void>): Promise<void>;
  /** Copies every unmerged chunk of the range back into the origin, durably. */
  mergeRange(offset: number, length: number): Promise<void>;
}
