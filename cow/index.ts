/**
 * cow/ — the copy-on-write engine: origin and snapshot volumes over bounded, crash-safe
 * exception stores. Knows nothing of sockets or NBD. Design: docs/cow-design.md;
 * on-disk format: docs/exception-store.md.
 *
 * Daemon-facing API
 *   const cow = await CowManager.open(dataDir, { logger?, usageThresholds?, onCommit?, maxCopies? })
 *   const origin = await cow.attachOrigin(name)        // opens DATA_DIR/name.vol + its stores, replays
 *   const snap = await cow.createSnapshot({ name, origin, size, chunkSize = 65536,
 *                                           policy: 'invalidate' | 'overflow', transient = false, readOnly = false,
 *                                           sparse = false })   // size reserved on disk unless sparse; COW_NO_SPACE (ENOSPC) if it does not fit
 *   cow.snapshot(name) / cow.origin(name) / cow.snapshotsOf(origin?) / cow.list(): SnapshotUsage[]
 *   await cow.extendSnapshot(name, newSizeBytes)       // lvextend; clears 'overflow'; reserves the growth first
 *   cow.stores(): StoreUsage[]                         // each store file: needed/reserved/used/file bytes
 *   await cow.createSnapshots([opts, ...])           // a consistency group: one instant for all
 *   cow.tracker(origin): ChangeTracker                 // changed chunks between checkpoints (cow/NAME.cbt)
 *   await cow.removeSnapshot(name)                     // frees space at once (holes punched, file truncated or deleted)
 *   await cow.detachOrigin(name); await cow.close()    // idempotent
 *   cow.stats(): CowStats                              // copies, bytesCopied, exceptionsCommitted, commits, commitSecondsTotal, ...
 *   cow.on('invalidated' | 'overflow' | 'usage' | 'commit', ...)
 *
 * Volumes (Origin and Snapshot implement Volume):
 *   size, state ('valid' | 'invalid' | 'overflow'; origins always 'valid'),
 *   read(buf, off), write(buf, off, fua), flush(), discard(off, len, fua), writeZeroes(off, len, fua).
 *   Errors are CowError (cow/errors.ts) with a stable id and an errno code: 'EIO' (invalid
 *   or removed snapshot, store failure), 'ENOSPC' (overflow-policy snapshot full), 'EPERM'
 *   (read-only snapshot).
 *   Ranges are range-checked by the caller.
 *
 * Lower level (tests, tools): BlockDevice, FileDevice, MemDevice, SnapshotPool, OriginPools, Origin, Snapshot.
 */
export type { BlockDevice, FileDeviceOptions } from './device.js';
export { FileDevice, syncDirectory, syncMadeDirectories } from './device.js';
export { allocateFile } from './fallocate.js';
export { MemDevice } from './mem-device.js';
export { CowError, CowErrors, INVALID_WHY, isCowError, type Errno } from './errors.js';
export type { Volume } from './volume.js';
export { Origin } from './origin.js';
export { Snapshot, type InvalidInfo, type SnapshotUsage } from './snapshot.js';
export { DEFAULT_MERGE_RATE, type MergeProgress } from './merge.js';
export { SnapshotPool, type PoolEvents, type PoolOptions, type NewSnapshot } from './snapshot-pool.js';
export { OriginPools } from './origin-copy.js';
export type { ExceptionStore } from './exception-store.js';
export type { ChangeMarks, CopyOnWrite, OriginView } from './origin-contract.js';
export { ChangeTracker, type ChangeTrackerOptions, type VolumeFileState, type TrackerDevice } from './change-tracker.js';
export { GENERATIONS, TRACKER_CHUNK } from './tracker-format.js';
export {
  CowManager,
  validName,
  type CowManagerOptions,
  type CreateSnapshotOptions,
  type StoreUsage,
  type CowStats,
  type CowLogger,
  type InvalidatedEvent,
  type MergeEvent,
  type MergeSnapshotOptions,
  type UsageEvent,
  type CowManagerEvents,
} from './manager.js';
export {
  MIN_CHUNK,
  MAX_CHUNK,
  MAX_SNAPSHOTS,
  INVALID_REASONS,
  type InvalidReason,
  type OverflowPolicy,
  type SnapshotStateName,
} from './format.js';
