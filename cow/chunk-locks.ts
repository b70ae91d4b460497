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

/**
 * Weighted semaphore: caps the chunks copies hold in flight. A copy of a run of chunks
 * weighs its length, so the cap bounds bytes, not runs (docs/tuning.md, MAX_COPY_BYTES).
 */
export class Limiter {
  private active = 0;
  private readonly waiting: Array<{ weight: number; go: () => void }> = [];
  constructor(private readonly max: number) {}

  /** Takes weight units (at most max); resolves in order of arrival once they are free. */
  acquire(weight = 1): Promise<void> | undefined {
    const w = Math.min(weight, this.max);
    if (!this.waiting.length && this.active + w <= this.max) {
      this.active += w;
      return undefined;
    }
    return new Promise<void>((go) => this.waiting.push({ weight: w, go }));
  }

  release(weight = 1): void {
    this.active -= Math.min(weight, this.max);
    while (this.waiting.length && this.active + this.waiting[0]!.weight <= this.max) {
      const next = this.waiting.shift()!;
      this.active += next.weight;
      next.go();
    }
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
