// A store's space set aside on disk, as lvcreate sets a snapshot's extents aside: the
// file keeps allocated every chunk its snapshots may still need (header included), so a
// full file system fails origin writes with ENOSPC instead of costing a snapshot. Space
// is never punched out of a reserved file; what nobody needs is cut off its end
// (reclaim.ts). A sparse store reserves nothing: the thin-pool trade-off.
import type { Allocator } from './allocator.js';
import type { BlockDevice } from './device.js';
import { CowErrors } from './errors.js';

/** Space a creation or an extension has asked for and not yet turned into a snapshot's size. */
export interface Claim {
  readonly chunks: number;
  /** The snapshot now holds the space (or gave up on it): the claim ends. */
  done(): void;
}

export class StoreReservation {
  /** Chunks at the start of the file known to be allocated on disk. */
  private allocated = 0;
  private pending = 0;
  /** Allocations run one at a time: each starts where the last one ended. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly dev: BlockDevice,
    private readonly alloc: Allocator,
    private readonly chunkSize: number,
    /** False for a sparse store, or a device that cannot allocate. */
    readonly enabled: boolean,
    /** Chunks the store's snapshots hold reserved, its header included. */
    private readonly held: () => number,
  ) {}

  /** Chunks the file must keep allocated. */
  get neededChunks(): number {
    return this.enabled ? this.held() + this.pending : 0;
  }

  /** Chunks known allocated (less than needed only when a restart could not re-make it). */
  get allocatedChunks(): number {
    return this.enabled ? Math.min(this.allocated, this.alloc.end) : 0;
  }

  /**
   * Sets aside `chunks` more for a snapshot about to be made or grown; rejects with a
   * COW_NO_SPACE error naming what is needed and free, having changed nothing.
   */
  async claim(chunks: number, what: string): Promise<Claim> {
    this.pending += chunks;
    let ended = false;
    const claim: Claim = {
      chunks,
      done: () => {
        if (ended) return;
        ended = true;
        this.pending -= chunks;
      },
    };
    try {
      await this.ensure(what);
    } catch (e) {
      claim.done();
      throw e;
    }
    return claim;
  }

  /**
   * At open: allocates the whole file up to what its snapshots need, which also fills
   * holes a store written before reservation may have. False when the file system cannot
   * hold it; the store then works as before, short of its promise.
   */
  async restore(): Promise<boolean> {
    if (!this.enabled) return true;
    this.alloc.grow(Math.floor(this.dev.size / this.chunkSize));
    try {
      await this.ensure('the exception store', 0);
      return true;
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOSPC') return false;
      throw e;
    }
  }

  private ensure(what: string, from?: number): Promise<void> {
    const run = this.queue.then(() => this.allocateTo(what, from));
    this.queue = run.catch(() => {});
    return run;
  }

  private async allocateTo(what: string, from = this.allocated): Promise<void> {
    if (!this.enabled || !this.dev.allocate) return;
    const cs = this.chunkSize;
    const want = Math.max(this.neededChunks, from === 0 ? this.alloc.end : 0);
    if (want <= from) return;
    const bytes = (want - from) * cs;
    const free = (await this.dev.freeBytes?.()) ?? Number.POSITIVE_INFINITY;
    if (free < bytes && from >= this.alloc.end) throw CowErrors.noSpace(what, bytes, free);
    try {
      await this.dev.allocate(from * cs, bytes);
    } catch (e) {
      if ((e as { code?: string }).code !== 'ENOSPC') throw e;
      // fallocate may have grown the file part of the way: that part is given back.
      const end = this.alloc.end * cs;
      if (this.dev.size > end && this.dev.truncate) await this.dev.truncate(end);
      throw CowErrors.noSpace(what, bytes, (await this.dev.freeBytes?.()) ?? 0);
    }
    this.alloc.grow(want);
    this.allocated = Math.max(this.allocated, want);
  }

  /** The file was cut to `end` chunks. */
  truncated(end: number): void {
    if (this.allocated > end) this.allocated = end;
  }
}
