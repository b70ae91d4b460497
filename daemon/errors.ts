// One registry of typed errors with stable codes, in the manner of fastify's.
// The CLI prints `message` and exits non-zero; the control API sends `code`.
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

type Factory<A extends unknown[]> = ((...args: A) => CowbdError) & { code: string };

function define<A extends unknown[]>(code: string, status: number, format: (...args: A) => string): Factory<A> {
  const f = (...args: A) => new CowbdError(code, format(...args), status);
  return Object.assign(f, { code });
}

export const Errors = {
  invalidName: define('COWBD_INVALID_NAME', 400, (name: string) => `invalid name "${name}": use ${NAME_RULE}`),
  invalidSize: define('COWBD_INVALID_SIZE', 400, (text: string, why: string) => `invalid size "${text}": ${why}`),
  nameTaken: define('COWBD_NAME_TAKEN', 409, (name: string) => `name "${name}" is already used by a volume or snapshot`),
  unknownVolume: define('COWBD_UNKNOWN_VOLUME', 404, (name: string) => `no volume named "${name}"`),
  unknownSnapshot: define('COWBD_UNKNOWN_SNAPSHOT', 404, (name: string) => `no snapshot named "${name}"`),
  originBusy: define('COWBD_ORIGIN_BUSY', 409, (name: string, why: string) => `volume "${name}" is busy: ${why}`),
  dataDirLocked: define('COWBD_DATA_DIR_LOCKED', 409, (dir: string, pid: string) =>
    `data directory ${dir} is in use by another cowbd (pid ${pid}); stop it first`),
  badAddress: define('COWBD_BAD_ADDRESS', 400, (text: string) => `invalid address "${text}": expected HOST:PORT`),
} as const;

/** True for any CowbdError, or with `of`, for one made by that factory's code. */
export function isCowbdError(e: unknown, of?: { code: string }): e is CowbdError {
  return e instanceof CowbdError && (!of || e.code === of.code);
}
