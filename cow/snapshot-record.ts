// What the store knows about one snapshot: identity, limits, its exception map and the
// chunk accounting that makes its bounded size exact.
import { ABSENT, ChunkMap } from './chunk-map.js';
import type { InvalidReason, OverflowPolicy, SnapshotStateName } from './format.js';

export class SnapshotRecord {
  readonly map = new ChunkMap();
  /** Mappings to data chunks (shared or private), committed or reserved. */
  dataChunks = 0;
  /** Metadata entries written or reserved; superseded entries still occupy space. */
  entries = 0;
  /** Snapshot I/O and store jobs in flight that involve this snapshot. */
  busy = 0;
  removing = false;
  /** The origin's epoch at creation (in memory only): held origin writes of an earlier epoch are in its view. */
  epoch = 0;
  /** Highest usage threshold (percent) already reported. */
  reportedPct = 0;
  /** Why it was invalidated, and the chunks it held then: kept in its slot. */
  invalidReason: InvalidReason | undefined;
  usedAtInvalidation = 0;
  /**
   * Chunks a backup has finished reading (one bit each, in memory only): origin writes no
   * longer copy them for this snapshot, as qemu's backup job stops its copy-before-write
   * for blocks it has copied. Reads of them then see the origin.
   */
  released: Uint8Array | undefined;

  constructor(
    readonly slot: number,
    readonly snapId: number,
    readonly name: string,
    public state: SnapshotStateName,
    readonly policy: OverflowPolicy,
    readonly readOnly: boolean,
    public capacityChunks: number,
    readonly createdAt: number,
    /** Exceptions per metadata area, 0 where metadata costs no store chunks (transient stores). */
    private readonly perArea: number,
  ) {}

  /** The snapshot still reads chunk c from the origin: a write there needs its copy first. */
  lacks(c: number): boolean {
    if (this.map.get(c) !== ABSENT) return false;
    const r = this.released;
    return r === undefined || ((r[c >>> 3]! >>> (c & 7)) & 1) === 0;
  }

  /**
   * Metadata chunks for e entries: the areas holding them (at least one) plus the chunk
   * reserved for the next area, which dm-snapshot's persistent store also spends (its
   * header chunk) so usage reads the same as lvs would show for dm.
   */
  metaChunks(e: number): number {
    if (this.perArea === 0) return 0;
    return Math.max(1, Math.ceil(e / this.perArea)) + 1;
  }

  get usedChunks(): number {
    return this.dataChunks + this.metaChunks(this.entries);
  }

  fits(dataDelta: number, entryDelta: number): boolean {
    return this.dataChunks + dataDelta + this.metaChunks(this.entries + entryDelta) <= this.capacityChunks;
  }

  reserve(dataDelta: number, entryDelta: number): void {
    this.dataChunks += dataDelta;
    this.entries += entryDelta;
  }

  /** Marks it invalid in memory, recording why and what it held. */
  setInvalid(reason: InvalidReason): void {
    this.state = 'invalid';
    this.invalidReason = reason;
    this.usedAtInvalidation = this.usedChunks;
  }

  /**
   * Chunks its store keeps allocated on disk for it: its whole size while it may still
   * grow, what it holds once invalid (it never grows again).
   */
  get reservedChunks(): number {
    return this.state === 'invalid' ? Math.min(this.usedChunks, this.capacityChunks) : this.capacityChunks;
  }

  /** Counts toward COW only while it can still be read. */
  get live(): boolean {
    return this.state !== 'invalid' && this.state !== 'merging' && !this.removing;
  }
}
