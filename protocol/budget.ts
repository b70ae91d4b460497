// A byte budget shared by every connection of a server: the write payloads and
// read buffers that requests in flight hold, summed across connections. Each
// connection also has its own cap (ConnectionLimits.maxBytesInFlight); this one
// bounds the total when many clients send at once. A connection that finds the
// budget spent stops reading new requests from its socket (TCP then pushes back
// on the client) and is woken when the budget has room again.
import type { Logger } from './logger.js';

/** At most one "budget reached" warning per this many milliseconds. */
const LOG_INTERVAL_MS = 10_000;

export class ByteBudget {
  private used = 0;
  private peak = 0;
  private readonly waiters = new Set<() => void>();
  private pausesSinceLog = 0;
  private lastLog = -Infinity;

  constructor(
    readonly limit: number,
    private readonly log?: Logger,
  ) {}

  /** Bytes held right now. */
  get inUse(): number {
    return this.used;
  }

  /** Highest inUse seen so far. */
  get highWater(): number {
    return this.peak;
  }

  get exhausted(): boolean {
    return this.used >= this.limit;
  }

  take(n: number): void {
    this.used += n;
    if (this.used > this.peak) this.peak = this.used;
  }

  give(n: number): void {
    this.used -= n;
    if (this.used < this.limit && this.waiters.size > 0) {
      const all = [...this.waiters];
      this.waiters.clear();
      for (const wake of all) wake();
    }
  }

  /** Calls wake once the budget has room again; registering twice is one registration. */
  wait(wake: () => void): void {
    if (this.waiters.has(wake)) return;
    this.waiters.add(wake);
    this.pausesSinceLog++;
    const now = Date.now();
    if (this.log && now - this.lastLog >= LOG_INTERVAL_MS) {
      this.lastLog = now;
      this.log.warn(
        { limit: this.limit, inUse: this.used, connectionsPaused: this.waiters.size, pausesSinceLastWarning: this.pausesSinceLog },
        'total bytes in flight across connections reached the limit; pausing reads until requests finish',
      );
      this.pausesSinceLog = 0;
    }
  }

  /** Forgets a waiter (its connection closed). */
  cancel(wake: () => void): void {
    this.waiters.delete(wake);
  }
}
