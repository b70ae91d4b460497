// An exception store that survives restarts, after dm-snap-persistent.c: a header of
// slots (one per snapshot, two alternating copies each), and per snapshot a chain of
// metadata areas that exceptions are appended to, made durable by group commit.
// On-disk format: docs/exception-store.md.
import { AreaLog, type MetaWrite } from './area-log.js';
import { Allocator, REF_META } from './allocator.js';
import { Committer, type Job } from './committer.js';
import type { BlockDevice } from './device.js';
import { CowErrors } from './errors.js';
import { checkGeometry, type CommitListener, type ExceptionBatch, type ExceptionStore, type StoreGeometry } from './exception-store.js';
import {
  HEADER_BYTES,
  MAX_SNAPSHOTS,
  SLOT_BYTES,
  decodePoolHeader,
  encodePoolHeader,
  encodeSlot,
  entriesPerArea,
  headerChunks,
  randomU32,
  slotOffset,
} from './format.js';
import { readMetadata, type LogState } from './store-replay.js';
import type { SnapshotRecord } from './snapshot-record.js';
import { SyncCoalescer } from './sync-coalescer.js';

/** A snapshot's metadata areas in chain order, and the log that appends to the last. */
interface Chain {
  areas: number[];
  log: AreaLog;
}

export class PersistentStore implements ExceptionStore {
  readonly persistent = true;
  readonly entriesPerArea: number;
  readonly alloc: Allocator;
  readonly syncer: SyncCoalescer;
  private readonly committer: Committer;
  private readonly chains = new Array<Chain | undefined>(MAX_SNAPSHOTS);
  private readonly slotSeq = new Float64Array(MAX_SNAPSHOTS);
  /** Created for a snapshot about to be made: the header becomes durable with its slot. */
  private headerUnsynced = false;

  private constructor(
    readonly dev: BlockDevice,
    readonly poolId: number,
    readonly chunkSize: number,
    onCommit: CommitListener,
  ) {
    this.entriesPerArea = entriesPerArea(chunkSize);
    this.alloc = new Allocator(headerChunks(chunkSize));
    this.alloc.markUsed(headerChunks(chunkSize) - 1, 255);
    this.syncer = new SyncCoalescer(() => dev.sync());
    this.committer = new Committer({ write: (b, o) => dev.write(b, o), sync: () => this.syncer.sync() }, onCommit);
  }

  /**
   * A new store on an empty device: the header is durable when this resolves, unless
   * firstSnapshot says a snapshot is created next: then its slot and the header become
   * durable together, with one sync instead of two. A crash between leaves no header (an
   * unfinished store, removed on open) or a store that opens, with or without the
   * snapshot not yet acknowledged.
   */
  static async create(dev: BlockDevice, g: StoreGeometry, onCommit: CommitListener, firstSnapshot = false): Promise<PersistentStore> {
    checkGeometry(g);
    const store = new PersistentStore(dev, randomU32(), g.chunkSize, onCommit);
    // Slots are zero (never used) until written; the header is written last so a torn
    // creation reads as no store at all. An empty device already reads as zeros, so then
    // the header, one sector, is the only write and one sync does (docs/tuning.md,
    // PersistentStore.create).
    if (dev.size > 0) {
      await dev.write(Buffer.alloc(HEADER_BYTES - SLOT_BYTES), SLOT_BYTES);
      await dev.sync();
    }
    await dev.write(
      encodePoolHeader({ chunkSize: g.chunkSize, poolId: store.poolId, originSize: g.originSize, originName: g.originName }),
      0,
    );
    if (firstSnapshot) store.headerUnsynced = true;
    else await dev.sync();
    return store;
  }

  /**
   * True for a file whose creation never finished: the header becomes durable last (or
   * with the first snapshot's slot, before that snapshot is acknowledged), so a file
   * without one holds no acknowledged snapshot.
   */
  static async unfinished(dev: BlockDevice): Promise<boolean> {
    if (dev.size < SLOT_BYTES) return true;
    const head = Buffer.alloc(SLOT_BYTES);
    await dev.read(head, 0);
    return head.every((b) => b === 0);
  }

  /** Opens a store and replays its snapshots, which come back in slot order. */
  static async open(
    dev: BlockDevice,
    originSize: number,
    onCommit: CommitListener,
  ): Promise<{ store: PersistentStore; records: SnapshotRecord[] }> {
    const head = Buffer.alloc(HEADER_BYTES);
    await dev.read(head, 0);
    const ph = decodePoolHeader(head.subarray(0, SLOT_BYTES));
    if (typeof ph === 'string') throw CowErrors.badStore(ph);
    if (originSize !== ph.originSize) throw CowErrors.storeOriginSize(ph.originSize, originSize);
    const store = new PersistentStore(dev, ph.poolId, ph.chunkSize, onCommit);
    const replayed = await readMetadata(dev, head, ph.poolId, ph.chunkSize, store.alloc);
    store.slotSeq.set(replayed.slotSeq);
    for (const { rec, areas, tail } of replayed.snapshots) store.chains[rec.slot] = store.newChain(rec, areas, tail);
    if (replayed.fixups.length) {
      for (const w of replayed.fixups) await dev.write(w.buf, w.offset);
      await dev.sync();
    }
    return { store, records: replayed.snapshots.map((s) => s.rec) };
  }

  private newChain(rec: SnapshotRecord, areas: number[], state: LogState): Chain {
    const log = new AreaLog(
      this.chunkSize,
      this.poolId,
      rec.snapId,
      () => this.alloc.allocOne(REF_META),
      (c) => areas.push(c),
      state,
    );
    return { areas, log };
  }

  private slotWrite(rec: SnapshotRecord, inUse: boolean, out: MetaWrite[]): void {
    const seq = ++this.slotSeq[rec.slot]!;
    out.push({
      offset: slotOffset(rec.slot, seq % 2),
      buf: encodeSlot({
        seq,
        snapId: rec.snapId,
        inUse,
        state: rec.state,
        policy: rec.policy,
        readOnly: rec.readOnly,
        capacityChunks: rec.capacityChunks,
        firstArea: this.chains[rec.slot]?.areas[0] ?? 0,
        createdAt: rec.createdAt,
        name: rec.name,
        invalidReason: rec.invalidReason,
        usedAtInvalidation: rec.usedAtInvalidation,
      }),
    });
  }

  private slotJob(recs: () => Iterable<SnapshotRecord>, inUse: boolean, apply: () => void): Job {
    return {
      dataSync: false,
      exceptions: 0,
      encode: (out) => {
        for (const r of recs()) this.slotWrite(r, inUse, out);
      },
      apply,
    };
  }

  /**
   * The slot is made durable on its own (O_DSYNC) instead of in the group commit, whose
   * sync under load writes back every copy in flight (docs/tuning.md,
   * PersistentStore.addSnapshot). It may skip the commit order: nothing else writes a slot not yet
   * live, and it names only its empty first area. The first snapshot of a new store goes
   * out with plain writes and one sync, which also makes the header durable.
   */
  async addSnapshot(rec: SnapshotRecord): Promise<void> {
    const first = this.alloc.allocOne(REF_META);
    this.chains[rec.slot] = this.newChain(rec, [first], { area: first, seq: 0, nonce: 0, count: 0, next: this.alloc.allocOne(REF_META) });
    const header = this.headerUnsynced;
    if (!header && (!this.dev.writeDurable || this.committer.failed !== undefined)) {
      return this.committer.submit(
        this.slotJob(
          () => [rec],
          true,
          () => {},
        ),
      );
    }
    const out: MetaWrite[] = [];
    this.slotWrite(rec, true, out);
    for (const w of out) await (header ? this.dev.write(w.buf, w.offset) : this.dev.writeDurable!(w.buf, w.offset));
    if (header) {
      await this.dev.sync();
      this.headerUnsynced = false;
    }
  }

  updateSnapshot(rec: SnapshotRecord): Promise<void> {
    return this.committer.submit(
      this.slotJob(
        () => [rec],
        true,
        () => {},
      ),
    );
  }

  /**
   * Through the committer or, once it has failed (a sync error or a full file system
   * poisons it for good), written and synced directly: slots lie in the header, written
   * in full at creation, so a store on a full file system still takes them.
   */
  async saveSlots(recs: () => Iterable<SnapshotRecord>, inUse: boolean, apply: () => void): Promise<void> {
    const job = this.slotJob(recs, inUse, apply);
    if (this.committer.failed === undefined) {
      try {
        return await this.committer.submit(job);
      } catch (e) {
        if (this.committer.failed === undefined) throw e;
      }
    }
    const out: MetaWrite[] = [];
    job.encode(out);
    for (const w of out) await this.dev.write(w.buf, w.offset);
    await this.dev.sync();
    job.apply();
  }

  commit(batch: ExceptionBatch): Promise<void> {
    return this.committer.submit({
      dataSync: batch.dataSync,
      exceptions: batch.count,
      encode: (out) => {
        const logs = new Set<AreaLog>();
        batch.forEach((rec, chunk, phys) => {
          const log = this.chains[rec.slot]!.log;
          log.append(chunk, phys, out);
          logs.add(log);
        });
        for (const l of logs) l.finish(out);
      },
      apply: () => batch.apply(),
    });
  }

  dropSnapshot(rec: SnapshotRecord): number[] {
    const chain = this.chains[rec.slot];
    this.chains[rec.slot] = undefined;
    return chain ? [...chain.areas, chain.log.next] : [];
  }

  sync(): Promise<void> {
    return this.syncer.sync();
  }

  idle(): Promise<void> {
    return this.committer.idle();
  }

  close(): Promise<void> {
    return this.dev.close();
  }
}
