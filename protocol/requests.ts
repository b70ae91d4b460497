// Validation and execution of transmission-phase requests against a Backend.
// Socket-free: it turns a decoded request into an outcome the connection encodes.
import * as C from './constants.js';
import type { Backend, Extent, KeepPayload } from './backend.js';
import { NbdRequestError, ProtocolErrors, toNbdError } from './errors.js';
import type { Logger } from './logger.js';
import type { BufferPool } from './buffer-pool.js';
import type { Request } from './wire.js';

export interface Outcome {
  /** 0 on success, else an NBD error value. */
  error: number;
  message?: string;
  /** Where a read failed, when the backend says so (structured ERROR_OFFSET). */
  errorOffset?: number;
  /** READ data: a pool buffer the connection returns after sending. */
  data?: Buffer;
  /** BLOCK_STATUS with base:allocation alone. */
  extents?: Extent[];
  /** BLOCK_STATUS with other contexts: one entry per negotiated context, in reply order. */
  statuses?: ContextExtents[];
}

/** A meta context granted on a connection, with its per-connection id. */
export interface MetaContext {
  id: number;
  name: string;
}

export interface ContextExtents {
  id: number;
  extents: Extent[];
}

export interface RequestContext {
  backend: Backend;
  structured: boolean;
  baseAllocation: boolean;
  /** Negotiated contexts besides base:allocation; absent or empty keeps block status on its one-context path. */
  contexts?: readonly MetaContext[];
  pool: BufferPool;
  log: Logger;
}

const ALLOWED_FLAGS: Record<number, number> = {
  [C.NBD_CMD_READ]: C.NBD_CMD_FLAG_DF,
  [C.NBD_CMD_WRITE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_FLUSH]: 0,
  [C.NBD_CMD_TRIM]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_CACHE]: 0,
  [C.NBD_CMD_WRITE_ZEROES]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO,
  [C.NBD_CMD_BLOCK_STATUS]: C.NBD_CMD_FLAG_REQ_ONE,
  [C.NBD_CMD_DISC]: 0,
};

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function refuse(error: number, message: string): Outcome {
  return { error, message };
}

/**
 * Checks a request before any work, in nbdkit's order: command, flags,
 * permission, size limit, range. Returns the refusal, or undefined when valid.
 */
export function validate(req: Request, ctx: RequestContext): Outcome | undefined {
  const info = ctx.backend.info;
  const allowed = ALLOWED_FLAGS[req.type];
  if (allowed === undefined) return refuse(C.NBD_EINVAL, `unknown command ${req.type}`);
  if (req.flags & ~allowed) return refuse(C.NBD_EINVAL, `invalid flags 0x${req.flags.toString(16)} for ${C.COMMAND_NAMES[req.type]}`);
  const mutating = req.type === C.NBD_CMD_WRITE || req.type === C.NBD_CMD_TRIM || req.type === C.NBD_CMD_WRITE_ZEROES;
  if (mutating && info.readOnly) return refuse(C.NBD_EPERM, 'export is read-only');
  if (req.type === C.NBD_CMD_FLUSH) {
    if (req.offset !== 0n || req.length !== 0) return refuse(C.NBD_EINVAL, 'flush with non-zero offset or length');
    return undefined;
  }
  if (req.type === C.NBD_CMD_READ || req.type === C.NBD_CMD_WRITE) {
    if (req.length > C.MAX_REQUEST_SIZE) {
      return refuse(ctx.structured ? C.NBD_EOVERFLOW : C.NBD_EINVAL, `request of ${req.length} bytes exceeds ${C.MAX_REQUEST_SIZE}`);
    }
  }
  if (req.type === C.NBD_CMD_BLOCK_STATUS && !ctx.baseAllocation && !ctx.contexts?.length) {
    return refuse(C.NBD_EINVAL, 'block status without a negotiated meta context');
  }
  if (req.type === C.NBD_CMD_WRITE_ZEROES && req.flags & C.NBD_CMD_FLAG_FAST_ZERO && !info.canFastZero) {
    return refuse(C.NBD_ENOTSUP, 'fast zero is not supported');
  }
  if (req.length === 0) return refuse(C.NBD_EINVAL, 'zero-length request');
  if (req.offset > MAX_SAFE || Number(req.offset) + req.length > info.size) {
    const pastEnd = req.type === C.NBD_CMD_WRITE || req.type === C.NBD_CMD_WRITE_ZEROES;
    return refuse(pastEnd ? C.NBD_ENOSPC : C.NBD_EINVAL, `range ${req.offset}+${req.length} is outside the export (${info.size} bytes)`);
  }
  return undefined;
}

/**
 * Validates and runs a request, then calls done: at once for a refusal (its reply goes
 * out before later requests are parsed), else when the backend is done. A pooled
 * payload goes back to the pool then, or later from a backend that kept it.
 */
export function serve(
  req: Request,
  payload: Buffer | undefined,
  pooled: boolean,
  ctx: RequestContext,
  done: (outcome: Outcome) => void,
): void {
  const refused = validate(req, ctx);
  if (refused) {
    ctx.log.debug(
      { command: C.COMMAND_NAMES[req.type] ?? 'unknown', offset: String(req.offset), length: req.length, reason: refused.message },
      'request refused',
    );
    if (pooled) ctx.pool.put(payload!);
    done(refused);
    return;
  }
  // A backend that holds the write past its reply keeps the buffer (no copy of it)
  // and gives it back to the pool once the write has landed.
  let kept = false;
  const keep = pooled
    ? () => {
        kept = true;
        return ctx.pool.keep(payload!);
      }
    : undefined;
  execute(req, payload, ctx, keep).then(
    (outcome) => {
      if (pooled && !kept) ctx.pool.put(payload!);
      done(outcome);
    },
    (err) => done({ error: C.NBD_EIO, message: String(err) }),
  );
}

/** Runs a validated request. Never throws: failures become an Outcome. */
export async function execute(req: Request, payload: Buffer | undefined, ctx: RequestContext, keep?: KeepPayload): Promise<Outcome> {
  const b = ctx.backend;
  const offset = Number(req.offset);
  const fua = (req.flags & C.NBD_CMD_FLAG_FUA) !== 0;
  let data: Buffer | undefined;
  try {
    switch (req.type) {
      case C.NBD_CMD_READ:
        data = ctx.pool.get(req.length);
        await b.pread(data, offset);
        return { error: 0, data };
      case C.NBD_CMD_WRITE:
        await b.pwrite(payload!, offset, fua, keep);
        return { error: 0 };
      case C.NBD_CMD_FLUSH:
        await b.flush();
        return { error: 0 };
      case C.NBD_CMD_TRIM:
        await b.trim(offset, req.length, fua);
        return { error: 0 };
      case C.NBD_CMD_WRITE_ZEROES:
        await b.zero(offset, req.length, {
          fua,
          mayTrim: (req.flags & C.NBD_CMD_FLAG_NO_HOLE) === 0,
          fast: (req.flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0,
        });
        return { error: 0 };
      case C.NBD_CMD_CACHE:
        await b.cache(offset, req.length);
        return { error: 0 };
      case C.NBD_CMD_BLOCK_STATUS: {
        const one = (req.flags & C.NBD_CMD_FLAG_REQ_ONE) !== 0;
        if (!ctx.contexts?.length) return { error: 0, extents: clampExtents(await b.extents(offset, req.length), req.length, one) };
        return { error: 0, statuses: await contextStatuses(ctx, offset, req.length, one) };
      }
      default:
        throw new NbdRequestError(C.NBD_EINVAL, `unknown command ${req.type}`);
    }
  } catch (err) {
    if (data) ctx.pool.put(data);
    const error = toNbdError(err, ctx.log, {
      export: b.info.name,
      command: C.COMMAND_NAMES[req.type] ?? req.type,
      offset,
      length: req.length,
    });
    const at = (err as { offset?: unknown } | null)?.offset;
    return {
      error,
      message: err instanceof Error ? err.message : String(err),
      errorOffset: typeof at === 'number' ? at : undefined,
    };
  }
}

/** Every negotiated context's extents, asked for at once; one failure fails the request. */
async function contextStatuses(ctx: RequestContext, offset: number, length: number, one: boolean): Promise<ContextExtents[]> {
  const b = ctx.backend;
  const asks: Promise<ContextExtents>[] = [];
  if (ctx.baseAllocation) {
    asks.push(b.extents(offset, length).then((e) => ({ id: C.BASE_ALLOCATION_ID, extents: clampExtents(e, length, one) })));
  }
  for (const c of ctx.contexts!) {
    if (!b.contextExtents) throw ProtocolErrors.noContextExtents(c.name);
    asks.push(b.contextExtents(c.name, offset, length).then((e) => ({ id: c.id, extents: clampExtents(e, length, one) })));
  }
  return Promise.all(asks);
}

/** Trims a backend's extent list to the request, merging equal neighbours. */
export function clampExtents(extents: Extent[], length: number, one: boolean): Extent[] {
  const out: Extent[] = [];
  let total = 0;
  for (const e of extents) {
    if (total >= length || e.length <= 0) break;
    const len = Math.min(e.length, length - total);
    const last = out[out.length - 1];
    if (last && last.flags === e.flags) last.length += len;
    else out.push({ length: len, flags: e.flags });
    total += len;
    if (one) break;
  }
  if (out.length === 0) throw ProtocolErrors.noExtents();
  return one ? out.slice(0, 1) : out;
}
