// A snapshot volume as the daemon serves it: a thin face over its exception store.
import type { ExceptionStore } from './store.js';
import type { Origin } from './origin.js';
import type { SnapshotRecord } from './snapshot-record.js';
import type { OverflowPolicy, SnapshotStateName } from './format.js';
import type { Volume } from './volume.js';

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
}

export class Snapshot implements Volume {
  constructor(
    readonly origin: Origin,
    readonly store: ExceptionStore,
    readonly record: SnapshotRecord,
  ) {}

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

  read(buf: Buffer, offset: number): Promise<void> {
    return this.store.read(this.record, buf, offset);
  }

  write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.store.write(this.record, buf, offset, fua);
  }

  flush(): Promise<void> {
    return this.store.flush(this.record);
  }

  /** Changes only this snapshot: whole chunks become zero exceptions, which cost no data chunk. */
  discard(offset: number, length: number, fua: boolean): Promise<void> {
    return this.store.zero(this.record, offset, length, fua);
  }

  writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    return this.store.zero(this.record, offset, length, fua);
  }

  usage(): SnapshotUsage {
    const r = this.record;
    const cs = this.store.chunkSize;
    return {
      name: r.name,
      origin: this.origin.name,
      state: r.state,
      policy: r.policy,
      transient: this.store.transient,
      readOnly: r.readOnly,
      chunkSize: cs,
      usedChunks: r.usedChunks,
      capacityChunks: r.capacityChunks,
      usedBytes: r.usedChunks * cs,
      capacityBytes: r.capacityChunks * cs,
      exceptions: r.map.size,
      createdAt: new Date(r.createdAt),
    };
  }
}
