// What a connection is given besides its socket: the bounds it keeps to and the observer
// told of its requests (metrics). server.ts merges the limits with its own.
import type { ByteBudget } from './budget.js';
import type { Connection } from './connection.js';

export interface RequestObserver {
  connectionOpened?(conn: Connection): void;
  connectionClosed?(conn: Connection): void;
  requestStarted?(exportName: string, command: string): void;
  /** result is 'ok' or the NBD error name. */
  requestDone?(exportName: string, command: string, result: string, bytes: number, seconds: number): void;
}

export interface ConnectionLimits {
  /** Requests being served at once before we stop reading from the socket. */
  maxInFlight: number;
  /** Payload and read-buffer bytes held at once before we stop reading. */
  maxBytesInFlight: number;
  /** Unsent reply bytes queued in the socket before we stop reading. */
  maxWriteBuffer: number;
  /**
   * Batches of replies at least this big are written to a plain socket from the threadpool,
   * off the event loop (threadpool-sender.ts); 0 sends everything from the event loop.
   */
  threadpoolSendBytes: number;
  /**
   * A connection whose read replies have not moved for this long while some wait unsent is
   * closed (a client that stopped reading); 0 never closes one for that.
   */
  replyTimeoutMs: number;
  /** A client must finish option haggling within this time. */
  handshakeTimeoutMs: number;
  /** Bytes in flight summed over every connection sharing it; reading pauses while it is spent. */
  budget?: ByteBudget;
}

/** See docs/tuning.md, THREADPOOL_SEND_BYTES. */
export const THREADPOOL_SEND_BYTES = 128 * 1024;

export const DEFAULT_LIMITS: ConnectionLimits = {
  maxInFlight: 128,
  maxBytesInFlight: 256 * 1024 * 1024,
  maxWriteBuffer: 16 * 1024 * 1024,
  threadpoolSendBytes: THREADPOOL_SEND_BYTES,
  replyTimeoutMs: 0,
  handshakeTimeoutMs: 30_000,
};
