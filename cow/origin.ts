// The origin volume: writes go to the volume file after every snapshot that still reads
// the old data has its copy. With no live snapshot it is a plain file: no locks, no
// metadata, one pwrite.
import type { BlockDevice } from './device.js';
import { ZEROS } from './buffer-pool.js';
import type { ExceptionStore } from './store.js';
import { SyncCoalescer } from './sync-coalescer.js';
import type { Volume } from './volume.js';

export class Origin implements Volume {
  readonly state = 'valid' as const;
  readonly size: number;
  readonly stores: ExceptionStore[] = [];
  private readonly syncer: SyncCoalescer;
  /** Set while a snapshot is being created: new writes wait behind it. */
  private gate: Promise<void> | null = null;
  private inflight = 0;
  private drained: (() => void) | null = null;

  constructor(
    readonly name: string,
    readonly dev: BlockDevice,
  ) {
    this.size = dev.size;
    this.syncer = new SyncCoalescer(() => dev.sync());
  }

  private get copying(): ExceptionStore[] | undefined {
    let out: ExceptionStore[] | undefined;
    for (const s of this.stores) if (s.live.length) (out ??= []).push(s);
    return out;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.dev.read(buf, offset);
  }

  private async enter(): Promise<void> {
    while (this.gate) await this.gate;
    this.inflight++;
  }

  private leave(): void {
    if (--this.inflight === 0 && this.drained) this.drained();
  }

  async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    if (this.gate) await this.enter();
    else this.inflight++;
    try {
      const stores = this.copying;
      if (stores) await this.prepare(stores, offset, buf.length);
      await this.dev.write(buf, offset);
      if (fua) await this.syncer.sync();
    } finally {
      this.leave();
    }
  }

  private async prepare(stores: ExceptionStore[], offset: number, length: number): Promise<void> {
    if (stores.length === 1) await stores[0]!.beforeOriginWrite(offset, length);
    else await Promise.all(stores.map((s) => s.beforeOriginWrite(offset, length)));
  }

  flush(): Promise<void> {
    return this.syncer.sync();
  }

  /**
   * Discards only whole chunks that no snapshot reads from the origin any more; the rest
   * is skipped (TRIM is advisory), so no snapshot's view changes and nothing is copied.
   */
  async discard(offset: number, length: number, fua: boolean): Promise<void> {
    if (!this.dev.punchHoles) return;
    await this.enter();
    try {
      const stores = this.copying;
      if (!stores) {
        const a = Math.ceil(offset / 4096) * 4096;
        const b = Math.floor((offset + length) / 4096) * 4096;
        if (b > a) await this.dev.punchHoles([[a, b - a]]);
        if (fua) await this.syncer.sync();
        return;
      }
      const unit = Math.max(...stores.map((s) => s.chunkSize));
      const first = Math.ceil(offset / unit);
      const end = Math.floor((offset + length) / unit);
      const ranges: Array<[number, number]> = [];
      for (let u = first; u < end; u++) {
        if (!stores.every((s) => this.unitDiscardable(s, u * unit, unit))) continue;
        const last = ranges[ranges.length - 1];
        if (last && last[0] + last[1] === u * unit) last[1] += unit;
        else ranges.push([u * unit, unit]);
      }
      if (ranges.length) await this.dev.punchHoles(ranges);
      if (fua) await this.syncer.sync();
    } finally {
      this.leave();
    }
  }

  private unitDiscardable(s: ExceptionStore, offset: number, unit: number): boolean {
    for (let c = offset / s.chunkSize; c < (offset + unit) / s.chunkSize; c++) if (!s.originDiscardable(c)) return false;
    return true;
  }

  /** A write of zeros: snapshots get their copies first, exactly as for write(). */
  async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    await this.enter();
    try {
      const stores = this.copying;
      if (stores) await this.prepare(stores, offset, length);
      for (let at = 0; at < length; at += ZEROS.length) {
        await this.dev.write(ZEROS.subarray(0, Math.min(ZEROS.length, length - at)), offset + at);
      }
      if (fua) await this.syncer.sync();
    } finally {
      this.leave();
    }
  }

  /**
   * Runs fn with the origin quiesced: writes acknowledged before are in the snapshot fn
   * creates, writes after see it. Constant time: nothing is copied, and nothing is
   * synced. An acknowledged write not yet flushed is, as on a disk with a volatile
   * cache, allowed to be lost by a power loss, from the snapshot as from the origin;
   * any chunk copied later carries it durably. Syncing here made creation cost the
   * volume's whole dirty page cache (50-600 ms under load).
   */
  async quiesced<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    try {
      if (this.inflight > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = null;
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  async close(): Promise<void> {
    await this.quiesced(async () => {});
    await this.dev.close();
  }
}
