// The backup repository's one table of errors, in the manner of fastify's errors.js. Each error
// has a stable `code` for callers and logs, and an errno-style `kind` so a CLI or the daemon can
// map it to an exit status or an NBD error without knowing every code.

export type BackupErrno = 'EIO' | 'ENOSPC' | 'EINVAL' | 'EEXIST' | 'ENOENT' | 'EBUSY' | 'ENOTSUP';

export class BackupError extends Error {
  constructor(
    readonly code: string,
    readonly kind: BackupErrno,
    message: string,
  ) {
    super(message);
    this.name = 'BackupError';
  }
}

type Factory<A extends unknown[]> = ((...args: A) => BackupError) & { code: string; kind: BackupErrno };

function define<A extends unknown[]>(code: string, kind: BackupErrno, format: (...args: A) => string): Factory<A> {
  return Object.assign((...args: A) => new BackupError(code, kind, format(...args)), { code, kind });
}

export const BackupErrors = {
  // Opening and creating a repository.
  noRepository: define(
    'COWBD_BACKUP_NO_REPOSITORY',
    'ENOENT',
    (dir: string) => `${dir} is not a backup repository (no config); create one with: cowbd backup init --repo ${dir}`,
  ),
  notEmpty: define('COWBD_BACKUP_NOT_EMPTY', 'EEXIST', (dir: string) => `${dir} is not empty; a new repository needs an empty directory`),
  foreign: define(
    'COWBD_BACKUP_FOREIGN',
    'EINVAL',
    (dir: string, why: string) => `${dir} is not a cowbd backup repository (${why}); refusing to touch it`,
  ),
  newerVersion: define(
    'COWBD_BACKUP_NEWER_VERSION',
    'ENOTSUP',
    (dir: string, found: number, supported: number) =>
      `repository ${dir} has format version ${found}; this cowbd reads version ${supported} at most, upgrade cowbd`,
  ),
  damagedConfig: define('COWBD_BACKUP_DAMAGED_CONFIG', 'EIO', (dir: string, why: string) => `repository ${dir}: config is damaged: ${why}`),
  badLocation: define(
    'COWBD_BACKUP_BAD_LOCATION',
    'EINVAL',
    (location: string, why: string) => `repository location ${location}: ${why}; expected a directory or s3://BUCKET/PREFIX`,
  ),
  storage: define(
    'COWBD_BACKUP_STORAGE',
    'EIO',
    (location: string, op: string, why: string) => `repository ${location}: ${op} failed: ${why}`,
  ),

  // Locks.
  locked: define(
    'COWBD_BACKUP_LOCKED',
    'EBUSY',
    (kind: string, purpose: string, host: string, pid: number, since: string) =>
      `repository is locked (${kind}) by "${purpose}" on ${host}, pid ${pid}, since ${since}`,
  ),
  lockLost: define(
    'COWBD_BACKUP_LOCK_LOST',
    'EBUSY',
    (purpose: string, why: string) =>
      `the repository lock of "${purpose}" was lost (${why}); a prune may have run meanwhile, so nothing was committed`,
  ),

  // Data.
  diskFull: define(
    'COWBD_BACKUP_DISK_FULL',
    'ENOSPC',
    (dir: string) => `repository disk full writing to ${dir}; the partial pack was removed, packs already written are kept`,
  ),
  missingChunk: define('COWBD_BACKUP_MISSING_CHUNK', 'ENOENT', (chunk: string, pack: string) => `chunk ${chunk} is missing: ${pack}`),
  damagedChunk: define(
    'COWBD_BACKUP_DAMAGED_CHUNK',
    'EIO',
    (chunk: string, pack: string, why: string) => `chunk ${chunk} in pack ${pack} is damaged: ${why}`,
  ),
  damagedPack: define('COWBD_BACKUP_DAMAGED_PACK', 'EIO', (pack: string, why: string) => `pack ${pack} is damaged: ${why}`),
  writerClosed: define('COWBD_BACKUP_WRITER_CLOSED', 'EINVAL', () => 'this blob writer has finished or was aborted'),

  // Backups (manifests).
  unknownBackup: define('COWBD_BACKUP_UNKNOWN', 'ENOENT', (id: string) => `no backup ${id}`),
  ambiguousId: define(
    'COWBD_BACKUP_AMBIGUOUS_ID',
    'EINVAL',
    (prefix: string, ids: string[]) => `backup id ${prefix} is ambiguous: ${ids.join(', ')}`,
  ),
  damagedManifest: define('COWBD_BACKUP_DAMAGED_MANIFEST', 'EIO', (id: string, why: string) => `backup ${id} is damaged: ${why}`),
  badManifest: define('COWBD_BACKUP_BAD_MANIFEST', 'EINVAL', (why: string) => `cannot save backup: ${why}`),
  badChunkIndex: define(
    'COWBD_BACKUP_BAD_CHUNK_INDEX',
    'EINVAL',
    (index: number, count: number) => `chunk ${index} is outside 0..${count - 1}`,
  ),

  // Taking and reading the snapshot.
  freezeFailed: define('COWBD_BACKUP_FREEZE_FAILED', 'EINVAL', (mountpoint: string, why: string) => `cannot freeze ${mountpoint}: ${why}`),
  thawFailed: define(
    'COWBD_BACKUP_THAW_FAILED',
    'EIO',
    (mountpoint: string, why: string) => `cannot thaw ${mountpoint}: ${why}; run fsfreeze -u ${mountpoint}`,
  ),
  freezeTimedOut: define(
    'COWBD_BACKUP_FREEZE_TIMED_OUT',
    'EIO',
    (mountpoint: string, ms: number) =>
      `${mountpoint} was thawed by the ${ms / 1000} s bound before the snapshot was taken; the backup was not made (raise --freeze-timeout)`,
  ),
  snapshotInvalidated: define(
    'COWBD_BACKUP_SNAPSHOT_INVALID',
    'EIO',
    (snapshot: string, why: string) =>
      `snapshot ${snapshot} became invalid during the backup: ${why}; nothing was listed, the origin is untouched; retry with a larger --snapshot-size`,
  ),
  wrongOrigin: define(
    'COWBD_BACKUP_WRONG_ORIGIN',
    'EINVAL',
    (snapshot: string, origin: string, named: string) => `snapshot ${snapshot} is of volume ${origin}, not of ${named}`,
  ),
  shortChunk: define(
    'COWBD_BACKUP_SHORT_CHUNK',
    'EIO',
    (chunk: string, index: number, got: number, want: number) =>
      `chunk ${chunk} holds ${got} bytes; chunk ${index} of the volume needs ${want}`,
  ),
  restoreMismatch: define(
    'COWBD_BACKUP_RESTORE_MISMATCH',
    'EIO',
    (offset: number) => `the data read back at byte ${offset} of the target is not what was written: the target is not reliable`,
  ),

  // Encryption. No message ever holds the secret or any key's bytes.
  wrongKey: define(
    'COWBD_BACKUP_WRONG_KEY',
    'EINVAL',
    (repo: string) => `the key does not open repository ${repo}: wrong key or passphrase`,
  ),
  keyRequired: define(
    'COWBD_BACKUP_KEY_REQUIRED',
    'EINVAL',
    (repo: string) =>
      `repository ${repo} is encrypted; give its key with --encryption FILE or the COWBD_BACKUP_PASSPHRASE environment variable`,
  ),
  notEncrypted: define(
    'COWBD_BACKUP_NOT_ENCRYPTED',
    'EINVAL',
    (repo: string) =>
      `repository ${repo} is not encrypted but a key was given; refusing to store in plain what was meant to be encrypted (leave out --encryption and COWBD_BACKUP_PASSPHRASE to use it)`,
  ),
  damagedKey: define('COWBD_BACKUP_DAMAGED_KEY', 'EIO', (keyFile: string, why: string) => `key file ${keyFile} is damaged: ${why}`),
  decryptFailed: define(
    'COWBD_BACKUP_DECRYPT_FAILED',
    'EIO',
    (what: string, why: string) =>
      `${what} cannot be decrypted (${why}): it is damaged, was tampered with, or was written with another key`,
  ),
  badSecret: define('COWBD_BACKUP_BAD_SECRET', 'EINVAL', (source: string, why: string) => `cannot use ${source} as the key: ${why}`),
} as const;

/** True for any BackupError, or with `of`, for one made by that factory's code. */
export function isBackupError(e: unknown, of?: { code: string }): e is BackupError {
  return e instanceof BackupError && (!of || e.code === of.code);
}
