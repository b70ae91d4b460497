// The storage side of an export, as the protocol layer sees it: a table of
// operations with capability flags, in the manner of nbdkit's plugin API.
// protocol/ never touches files; daemon/ supplies these.
import type { ClientInfo } from './tls.js';

/** NBD_STATE_* bits for the base:allocation meta context. */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;

export interface Extent {
  length: number;
  /** STATE_HOLE | STATE_ZERO bits. */
  flags: number;
}

export interface ExportInfo {
  name: string;
  description: string;
  /** Size in bytes; always a safe integer (checked by the daemon). */
  size: number;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canZero: boolean;
  canFastZero: boolean;
  canCache: boolean;
  canMultiConn: boolean;
}

/** Every capability on: an export spreads this and turns off what it lacks. */
export const ALL_CAPABILITIES = {
  canFlush: true,
  canFua: true,
  canTrim: true,
  canZero: true,
  canFastZero: true,
  canCache: true,
  canMultiConn: true,
} as const satisfies Partial<ExportInfo>;

export interface ZeroFlags {
  fua: boolean;
  /** NBD_CMD_FLAG_NO_HOLE not set: the backend may deallocate. */
  mayTrim: boolean;
  /** NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than be slow. */
  fast: boolean;
}

/**
 * Offered to pwrite with a pooled payload: calling it takes the buffer over past the
 * reply (a write held in memory until it lands), and the function it returns gives
 * the buffer back once nothing reads it any more. Not called: the buffer is the
 * connection's again when pwrite settles.
 */
export type KeepPayload = () => () => void;

/**
 * One open export. Ranges are already validated against `info.size` by the
 * protocol layer. Failures are thrown as errors carrying an errno `code`
 * ("EIO", "ENOSPC", "EPERM", ...), mapped to NBD errors in one place.
 */
export interface Backend {
  readonly info: ExportInfo;
  pread(buf: Buffer, offset: number): Promise<void>;
  pwrite(buf: Buffer, offset: number, fua: boolean, keep?: KeepPayload): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  cache(offset: number, length: number): Promise<void>;
  /** base:allocation extents covering at least the start of the range. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** Meta contexts besides base:allocation that a query selects: an exact name, or a namespace prefix such as 'cowbd:' (every context of it, for listing). */
  metaContexts?(query: string): string[];
  /** Extents of a negotiated context other than base:allocation, covering at least the start of the range; flags are the context's own bits. */
  contextExtents?(context: string, offset: number, length: number): Promise<Extent[]>;
  /** Called when a connection using this backend ends. */
  release?(): void;
  /** Set by the registry: fired when the export goes away, so sessions close cleanly. */
  onGone?(listener: () => Promise<void> | void): () => void;
}

/** The set of exports a server offers. */
export interface ExportRegistry {
  list(): ExportInfo[];
  /** '' selects the default export. Returns undefined for an unknown name. */
  info(name: string): ExportInfo | undefined;
  open(name: string): Backend | undefined;
  /**
   * The meta contexts besides base:allocation that `query` selects on an export (by its
   * real name); '' selects every one. Absent: base:allocation is the only context.
   */
  metaContexts?(exportName: string, query: string): string[];
  /**
   * Checked at NBD_OPT_GO and NBD_OPT_EXPORT_NAME, by the export's real name: a
   * reason to refuse this connection now (NBD_REP_ERR_POLICY; a hang-up for
   * EXPORT_NAME, which has no error reply), e.g. the per-export connection limit.
   * Absent or undefined: admitted.
   */
  admit?(exportName: string): string | undefined;
  /**
   * May this client use the export (by its real name, never '')? A refused export
   * is left out of NBD_OPT_LIST and gets NBD_REP_ERR_POLICY. Absent: all may.
   */
  authorize?(exportName: string, client: ClientInfo): boolean;
}
