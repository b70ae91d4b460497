// The engine's one table of errors, in the manner of fastify's errors.js. Each error has a
// stable `id` for callers and logs, and an errno-style `code` shared with the operating
// system's own errors, so the daemon maps both to NBD errors in one place.

import type { InvalidReason } from './format.js';

/** What each invalidation reason means, for messages. */
export const INVALID_WHY: Record<InvalidReason, string> = {
  unknown: 'reason not recorded',
  full: 'its exception store filled up',
  'disk-full': 'the file system was full',
  'io-error': 'an I/O error',
  removed: 'it is being removed',
};

export type Errno = 'EIO' | 'ENOSPC' | 'EPERM' | 'EINVAL' | 'EEXIST' | 'ENOENT' | 'EBUSY' | 'EBADF';

export class CowError extends Error {
  constructor(
    readonly id: string,
    readonly code: Errno,
    message: string,
  ) {
    super(message);
    this.name = 'CowError';
  }
}

type Factory<A extends unknown[]> = ((...args: A) => CowError) & { id: string; code: Errno };

function define<A extends unknown[]>(id: string, code: Errno, format: (...args: A) => string): Factory<A> {
  return Object.assign((...args: A) => new CowError(id, code, format(...args)), { id, code });
}

export const CowErrors = {
  invalidName: define('COW_INVALID_NAME', 'EINVAL', (what: string, name: string) => `invalid ${what} name ${JSON.stringify(name)}`),
  nameTaken: define('COW_NAME_TAKEN', 'EEXIST', (name: string) => `${name} already exists`),
  fileExists: define('COW_FILE_EXISTS', 'EEXIST', (path: string) => `${path} exists`),
  unknownOrigin: define('COW_UNKNOWN_ORIGIN', 'ENOENT', (name: string) => `origin ${name} is not attached`),
  unknownSnapshot: define('COW_UNKNOWN_SNAPSHOT', 'ENOENT', (name: string) => `no snapshot ${name}`),
  closed: define('COW_CLOSED', 'EIO', () => 'COW manager is closed'),
  badChunkSize: define('COW_BAD_CHUNK_SIZE', 'EINVAL', (size: number) => `chunk size ${size}: need a power of two from 4 KiB to 1 MiB`),
  originTooLarge: define('COW_ORIGIN_TOO_LARGE', 'EINVAL', () => 'origin has too many chunks'),
  badStore: define('COW_BAD_STORE', 'EIO', (why: string) => `exception store: ${why}`),
  storeOriginSize: define(
    'COW_STORE_ORIGIN_SIZE',
    'EIO',
    (want: number, have: number) => `exception store was made for an origin of ${want} bytes, origin has ${have}`,
  ),
  storeSlotsFull: define('COW_STORE_SLOTS_FULL', 'ENOSPC', (max: number) => `an exception store holds at most ${max} snapshots`),
  snapshotTooSmall: define('COW_SNAPSHOT_TOO_SMALL', 'EINVAL', (chunks: number) => `snapshot size must be at least ${chunks} chunks`),
  snapshotShrink: define('COW_SNAPSHOT_SHRINK', 'EINVAL', () => 'a snapshot cannot shrink'),
  snapshotRemoved: define('COW_SNAPSHOT_REMOVED', 'EIO', (name: string) => `snapshot ${name} was removed`),
  snapshotInvalid: define(
    'COW_SNAPSHOT_INVALID',
    'EIO',
    (name: string, reason?: InvalidReason) => `snapshot ${name} is invalid${reason ? ` (${INVALID_WHY[reason]})` : ''}`,
  ),
  snapshotMerging: define('COW_SNAPSHOT_MERGING', 'EIO', (name: string) => `snapshot ${name} is being merged into its origin`),
  mergeTransient: define(
    'COW_MERGE_TRANSIENT',
    'EINVAL',
    (name: string) =>
      `snapshot ${name} is transient: its exceptions would not survive a crash in the middle of a merge, so it cannot be merged`,
  ),
  mergeInvalid: define(
    'COW_MERGE_INVALID',
    'EINVAL',
    (name: string) => `snapshot ${name} is invalid: it no longer holds its point in time`,
  ),
  mergeReleased: define(
    'COW_MERGE_RELEASED',
    'EINVAL',
    (name: string) => `snapshot ${name} gave chunks up to a backup: it no longer holds its whole point in time, so it cannot be merged`,
  ),
  removeMerging: define(
    'COW_REMOVE_MERGING',
    'EBUSY',
    (name: string) => `snapshot ${name} is being merged into its origin: it goes away by itself once the merge is done`,
  ),
  mergeBusy: define('COW_MERGE_BUSY', 'EBUSY', (origin: string, name: string) => `origin ${origin} is already merging snapshot ${name}`),
  originMerging: define(
    'COW_ORIGIN_MERGING',
    'EBUSY',
    (origin: string, name: string) => `origin ${origin} is merging snapshot ${name}: no snapshot of it can be taken until that is done`,
  ),
  releaseWritable: define(
    'COW_RELEASE_WRITABLE',
    'EINVAL',
    (name: string) => `snapshot ${name} is writable: only a read-only snapshot's chunks can be released to a backup`,
  ),
  snapshotReadOnly: define('COW_SNAPSHOT_READ_ONLY', 'EPERM', (name: string) => `snapshot ${name} is read-only`),
  snapshotFull: define('COW_SNAPSHOT_FULL', 'ENOSPC', (name: string) => `snapshot ${name} is full`),
  snapshotInvalidated: define('COW_SNAPSHOT_INVALIDATED', 'EIO', (name: string) => `snapshot ${name} is full and was invalidated`),
  writeLost: define('COW_WRITE_LOST', 'EIO', (why: string) => `an acknowledged write could not be written: ${why}`),
  deviceClosed: define('COW_DEVICE_CLOSED', 'EBADF', () => 'device closed'),
  punchPath: define('COW_PUNCH_PATH', 'EINVAL', (path: string) => `cannot punch holes in a path with a newline: ${JSON.stringify(path)}`),
  punchHelper: define('COW_PUNCH_HELPER', 'EIO', (why: string) => `cannot start the fallocate helper: ${why}`),
  trackerFailed: define('COW_TRACKER_FAILED', 'EIO', (why: string) => `change tracking failed: ${why}`),
  trackerRange: define('COW_TRACKER_RANGE', 'EINVAL', (from: number, to: number) => `no generations from ${from} to ${to}`),
  punchFailed: define('COW_PUNCH_FAILED', 'EIO', (path: string, why: string) => `fallocate --punch-hole ${path}: ${why}`),
  allocateFailed: define('COW_ALLOCATE_FAILED', 'EIO', (path: string, why: string) => `fallocate ${path}: ${why}`),
  allocateNoSpace: define('COW_ALLOCATE_NO_SPACE', 'ENOSPC', (path: string, why: string) => `fallocate ${path}: ${why}`),
  noSpace: define(
    'COW_NO_SPACE',
    'ENOSPC',
    (what: string, needBytes: number, freeBytes: number) =>
      `${what} needs ${size(needBytes)} reserved on disk and the file system has ${size(freeBytes)} free; free some space, or use --sparse to overcommit`,
  ),
} as const;

/** Bytes as people read them: 1.5 GiB, 40.0 KiB. */
function size(bytes: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} bytes` : `${v.toFixed(1)} ${units[u]}`;
}

/** The file system is full (or the quota reached). */
export function isNoSpace(e: unknown): boolean {
  const code = (e as { code?: string } | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

export function isCowError(e: unknown): e is CowError {
  return e instanceof CowError;
}
