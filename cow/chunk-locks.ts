// Per-chunk exclusive locks. Anything that changes a chunk's exceptions holds its lock
// from the decision to copy until the exception is durable, so concurrent writers to a
// chunk wait for one copy instead of copying twice (dm-snapshot's pending exception).
// Multi-chunk holders lock in ascending order; single-chunk holders never wait while
// holding, so there is no cycle.
export class ChunkLocks {
  private readonly held = new Map<number, Array<() => void>>();

  /** Resolves once the lock is ours; returns undefined when it was free (no allocation on the fast path). */
  acquire(chunk: number): Promise<void> | undefined {
    const q = this.held.get(chunk);
    if (!q) {
      this.held.set(chunk, []);
      return undefined;
    }
    return new Promise<void>((res) => q.push(res));
  }

  release(chunk: number): void {
    const q = this.held.get(chunk);
    if (!q) return;
    const next = q.shift();
    if (next) next();
    else this.held.delete(chunk);
  }

  isLocked(chunk: number): boolean {
    return this.held.has(chunk);
  }
}

/** Counting semaphore: caps copies in flight. */
export class Limiter {
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(private readonly max: number) {}

  acquire(): Promise<void> | undefined {
    if (this.active < this.max) {
      this.active++;
      return undefined;
    }
    return new Promise<void>((res) => this.waiting.push(res));
  }

  release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.active--;
  }

  get inFlight(): number {
    return this.active;
  }
}

/** Counts in-flight operations per key (snapshot reads served from the origin) and lets a writer wait for them. */
export class ReaderTable {
  private readonly counts = new Map<number, number>();
  private waiters: Array<() => void> = [];

  get size(): number {
    return this.counts.size;
  }

  enter(key: number): void {
    this.counts.set(key, (this.counts.get(key) ?? 0) + 1);
  }

  leave(key: number): void {
    const n = (this.counts.get(key) ?? 1) - 1;
    if (n > 0) this.counts.set(key, n);
    else this.counts.delete(key);
    if (this.waiters.length) {
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f();
    }
  }

  /** True while some key in [first, last] has readers. */
  busy(first: number, last: number): boolean {
    if (this.counts.size === 0) return false;
    if (last - first < this.counts.size) {
      for (let k = first; k <= last; k++) if (this.counts.has(k)) return true;
      return false;
    }
    for (const k of this.counts.keys()) if (k >= first && k <= last) return true;
    return false;
  }

  /** Resolves when no key in [first, last] has readers. */
  async waitRange(first: number, last: number): Promise<void> {
    while (this.busy(first, last)) await new Promise<void>((r) => this.waiters.push(r));
  }
}
