// Errors carry an errno-style `code` so the daemon can map them to NBD errors in one place.

export type CowErrorCode = 'EIO' | 'ENOSPC' | 'EPERM' | 'EINVAL' | 'EEXIST' | 'ENOENT' | 'EBUSY';

export class CowError extends Error {
  readonly code: CowErrorCode;
  constructor(code: CowErrorCode, message: string) {
    super(`${code}: ${message}`);
    this.name = 'CowError';
    this.code = code;
  }
}

export const cowError = (code: CowErrorCode, message: string): CowError => new CowError(code, message);
