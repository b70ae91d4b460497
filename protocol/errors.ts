// The protocol layer's errors: its own table (ProtocolErrors), and the one place
// where errors from storage become NBD error values.
import { NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN } from './constants.js';
import type { Logger } from './logger.js';

const BY_CODE: Record<string, number> = {
  EPERM: NBD_EPERM,
  EACCES: NBD_EPERM,
  EROFS: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

export const NBD_ERROR_NAMES: Record<number, string> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

/** An error a request handler raises on purpose, with its NBD value already chosen. */
export class NbdRequestError extends Error {
  constructor(
    readonly nbdError: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdRequestError';
  }
}

/** A fault the protocol layer finds itself, with a stable `id` and an errno-style `code` (as cow/errors.ts). */
export class ProtocolError extends Error {
  constructor(
    readonly id: string,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'ProtocolError';
  }
}

function define<A extends unknown[]>(id: string, code: string, format: (...args: A) => string) {
  return Object.assign((...args: A) => new ProtocolError(id, code, format(...args)), { id, code });
}

/** The protocol layer's own errors; toNbdError maps them by code like any other. */
export const ProtocolErrors = {
  noExtents: define('NBD_NO_EXTENTS', 'EIO', () => 'backend returned no extents'),
  // Faults the client (client.ts) meets; a server's error reply is an NbdClientError instead.
  clientNotNbd: define('NBD_CLIENT_NOT_NBD', 'EPROTO', (why: string) => `not a fixed-newstyle NBD server: ${why}`),
  clientOptionRefused: define(
    'NBD_CLIENT_OPTION_REFUSED',
    'EPROTO',
    (option: string, reply: string, message: string) => `${option} refused with ${reply}${message ? `: ${message}` : ''}`,
  ),
  clientUnknownExport: define(
    'NBD_CLIENT_UNKNOWN_EXPORT',
    'ENOENT',
    (name: string, message: string) => `the server has no export "${name}"${message ? `: ${message}` : ''}`,
  ),
  clientAccessDenied: define(
    'NBD_CLIENT_ACCESS_DENIED',
    'EACCES',
    (option: string, reply: string, message: string) => `${option} refused with ${reply}${message ? `: ${message}` : ''}`,
  ),
  clientNoStructuredReplies: define(
    'NBD_CLIENT_NO_STRUCTURED_REPLIES',
    'ENOTSUP',
    () => 'the server does not do structured replies, which meta contexts need',
  ),
  clientBadReply: define('NBD_CLIENT_BAD_REPLY', 'EPROTO', (why: string) => `malformed reply from the server: ${why}`),
  clientClosed: define('NBD_CLIENT_CLOSED', 'ECONNRESET', (why: string) => `NBD connection lost: ${why}`),
  clientTimeout: define('NBD_CLIENT_TIMEOUT', 'ETIMEDOUT', (ms: number) => `NBD connect and handshake took over ${ms} ms`),
  clientTooLarge: define('NBD_CLIENT_TOO_LARGE', 'EINVAL', (length: number, max: number) => `request of ${length} bytes exceeds ${max}`),
  clientNoContext: define('NBD_CLIENT_NO_CONTEXT', 'EINVAL', () => 'block status needs a meta context the server granted'),
  noContextExtents: define('NBD_NO_CONTEXT_EXTENTS', 'EIO', (context: string) => `backend offers no extents for meta context "${context}"`),
} as const;

/** An error reply from an NBD server to one request (client.ts); `code` is its errno name ('EIO', 'ENOSPC', ...). */
export class NbdClientError extends Error {
  readonly code: string;
  constructor(
    readonly errno: number,
    what: string,
    detail = '',
  ) {
    const code = NBD_ERROR_NAMES[errno] ?? 'EIO';
    super(`${what}: ${code}${detail ? ` (${detail})` : ''}`);
    this.name = 'NbdClientError';
    this.code = code;
  }
}

/**
 * Maps any thrown value to an NBD error after logging the real error.
 * Expected refusals (EPERM, ENOSPC, ...) log at debug, unless the operating system
 * raised them (a full or read-only file system: warn); EIO and unknown errors, which
 * become EIO, log at error.
 */
export function toNbdError(err: unknown, log: Logger, context: Record<string, unknown>): number {
  if (err instanceof NbdRequestError) {
    log.debug({ ...context, reason: err.message }, 'request refused');
    return err.nbdError;
  }
  const code = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  const mapped = typeof code === 'string' ? BY_CODE[code] : undefined;
  const value = mapped ?? NBD_EIO;
  const fromOs = typeof err === 'object' && err !== null && typeof (err as { syscall?: unknown }).syscall === 'string';
  const level = value === NBD_EIO || mapped === undefined ? 'error' : fromOs ? 'warn' : 'debug';
  log[level]({ ...context, err }, 'request failed');
  return value;
}
