// An exception store whose exceptions live in memory only, like dm-snap-transient.c: the
// file holds copied data, nothing is synced, and a restart finds nothing to replay.
import { Allocator } from './allocator.js';
import { Committer } from './committer.js';
import type { BlockDevice } from './device.js';
import { checkGeometry, type CommitListener, type ExceptionBatch, type ExceptionStore, type StoreGeometry } from './exception-store.js';
import { headerChunks } from './format.js';
import type { SnapshotRecord } from './snapshot-record.js';

const NOTHING = (): void => {};

export class TransientStore implements ExceptionStore {
  readonly persistent = false;
  readonly entriesPerArea = 0;
  readonly chunkSize: number;
  readonly alloc: Allocator;
  private readonly committer: Committer;

  constructor(
    readonly dev: BlockDevice,
    geometry: StoreGeometry,
    onCommit: CommitListener,
  ) {
    checkGeometry(geometry);
    this.chunkSize = geometry.chunkSize;
    // Chunk 0 stands for a zero exception, so data starts past the header, as in a persistent file.
    this.alloc = new Allocator(headerChunks(this.chunkSize));
    // Without a device the committer applies each job at once, in submission order.
    this.committer = new Committer(undefined, onCommit);
  }

  addSnapshot(): Promise<void> {
    return Promise.resolve();
  }

  updateSnapshot(): Promise<void> {
    return Promise.resolve();
  }

  saveSlots(_recs: () => Iterable<SnapshotRecord>, _inUse: boolean, apply: () => void): Promise<void> {
    return this.committer.submit({ dataSync: false, exceptions: 0, encode: NOTHING, apply });
  }

  commit(batch: ExceptionBatch): Promise<void> {
    return this.committer.submit({ dataSync: batch.dataSync, exceptions: batch.count, encode: NOTHING, apply: () => batch.apply() });
  }

  dropSnapshot(): number[] {
    return [];
  }

  sync(): Promise<void> {
    return Promise.resolve();
  }

  idle(): Promise<void> {
    return this.committer.idle();
  }

  close(): Promise<void> {
    return this.dev.close();
  }
}
