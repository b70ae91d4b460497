// When a snapshot stops being what it was (dm-snap.c's policy): a full store invalidates
// it, or, under the overflow policy, refuses its own writes with ENOSPC; usage thresholds
// are reported once each as it fills. An invalid mark must be durable before any origin
// write it guards lands, or a restart would bring the snapshot back reading new data.
import { CowErrors } from './errors.js';
import type { ExceptionStore } from './exception-store.js';
import type { InvalidReason } from './format.js';
import type { SnapshotRecord } from './snapshot-record.js';

export interface PolicyEvents {
  /** detail: the error behind an I/O or disk-full invalidation. */
  onInvalidated?(rec: SnapshotRecord, reason: InvalidReason, detail?: string): void;
  onOverflow?(rec: SnapshotRecord): void;
  onUsage?(rec: SnapshotRecord, percent: number): void;
  /** A failure nobody waits for (the overflow mark's slot write). */
  onError?(err: unknown, what: string): void;
}

/** What the policy needs of its pool. */
export interface PolicyPool {
  /** True while rec is the snapshot in its slot (not removed, not replaced). */
  holds(rec: SnapshotRecord): boolean;
  refreshLive(): void;
}

export class SnapshotPolicy {
  /**
   * Invalidated snapshots whose invalid mark is not durable yet. They stay live, so an
   * origin write to a chunk they lack waits for the mark (and fails if the store cannot
   * take it).
   */
  private readonly unmarked = new Set<SnapshotRecord>();
  private readonly thresholds: number[];

  constructor(
    private readonly pool: PolicyPool,
    private readonly store: ExceptionStore,
    private readonly events: PolicyEvents,
    thresholds: number[] = [50, 80, 90, 100],
  ) {
    this.thresholds = [...thresholds].sort((a, b) => a - b);
  }

  /** Still gets copies: valid, or invalid with the mark not yet durable. */
  copiesFor(rec: SnapshotRecord): boolean {
    return rec.live || (this.unmarked.has(rec) && !rec.removing);
  }

  /** In memory at once; callers then make it durable with markInvalid before any origin write it guards. */
  invalidate(rec: SnapshotRecord, reason: InvalidReason, detail?: string): void {
    if (rec.state === 'invalid') return;
    rec.setInvalid(reason);
    this.unmarked.add(rec);
    this.pool.refreshLive();
    this.events.onInvalidated?.(rec, reason, detail);
  }

  /** Invalidated on purpose (before a removal): durable when it resolves. */
  async invalidateDurably(rec: SnapshotRecord): Promise<void> {
    if (rec.state === 'invalid') return;
    rec.setInvalid('removed');
    this.unmarked.add(rec);
    await this.markInvalid([rec]);
  }

  /** Makes the invalid marks of recs durable; rejects when the store cannot take them. */
  async markInvalid(recs: Iterable<SnapshotRecord>): Promise<void> {
    // A snapshot being removed gets its removal instead (a mark written after it would bring the slot back).
    const todo = [...recs].filter((r) => this.unmarked.has(r) && !r.removing);
    if (!todo.length) return;
    await this.store.saveSlots(
      () => todo.filter((r) => !r.removing && this.pool.holds(r)),
      true,
      () => {
        for (const r of todo) this.unmarked.delete(r);
        this.pool.refreshLive();
      },
    );
  }

  /** The slot is gone: nothing is left to mark. */
  forget(rec: SnapshotRecord): void {
    this.unmarked.delete(rec);
  }

  /** A snapshot's own write that does not fit: ENOSPC under the overflow policy, else invalidation. */
  ensureFits(rec: SnapshotRecord, dataDelta: number, entryDelta: number): void {
    if (rec.fits(dataDelta, entryDelta)) return;
    if (rec.policy === 'overflow') {
      if (rec.state === 'valid') {
        rec.state = 'overflow';
        this.events.onOverflow?.(rec);
        this.store.updateSnapshot(rec).catch((e: unknown) => this.events.onError?.(e, 'overflow mark'));
      }
      throw CowErrors.snapshotFull(rec.name);
    }
    this.invalidate(rec, 'full');
    // Origin writes that need the mark wait for it (or retry it).
    this.markInvalid([rec]).catch(() => {});
    throw CowErrors.snapshotInvalidated(rec.name);
  }

  reportUsage(rec: SnapshotRecord): void {
    const pct = (rec.usedChunks / rec.capacityChunks) * 100;
    let hit = 0;
    for (const t of this.thresholds) if (pct >= t && t > rec.reportedPct) hit = t;
    if (hit) {
      rec.reportedPct = hit;
      this.events.onUsage?.(rec, pct);
    }
  }
}
