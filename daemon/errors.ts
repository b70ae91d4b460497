// One registry of typed errors with stable codes, in the manner of fastify's.
// The CLI prints `message` and exits non-zero; the control API sends `code`.
import { NBD_ENOTSUP } from '../protocol/constants.js';
import { NbdRequestError } from '../protocol/errors.js';
import { NAME_RULE } from '../cow/names.js';

export class CowbdError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly statusCode = 400,
  ) {
    super(message);
    this.name = 'CowbdError';
  }
}

type Factory<A extends unknown[]> = ((...args: A) => CowbdError) & { code: string; statusCode: number };

function define<A extends unknown[]>(code: string, status: number, format: (...args: A) => string): Factory<A> {
  const f = (...args: A) => new CowbdError(code, format(...args), status);
  return Object.assign(f, { code, statusCode: status });
}

/** An NBD request refused on purpose: protocol/ replies with the chosen NBD error as is. */
function refusal<A extends unknown[]>(nbdError: number, format: (...args: A) => string) {
  return Object.assign((...args: A) => new NbdRequestError(nbdError, format(...args)), { nbdError });
}

export const Errors = {
  // Names, sizes and the objects they name.
  invalidName: define('COWBD_INVALID_NAME', 400, (name: string) => `invalid name "${name}": use ${NAME_RULE}`),
  invalidSize: define('COWBD_INVALID_SIZE', 400, (text: string, why: string) => `invalid size "${text}": ${why}`),
  invalidDuration: define(
    'COWBD_INVALID_DURATION',
    400,
    (flag: string, text: string) =>
      `invalid ${flag} "${text}": expected a number with an optional s, m, h or d suffix (seconds by default)`,
  ),
  cannotShrink: define('COWBD_INVALID_SIZE', 400, (name: string, size: string) => `snapshot ${name} is ${size}; it can only grow`),
  nameTaken: define('COWBD_NAME_TAKEN', 409, (name: string) => `name "${name}" is already used by a volume or snapshot`),
  unknownVolume: define('COWBD_UNKNOWN_VOLUME', 404, (name: string) => `no volume named "${name}"`),
  unknownSnapshot: define('COWBD_UNKNOWN_SNAPSHOT', 404, (name: string) => `no snapshot named "${name}"`),
  originBusy: define('COWBD_ORIGIN_BUSY', 409, (name: string, why: string) => `volume "${name}" is busy: ${why}`),
  readOnly: define('COWBD_READ_ONLY', 409, () => 'the daemon serves read-only; volumes cannot be created'),
  /** The engine refused the request as given (a bad chunk size, no room for another snapshot). */
  invalidRequest: define('COWBD_INVALID_REQUEST', 400, (why: string) => why),
  noSpace: define('COWBD_NO_SPACE', 507, (why: string) => why),

  // Merging a snapshot back into its origin.
  /** The engine refuses to merge this snapshot at all (transient, invalid, released to a backup). */
  mergeRefused: define('COWBD_MERGE_REFUSED', 400, (why: string) => why),
  /** A merge runs or waits on this origin or snapshot; the request conflicts with it. */
  merging: define('COWBD_MERGING', 409, (why: string) => why),
  mergePending: define(
    'COWBD_MERGING',
    409,
    (origin: string, snapshot: string) =>
      `a merge of snapshot ${snapshot} into ${origin} is already pending; it starts when ${origin}'s last NBD client disconnects`,
  ),
  mergeDeferred: define(
    'COWBD_MERGE_DEFERRED',
    409,
    (origin: string, clients: number) =>
      `volume ${origin} has ${clients} NBD client${clients === 1 ? '' : 's'} connected: --now merges only when none is; disconnect ${clients === 1 ? 'it' : 'them'}, or leave out --now to merge when the last one disconnects`,
  ),
  volumeNoSpace: define(
    'COWBD_NO_SPACE',
    507,
    (name: string, needed: string, free: string) =>
      `volume ${name} needs ${needed} allocated on disk and the file system has ${free} free; free some space, or create it without --preallocate`,
  ),

  // Starting the daemon: options, config file, TLS, data directory.
  dataDirLocked: define(
    'COWBD_DATA_DIR_LOCKED',
    409,
    (dir: string, pid: string) => `data directory ${dir} is in use by another cowbd (pid ${pid}); stop it first`,
  ),
  badAddress: define('COWBD_BAD_ADDRESS', 400, (text: string) => `invalid address "${text}": expected HOST:PORT`),
  negativeOption: define('COWBD_BAD_OPTION', 400, (what: string) => `${what} must be a non-negative number`),
  badConfig: define('COWBD_BAD_CONFIG', 400, (why: string) => why),
  badExports: define('COWBD_BAD_CONFIG', 400, (why: string) => `exports: ${why}`),
  badTls: define('COWBD_BAD_TLS', 400, (why: string) => why),

  // The control API, server side.
  noRoute: define('COWBD_NOT_FOUND', 404, (method: string, path: string) => `no route ${method} ${path}`),
  badEscape: define('COWBD_BAD_REQUEST', 400, (raw: string) => `malformed escape in "${raw}"`),
  bodyTooLarge: define('COWBD_BAD_REQUEST', 413, () => 'request body too large'),
  bodyNotObject: define('COWBD_BAD_REQUEST', 400, () => 'request body must be a JSON object'),
  missingField: define('COWBD_BAD_REQUEST', 400, (key: string) => `missing "${key}"`),
  notString: define('COWBD_BAD_REQUEST', 400, (key: string) => `"${key}" must be a string`),
  notStrings: define('COWBD_BAD_REQUEST', 400, (key: string) => `"${key}" must be a list of strings`),
  badRanges: define('COWBD_BAD_REQUEST', 400, () => '"ranges" must be a list of [offset, length] pairs of non-negative integers'),
  notBoolean: define('COWBD_BAD_REQUEST', 400, (key: string) => `"${key}" must be true or false`),
  badPolicy: define('COWBD_BAD_REQUEST', 400, (policy: string) => `policy must be invalidate or overflow, not "${policy}"`),
  internal: define('COWBD_INTERNAL', 500, (why: string) => why),

  // The control API, client side.
  noDaemon: define(
    'COWBD_NO_DAEMON',
    503,
    (dataDir: string) => `no cowbd daemon is running on ${dataDir} (start one with: cowbd serve --data-dir ${dataDir})`,
  ),
  badReply: define('COWBD_BAD_REPLY', 502, (status?: number) => `daemon sent a non-JSON reply (HTTP ${status})`),
  /** The daemon's error sent back: its code is whatever that daemon sent, so it is not one of this table's. */
  fromReply: (code: string | undefined, message: string | undefined, status: number | undefined): CowbdError =>
    new CowbdError(code ?? 'COWBD_ERROR', message ?? `HTTP ${status}`, status),

  // NBD requests.
  zeroNotFast: refusal(NBD_ENOTSUP, () => 'zeroing is not fast here'),
} as const;

/** True for any CowbdError, or with `of`, for one made by that factory's code. */
export function isCowbdError(e: unknown, of?: { code: string }): e is CowbdError {
  return e instanceof CowbdError && (!of || e.code === of.code);
}
