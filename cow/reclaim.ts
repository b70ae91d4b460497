// Giving store chunks back: a freed chunk is reused only once no snapshot read can still
// be reading it, and a removed snapshot's chunks are punched out of the file (and the file
// truncated) before they are reused, so a reused chunk never loses data to a late punch.
// A reserved store punches nothing: its freed chunks stay allocated for the snapshots
// left, and only a free tail past what they need is cut off (reservation.ts).
import { REF_LIMBO, type Allocator } from './allocator.js';
import { chunkRanges } from './chunks.js';
import type { BlockDevice } from './device.js';

/** What a reserved store tells its reclaimer. */
export interface KeptSpace {
  readonly enabled: boolean;
  /** Chunks the file must keep. */
  readonly neededChunks: number;
  truncated(end: number): void;
}

export class Reclaimer {
  private storeReads = 0;
  private limbo: number[] = [];
  private reclaiming: Promise<void> | null = null;

  constructor(
    private readonly dev: BlockDevice,
    private readonly alloc: Allocator,
    private readonly chunkSize: number,
    /** A hole punch or truncation failed: the chunks are reused all the same. */
    private readonly onError: (err: unknown) => void,
    private readonly kept?: KeptSpace,
  ) {}

  /** Around every snapshot read of the store: chunks freed meanwhile wait for it. */
  readStarted(): void {
    this.storeReads++;
  }

  readDone(): void {
    if (--this.storeReads === 0 && this.limbo.length) {
      const l = this.limbo;
      this.limbo = [];
      for (const p of l) this.alloc.free(p);
    }
  }

  /** A chunk no snapshot maps any more. */
  free(p: number): void {
    if (this.storeReads > 0) {
      this.alloc.refs[p] = REF_LIMBO;
      this.limbo.push(p);
    } else this.alloc.free(p);
  }

  /** A removed snapshot's chunks: held back from reuse until their holes are punched. */
  release(chunks: number[]): void {
    if (this.kept?.enabled) {
      for (const p of chunks) this.free(p);
      this.trim();
      return;
    }
    for (const p of chunks) this.alloc.refs[p] = REF_LIMBO;
    const prev = this.reclaiming ?? Promise.resolve();
    this.reclaiming = prev.then(() => this.punchAndFree(chunks)).catch((e: unknown) => this.onError(e));
  }

  /** Cuts off the file's free tail past what its snapshots still need. */
  trim(): void {
    const prev = this.reclaiming ?? Promise.resolve();
    this.reclaiming = prev.then(() => this.truncateTail()).catch((e: unknown) => this.onError(e));
  }

  private async punchAndFree(chunks: number[]): Promise<void> {
    const cs = this.chunkSize;
    chunks.sort((a, b) => a - b);
    try {
      if (this.dev.punchHoles) await this.dev.punchHoles(chunkRanges(chunks, cs));
    } finally {
      for (const c of chunks) this.alloc.free(c);
    }
    await this.truncateTail();
  }

  private async truncateTail(): Promise<void> {
    const end = Math.max(this.alloc.usedEnd(), this.kept?.enabled ? this.kept.neededChunks : 0);
    if (end < this.alloc.end && this.dev.truncate) {
      // truncate takes effect before it returns, so shrinking the allocator in the same
      // turn leaves no window for a new chunk past `end` to be cut off.
      const done = this.dev.truncate(end * this.chunkSize);
      this.alloc.shrinkTo(end);
      this.kept?.truncated(end);
      await done;
    }
  }

  /** Resolves once every release has been punched and freed. */
  async idle(): Promise<void> {
    await this.reclaiming;
  }
}
