// The exception store shared by every snapshot of one origin that has the same chunk
// size. An origin write copies a chunk once and every snapshot lacking that chunk maps
// the copy (reference counted); each snapshot is still charged one chunk for it, so
// its bounded size reads exactly as if it had a store of its own. See docs/cow-design.md.
import type { BlockDevice } from './device.js';
import { ABSENT } from './chunk-map.js';
import { AreaLog, type MetaWrite } from './area-log.js';
import { Allocator, REF_LIMBO, REF_META } from './allocator.js';
import { copyBuffers, ZEROS } from './buffer-pool.js';
import { ChunkLocks, Limiter, ReaderTable } from './chunk-locks.js';
import { Committer, type Job } from './committer.js';
import { CowErrors } from './errors.js';
import {
  AREA_HEADER_BYTES,
  ENTRY_BYTES,
  HEADER_BYTES,
  MAX_SNAPSHOTS,
  META_BLOCK,
  SLOT_BYTES,
  ZERO_CHUNK,
  decodeAreaHeader,
  decodePoolHeader,
  decodeSlot,
  encodePoolHeader,
  encodeSlot,
  entriesPerArea,
  entryCheck,
  headerChunks,
  randomU32,
  slotOffset,
  validChunkSize,
  type OverflowPolicy,
  type SlotRecord,
} from './format.js';
import { SnapshotRecord } from './snapshot-record.js';
import { SyncCoalescer } from './sync-coalescer.js';

export interface StoreEvents {
  onCommit?(seconds: number, exceptions: number): void;
  onCopy?(chunks: number, bytes: number): void;
  onInvalidated?(rec: SnapshotRecord, reason: string): void;
  onOverflow?(rec: SnapshotRecord): void;
  onUsage?(rec: SnapshotRecord, percent: number): void;
}

export interface StoreOptions {
  chunkSize: number;
  originSize: number;
  originName: string;
  events?: StoreEvents;
  /** Usage percentages that raise onUsage once each as a snapshot fills. */
  usageThresholds?: number[];
  /** Chunks copies hold in flight per store (default: 16 MiB of chunks, at least 16). */
  maxCopies?: number;
}

/** What snapshots read of the origin: the file plus writes held from before their creation. */
export interface OriginView {
  /** Snapshots created now get this epoch (Origin bumps it while quiesced). */
  readonly epoch: number;
  readAsOf(buf: Buffer, offset: number, epoch: number): Promise<void>;
}

export interface NewSnapshot {
  name: string;
  capacityChunks: number;
  policy: OverflowPolicy;
  readOnly: boolean;
}

type LogState = ConstructorParameters<typeof AreaLog>[5];

/** Longest run of chunks copied with one read and one write. */
const MAX_RUN_BYTES = 1 << 20;
/** Bytes of chunk copies in flight per store, unless StoreOptions.maxCopies says otherwise. */
const MAX_COPY_BYTES = 16 << 20;

export class ExceptionStore {
  readonly chunkSize: number;
  readonly transient: boolean;
  /** Created for a snapshot about to be made: the header becomes durable with its slot. */
  private headerUnsynced = false;
  readonly records: Array<SnapshotRecord | undefined> = new Array<SnapshotRecord | undefined>(MAX_SNAPSHOTS);
  /** Snapshots that still need copies, kept as an array for the per-chunk hot loop. */
  live: SnapshotRecord[] = [];
  readonly stats = { copies: 0, bytesCopied: 0, exceptions: 0, commits: 0, commitSeconds: 0 };
  private readonly alloc: Allocator;
  private readonly locks = new ChunkLocks();
  private readonly originReaders = new ReaderTable();
  private readonly copies: Limiter;
  private readonly bufs = copyBuffers;
  private readonly committer: Committer;
  readonly syncer: SyncCoalescer;
  private readonly slotSeq = new Float64Array(MAX_SNAPSHOTS);
  private readonly thresholds: number[];
  private storeReads = 0;
  private limbo: number[] = [];
  private reclaiming: Promise<void> | null = null;
  private readonly events: StoreEvents;
  /**
   * Invalidated snapshots whose invalid mark is not durable yet. They stay in `live`, so
   * an origin write to a chunk they lack a copy of waits for the mark (and fails if the
   * store cannot take it): landing first would let a restart bring the snapshot back
   * valid, reading the origin's new data.
   */
  private readonly unmarked = new Set<SnapshotRecord>();
  /** Set by Origin.attach; without it snapshots read the origin device directly. */
  view: OriginView | undefined;

  private constructor(
    readonly dev: BlockDevice,
    readonly origin: BlockDevice,
    readonly poolId: number,
    opts: StoreOptions,
    transient: boolean,
  ) {
    this.chunkSize = opts.chunkSize;
    this.transient = transient;
    this.events = opts.events ?? {};
    this.thresholds = [...(opts.usageThresholds ?? [50, 80, 90, 100])].sort((a, b) => a - b);
    // In bytes, not chunks: a group commit syncs what is in flight, and 8 queued 1 MiB
    // writes need 128 copies of 64 KiB; a cap of 64 halved the batch (seq first writes
    // 210-224 -> 242-265 MiB/s at 256).
    this.copies = new Limiter(opts.maxCopies ?? Math.max(16, Math.floor(MAX_COPY_BYTES / this.chunkSize)));
    this.alloc = new Allocator(headerChunks(this.chunkSize));
    this.syncer = new SyncCoalescer(() => dev.sync());
    this.committer = new Committer(
      transient ? undefined : { write: (b, o) => dev.write(b, o), sync: () => this.syncer.sync() },
      (seconds, exceptions) => {
        this.stats.commits++;
        this.stats.commitSeconds += seconds;
        this.stats.exceptions += exceptions;
        this.events.onCommit?.(seconds, exceptions);
      },
    );
  }

  static checkOptions(opts: StoreOptions): void {
    if (!validChunkSize(opts.chunkSize)) throw CowErrors.badChunkSize(opts.chunkSize);
    if (Math.ceil(opts.originSize / opts.chunkSize) >= 0xffffffff) throw CowErrors.originTooLarge();
  }

  /**
   * A new persistent store on an empty device: the header is durable when this resolves,
   * unless firstSnapshot says a snapshot is created next: then its slot and the header
   * become durable together, with one sync instead of two (creating a snapshot with its
   * store). A crash between leaves no header (an unfinished store, removed on open) or a
   * store that opens, with or without the snapshot not yet acknowledged.
   */
  static async create(dev: BlockDevice, origin: BlockDevice, opts: StoreOptions, firstSnapshot = false): Promise<ExceptionStore> {
    ExceptionStore.checkOptions(opts);
    const store = new ExceptionStore(dev, origin, randomU32(), opts, false);
    // Slots are zero (never used) until written; the header is written last so a torn
    // creation reads as no store at all. An empty device already reads as zeros (past
    // its end, or holes): then the header, one sector, is the only write and one sync
    // does, which keeps creating a snapshot within its 10 ms under load.
    if (dev.size > 0) {
      await dev.write(Buffer.alloc(HEADER_BYTES - SLOT_BYTES), SLOT_BYTES);
      await dev.sync();
    }
    await dev.write(encodePoolHeader({ chunkSize: opts.chunkSize, poolId: store.poolId, originSize: opts.originSize, originName: opts.originName }), 0);
    if (firstSnapshot) store.headerUnsynced = true;
    else await dev.sync();
    store.alloc.markUsed(headerChunks(opts.chunkSize) - 1, 255);
    return store;
  }

  /**
   * True for a file whose creation never finished: the pool header becomes durable last
   * (create() syncs it after everything else, or with the first snapshot's slot, before
   * that snapshot is acknowledged), so a file with no header (all zeros or too short)
   * holds no acknowledged snapshot.
   */
  static async unfinished(dev: BlockDevice): Promise<boolean> {
    if (dev.size < SLOT_BYTES) return true;
    const head = Buffer.alloc(SLOT_BYTES);
    await dev.read(head, 0);
    return head.every((b) => b === 0);
  }

  /** A store whose exceptions live in memory only: gone on restart, nothing synced. */
  static createTransient(dev: BlockDevice, origin: BlockDevice, opts: StoreOptions): ExceptionStore {
    ExceptionStore.checkOptions(opts);
    return new ExceptionStore(dev, origin, randomU32(), opts, true);
  }

  /** Replays a persistent store. Never needs manual repair: whatever a crash left parses. */
  static async open(dev: BlockDevice, origin: BlockDevice, opts: Omit<StoreOptions, 'chunkSize' | 'originSize' | 'originName'>): Promise<ExceptionStore> {
    const head = Buffer.alloc(HEADER_BYTES);
    await dev.read(head, 0);
    const ph = decodePoolHeader(head.subarray(0, SLOT_BYTES));
    if (typeof ph === 'string') throw CowErrors.badStore(ph);
    if (origin.size !== ph.originSize) throw CowErrors.storeOriginSize(ph.originSize, origin.size);
    const store = new ExceptionStore(dev, origin, ph.poolId, { ...opts, chunkSize: ph.chunkSize, originSize: ph.originSize, originName: ph.originName }, false);
    store.alloc.markUsed(headerChunks(ph.chunkSize) - 1, 255);
    const fixups: MetaWrite[] = [];
    const tails: Array<[SnapshotRecord, LogState]> = [];
    for (let slot = 0; slot < MAX_SNAPSHOTS; slot++) {
      const a = decodeSlot(head.subarray(slotOffset(slot, 0), slotOffset(slot, 0) + SLOT_BYTES));
      const b = decodeSlot(head.subarray(slotOffset(slot, 1), slotOffset(slot, 1) + SLOT_BYTES));
      const s = a && b ? (a.seq > b.seq ? a : b) : (a ?? b);
      if (!s) continue;
      store.slotSeq[slot] = s.seq;
      if (!s.inUse) continue;
      tails.push(await store.replaySnapshot(slot, s, fixups));
    }
    // Reference counts come from the final maps only: a superseded entry may name a chunk
    // that was freed and reused since (even as another snapshot's metadata).
    for (const [rec] of tails) {
      rec.map.forEach((_c, p) => {
        if (p === ZERO_CHUNK) return;
        rec.dataChunks++;
        // A chunk past the end of the refs array so far reads undefined: count from 0, not
        // NaN, which a Uint8Array stores as 0 — a mapped chunk left free to be reused.
        store.alloc.markUsed(p, (store.alloc.refs[p] ?? 0) + 1);
      });
    }
    // Only now is every used chunk known, so only now may anything be allocated.
    store.alloc.recount();
    for (const [rec, tail] of tails) {
      if (tail.next < 0) tail.next = store.alloc.allocOne(REF_META);
      rec.log = store.newLog(rec, tail);
    }
    if (fixups.length) {
      for (const w of fixups) await dev.write(w.buf, w.offset);
      await dev.sync();
    }
    store.refreshLive();
    return store;
  }

  private async replaySnapshot(slot: number, s: SlotRecord, fixups: MetaWrite[]): Promise<[SnapshotRecord, LogState]> {
    const cs = this.chunkSize;
    const perArea = entriesPerArea(cs);
    const rec = new SnapshotRecord(slot, s.snapId, s.name, s.state, s.policy, s.readOnly, s.capacityChunks, s.createdAt, perArea);
    const buf = Buffer.alloc(cs);
    const refs = this.alloc;
    let area = s.firstArea;
    let seq = 0;
    let prev: { area: number; nonce: number; next: number } | undefined;
    let tail: LogState | undefined;
    const map = rec.map;
    // First walk the chain's headers only, to size the map once: at a million
    // exceptions, growing by steps would leave RSS well above the table itself.
    {
      const hb = buf.subarray(0, AREA_HEADER_BYTES);
      let a = s.firstArea;
      let areas = 0;
      for (;;) {
        await this.dev.read(hb, a * cs);
        const h = decodeAreaHeader(hb);
        if (!h || h.snapId !== s.snapId || h.seq !== areas || h.poolId !== this.poolId || areas > 1 << 24) break;
        areas++;
        a = h.next;
      }
      if (areas > 1) map.reserve((areas - 1) * perArea);
    }
    for (;;) {
      await this.dev.read(buf, area * cs);
      const h = decodeAreaHeader(buf);
      if (!h || h.snapId !== s.snapId || h.seq !== seq || h.poolId !== this.poolId) {
        // The chain ends before this area: it is the reserved next one (or, for a new
        // snapshot, the first area was never written).
        refs.markUsed(area, REF_META);
        if (prev) {
          rec.areas.push(prev.area);
          tail = { area: prev.area, seq: seq - 1, nonce: prev.nonce, count: perArea, next: area };
        } else {
          rec.areas.push(area);
          tail = { area, seq: 0, nonce: 0, count: 0, next: -1 };
        }
        break;
      }
      if (prev) rec.areas.push(prev.area);
      refs.markUsed(area, REF_META);
      let n = 0;
      for (; n < perArea; n++) {
        const at = AREA_HEADER_BYTES + n * ENTRY_BYTES;
        const chunk = buf.readUInt32LE(at);
        const phys = buf.readUInt32LE(at + 4);
        if (buf.readUInt32LE(at + 12) !== entryCheck(chunk, phys, h.nonce, n)) break;
        map.set(chunk, phys);
      }
      rec.entries += n;
      if (n === perArea) {
        prev = { area, nonce: h.nonce, next: h.next };
        area = h.next;
        seq++;
        continue;
      }
      // Current area. Whatever follows the last entry is stale: zero it on disk now, so a
      // later append can never make old entries after a gap look valid.
      const endByte = AREA_HEADER_BYTES + n * ENTRY_BYTES;
      const blockIndex = Math.floor(endByte / META_BLOCK);
      const tailBlock = Buffer.from(buf.subarray(blockIndex * META_BLOCK, (blockIndex + 1) * META_BLOCK));
      tailBlock.fill(0, endByte - blockIndex * META_BLOCK);
      if (buf.subarray(endByte).some((x) => x !== 0)) {
        fixups.push({ offset: area * cs + blockIndex * META_BLOCK, buf: Buffer.from(tailBlock) });
        const restStart = (blockIndex + 1) * META_BLOCK;
        if (restStart < cs) fixups.push({ offset: area * cs + restStart, buf: Buffer.alloc(cs - restStart) });
      }
      rec.areas.push(area);
      refs.markUsed(h.next, REF_META);
      tail = { area, seq, nonce: h.nonce, count: n, next: h.next, tail: tailBlock };
      break;
    }
    this.records[slot] = rec;
    return [rec, tail];
  }

  private newLog(rec: SnapshotRecord, state: LogState): AreaLog {
    return new AreaLog(this.chunkSize, this.poolId, rec.snapId, () => this.alloc.allocOne(REF_META), (c) => rec.areas.push(c), state);
  }

  refreshLive(): void {
    this.live = this.records.filter((r): r is SnapshotRecord => r !== undefined && (r.live || (this.unmarked.has(r) && !r.removing)));
  }

  get snapshotCount(): number {
    return this.records.filter((r) => r !== undefined && !r.removing).length;
  }

  get fileChunks(): number {
    return this.alloc.end;
  }

  get memoryBytes(): number {
    let n = this.alloc.bytes;
    for (const r of this.records) if (r) n += r.map.bytes;
    return n;
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
        firstArea: rec.areas[0] ?? 0,
        createdAt: rec.createdAt,
        name: rec.name,
      }),
    });
  }

  private slotJob(rec: SnapshotRecord, inUse: boolean, apply: () => void = () => {}): Job {
    return { dataSync: false, exceptions: 0, encode: (out) => this.slotWrite(rec, inUse, out), apply };
  }

  // ---- snapshot lifecycle -------------------------------------------------------------

  /** Durable when it resolves. The caller (Origin) has quiesced the origin; see Origin.quiesced. */
  async createSnapshot(o: NewSnapshot): Promise<SnapshotRecord> {
    const slot = this.records.findIndex((r) => r === undefined);
    if (slot < 0) throw CowErrors.storeSlotsFull(MAX_SNAPSHOTS);
    const perArea = this.transient ? 0 : entriesPerArea(this.chunkSize);
    const rec = new SnapshotRecord(slot, randomU32(), o.name, 'valid', o.policy, o.readOnly, o.capacityChunks, Date.now(), perArea);
    rec.epoch = this.view?.epoch ?? 0;
    if (!rec.fits(0, 0)) throw CowErrors.snapshotTooSmall(rec.usedChunks);
    rec.removing = true; // not live until durable
    this.records[slot] = rec;
    if (!this.transient) {
      const first = this.alloc.allocOne(REF_META);
      rec.areas.push(first);
      rec.log = this.newLog(rec, { area: first, seq: 0, nonce: 0, count: 0, next: this.alloc.allocOne(REF_META) });
    }
    try {
      await this.commitNewSlot(this.slotJob(rec, true));
    } catch (e) {
      this.records[slot] = undefined;
      throw e;
    }
    rec.removing = false;
    this.refreshLive();
    return rec;
  }

  /**
   * A new snapshot's slot, made durable on its own (O_DSYNC) instead of in the group
   * commit: under load each commit's sync writes back every copy in flight, and
   * creation with one snapshot held waited for two of them (21-51 ms). It may skip the
   * commit order: nothing else writes a slot not yet live, and the slot names only its
   * empty first area, not data a commit has yet to make durable. The first snapshot of
   * a store created for it goes out with plain writes and one sync, which also makes the
   * header durable.
   */
  private async commitNewSlot(job: Job): Promise<void> {
    const first = this.headerUnsynced;
    if (!first && (!this.dev.writeDurable || this.transient || this.committer.failed !== undefined)) return this.committer.submit(job);
    const out: MetaWrite[] = [];
    job.encode(out);
    for (const w of out) await (first ? this.dev.write(w.buf, w.offset) : this.dev.writeDurable!(w.buf, w.offset));
    if (first) {
      await this.dev.sync();
      this.headerUnsynced = false;
    }
    job.apply();
  }

  async extend(rec: SnapshotRecord, capacityChunks: number): Promise<void> {
    if (capacityChunks < rec.capacityChunks) throw CowErrors.snapshotShrink();
    const old = rec.capacityChunks;
    const oldState = rec.state;
    rec.capacityChunks = capacityChunks;
    if (rec.state === 'overflow') rec.state = 'valid';
    try {
      await this.committer.submit(this.slotJob(rec, true));
    } catch (e) {
      rec.capacityChunks = old;
      rec.state = oldState;
      throw e;
    }
    rec.reportedPct = 0;
    this.reportUsage(rec);
  }

  /** Frees the snapshot's chunks at once: durable removal first, then holes punched. */
  async remove(rec: SnapshotRecord): Promise<void> {
    // Origin writes stop copying for a snapshot being removed. Were the removal cut
    // short by a crash, the snapshot would come back valid, reading what the origin
    // wrote meanwhile: so it is first marked invalid, durably, while it still gets
    // its copies (as `unmarked`, it stays in `live` until the mark lands).
    if (!this.transient && rec.state !== 'invalid') {
      rec.state = 'invalid';
      this.unmarked.add(rec);
      await this.markInvalid([rec]);
    }
    rec.removing = true;
    this.refreshLive();
    while (rec.busy > 0) await new Promise<void>((r) => setImmediate(r));
    await this.commitOrWrite(
      this.slotJob(rec, false, () => {
        this.unmarked.delete(rec);
        const freed: number[] = [];
        rec.map.forEach((_c, p) => {
          if (p !== ZERO_CHUNK && this.alloc.unref(p)) freed.push(p);
        });
        if (rec.log) freed.push(...rec.areas, rec.log.next);
        // Limbo until the holes are punched: a chunk reused before its punch would lose data.
        for (const p of freed) this.alloc.refs[p] = REF_LIMBO;
        this.records[rec.slot] = undefined;
        this.reclaim(freed);
      }),
    );
    await this.reclaiming;
  }

  private reclaim(chunks: number[]): void {
    const prev = this.reclaiming ?? Promise.resolve();
    this.reclaiming = prev.then(() => this.punchAndFree(chunks)).catch(() => {});
  }

  private async punchAndFree(chunks: number[]): Promise<void> {
    const cs = this.chunkSize;
    chunks.sort((a, b) => a - b);
    const ranges: Array<[number, number]> = [];
    for (const c of chunks) {
      const last = ranges[ranges.length - 1];
      if (last && last[0] + last[1] === c * cs) last[1] += cs;
      else ranges.push([c * cs, cs]);
    }
    try {
      if (this.dev.punchHoles) await this.dev.punchHoles(ranges);
    } finally {
      for (const c of chunks) this.alloc.free(c);
    }
    const end = this.alloc.usedEnd();
    if (end < this.alloc.end && this.dev.truncate) {
      // BlockDevice.truncate takes effect before it returns, so shrinking the allocator in
      // the same turn leaves no window for a new chunk past `end` to be cut off.
      const done = this.dev.truncate(end * cs);
      this.alloc.shrinkTo(end);
      await done;
    }
  }

  /** In memory at once; callers then make it durable with markInvalid before any origin write it guards. */
  private invalidate(rec: SnapshotRecord, reason: string): void {
    if (rec.state === 'invalid') return;
    rec.state = 'invalid';
    if (!this.transient) this.unmarked.add(rec);
    this.refreshLive();
    this.events.onInvalidated?.(rec, reason);
  }

  /** Makes the invalid marks of recs durable (see `unmarked`); rejects when the store cannot take them. */
  private async markInvalid(recs: Iterable<SnapshotRecord>): Promise<void> {
    // A snapshot being removed gets its removal instead (a mark written after it would bring the slot back).
    const todo = [...recs].filter((r) => this.unmarked.has(r) && !r.removing);
    if (!todo.length) return;
    await this.commitOrWrite({
      dataSync: false,
      exceptions: 0,
      encode: (out) => {
        for (const r of todo) if (!r.removing && this.records[r.slot] === r) this.slotWrite(r, true, out);
      },
      apply: () => {
        for (const r of todo) this.unmarked.delete(r);
        this.refreshLive();
      },
    });
  }

  /**
   * A metadata-only job through the committer or, once the committer has failed (a sync
   * error or a full file system poisons it for good), written and synced directly. Slot
   * copies lie in the header, written in full at creation, so they need no new space:
   * a store on a full file system still takes invalid marks and removals.
   */
  private async commitOrWrite(job: Job): Promise<void> {
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

  private reportUsage(rec: SnapshotRecord): void {
    const pct = (rec.usedChunks / rec.capacityChunks) * 100;
    let hit = 0;
    for (const t of this.thresholds) if (pct >= t && t > rec.reportedPct) hit = t;
    if (hit) {
      rec.reportedPct = hit;
      this.events.onUsage?.(rec, pct);
    }
  }

  // ---- origin writes ------------------------------------------------------------------

  /** True when some live snapshot of an epoch up to gen has no exception for the chunk. */
  private anyLacks(chunk: number, gen = Infinity): boolean {
    for (const r of this.live) if (r.map.get(chunk) === ABSENT && r.epoch <= gen) return true;
    return false;
  }

  /** True when an origin write of [offset, offset+length) would need a copy now. */
  needsCopy(offset: number, length: number): boolean {
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    for (let c = Math.floor(offset / this.chunkSize); c <= last; c++) if (this.anyLacks(c)) return true;
    return false;
  }

  /** Reads the origin as the snapshot sees it. */
  private readOrigin(rec: SnapshotRecord, buf: Buffer, offset: number): Promise<void> {
    return this.view ? this.view.readAsOf(buf, offset, rec.epoch) : this.origin.read(buf, offset);
  }

  /**
   * Runs before an origin write of [offset, offset+length): copies every chunk some live
   * snapshot still reads from the origin, commits the exceptions, and waits out snapshot
   * reads of those chunks from the origin, so the write can land. A write held since
   * epoch gen copies only for snapshots of that epoch or older: later ones already see it.
   */
  async beforeOriginWrite(offset: number, length: number, gen = Infinity): Promise<void> {
    const cs = this.chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    let need: number[] | undefined;
    for (let c = first; c <= last; c++) {
      if (this.anyLacks(c, gen)) (need ??= []).push(c);
    }
    if (need) {
      // Only a held lock is awaited: an await of undefined still costs a turn and a
      // promise, 16 of each per 1 MiB first write.
      for (const c of need) {
        const held = this.locks.acquire(c);
        if (held) await held;
      }
      try {
        await this.copyForOrigin(need, gen);
      } finally {
        for (const c of need) this.locks.release(c);
      }
    }
    const reads = this.originReadsDone(offset, length);
    if (reads) await reads;
  }

  /** True while some snapshot read is reading a chunk of the range from the origin. */
  originReading(offset: number, length: number): boolean {
    return this.originReaders.busy(Math.floor(offset / this.chunkSize), Math.floor((offset + length - 1) / this.chunkSize));
  }

  /**
   * Resolves once no snapshot read is reading a chunk of the range from the origin;
   * undefined when none is, so a rewrite of copied chunks (the common case) awaits nothing.
   */
  originReadsDone(offset: number, length: number): Promise<void> | undefined {
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    return this.originReaders.busy(first, last) ? this.originReaders.waitRange(first, last) : undefined;
  }

  private async copyForOrigin(chunks: number[], gen: number): Promise<void> {
    const cs = this.chunkSize;
    // Invalid snapshots whose mark must be durable before this origin write lands.
    const marks = new Set<SnapshotRecord>();
    const needers: SnapshotRecord[][] = [];
    const todo: number[] = [];
    for (const c of chunks) {
      const who: SnapshotRecord[] = [];
      for (const r of this.live) {
        if (r.map.get(c) !== ABSENT || r.epoch > gen) continue;
        if (r.state === 'invalid') {
          marks.add(r); // invalidated earlier, its mark not yet durable
          continue;
        }
        if (!r.fits(1, 1)) {
          this.invalidate(r, 'exception store full');
          marks.add(r);
          continue;
        }
        r.reserve(1, 1);
        who.push(r);
      }
      if (who.length) {
        todo.push(c);
        needers.push(who);
      }
    }
    // Invalidation already took effect in memory; once the copies below reference no
    // invalid snapshot the origin write may proceed only after the state is durable.
    const involved = new Set<SnapshotRecord>();
    for (const w of needers) for (const r of w) involved.add(r);
    for (const r of involved) r.busy++;
    try {
      const jobs: Promise<void>[] = [];
      let i = 0;
      while (i < todo.length) {
        let j = i + 1;
        const maxRun = Math.max(1, MAX_RUN_BYTES / cs);
        while (j < todo.length && j - i < maxRun && todo[j] === todo[j - 1]! + 1) j++;
        jobs.push(this.copyRun(todo.slice(i, j), needers.slice(i, j)));
        i = j;
      }
      const copyJobs = jobs.length;
      if (marks.size) jobs.push(this.markInvalid(marks));
      const results = await Promise.allSettled(jobs);
      const failed = results.slice(0, copyJobs).find((r) => r.status === 'rejected');
      if (failed) {
        // The copies are unusable: the snapshots that needed them cannot stay valid, and
        // the origin write goes ahead as dm-snapshot's does, once that is durable.
        const reason = (failed as PromiseRejectedResult).reason;
        for (const r of involved) this.invalidate(r, `copy failed: ${reason instanceof Error ? reason.message : String(reason)}`);
        await this.markInvalid(involved);
      }
      const markFailed = results[copyJobs];
      if (markFailed?.status === 'rejected') throw markFailed.reason;
    } finally {
      for (const r of involved) r.busy--;
      for (const r of involved) this.reportUsage(r);
    }
  }

  private async copyRun(chunks: number[], needers: SnapshotRecord[][]): Promise<void> {
    const cs = this.chunkSize;
    const n = chunks.length;
    const phys: number[] = new Array<number>(n).fill(ZERO_CHUNK);
    const charged: boolean[] = new Array<boolean>(n).fill(true);
    let copied = 0;
    const wait = this.copies.acquire(n);
    if (wait) await wait;
    // Taken once admitted: copies queued behind the cap (one per held write, up to
    // hundreds of thousands of them) would otherwise each hold a chunk of memory.
    const buf = this.bufs.get(n * cs);
    try {
      // One read of the origin run.
      await this.origin.read(buf, chunks[0]! * cs, true);
      // A chunk of zeros (a hole in a sparse origin, mostly) becomes a zero exception: no
      // data chunk to write, sync or charge. dm-snapshot copies it like any other.
      const data: number[] = [];
      for (let k = 0; k < n; k++) {
        if (buf.compare(ZEROS, 0, cs, k * cs, (k + 1) * cs) === 0) {
          for (const r of needers[k]!) r.reserve(-1, 0);
          charged[k] = false;
        } else data.push(k);
      }
      copied = data.length;
      if (copied) {
        const runs = this.alloc.alloc(copied, 1);
        let i = 0;
        for (let j = 0; j < runs.length; j += 2) for (let p = runs[j]!; p < runs[j]! + runs[j + 1]!; p++) phys[data[i++]!] = p;
        for (const k of data) this.alloc.refs[phys[k]!] = needers[k]!.length;
        // One write per stretch that is contiguous both in the origin run and in the store.
        const writes: Promise<void>[] = [];
        let a = 0;
        while (a < copied) {
          let b = a + 1;
          while (b < copied && data[b] === data[b - 1]! + 1 && phys[data[b]!] === phys[data[b - 1]!]! + 1) b++;
          const k0 = data[a]!;
          const k1 = data[b - 1]! + 1;
          writes.push(this.dev.write(buf.subarray(k0 * cs, k1 * cs), phys[k0]! * cs, true));
          a = b;
        }
        // All settled before a failure is handled: the rollback frees the chunks and the
        // buffer goes back to the pool, and a write still in flight must not land on a
        // chunk reallocated meanwhile, or write from a buffer another copy has refilled.
        const results = await Promise.allSettled(writes);
        for (const r of results) if (r.status === 'rejected') throw r.reason;
      }
    } catch (e) {
      this.rollbackCopy(phys, charged, needers);
      throw e;
    } finally {
      this.copies.release(n);
      this.bufs.put(buf);
    }
    this.stats.copies += copied;
    this.stats.bytesCopied += copied * cs;
    if (copied) this.events.onCopy?.(copied, copied * cs);
    let exceptions = 0;
    for (const w of needers) exceptions += w.length;
    try {
      await this.committer.submit({
        dataSync: copied > 0,
        exceptions,
        encode: (out) => {
          const logs = new Set<AreaLog>();
          for (let k = 0; k < n; k++) {
            for (const r of needers[k]!) {
              r.log?.append(chunks[k]!, phys[k]!, out);
              if (r.log) logs.add(r.log);
            }
          }
          for (const l of logs) l.finish(out);
        },
        apply: () => {
          for (let k = 0; k < n; k++) for (const r of needers[k]!) r.map.set(chunks[k]!, phys[k]!);
        },
      });
    } catch (e) {
      this.rollbackCopy(phys, charged, needers);
      throw e;
    }
  }

  private rollbackCopy(phys: number[], charged: boolean[], needers: SnapshotRecord[][]): void {
    for (let k = 0; k < phys.length; k++) {
      if (phys[k] !== ZERO_CHUNK) this.alloc.free(phys[k]!);
      for (const r of needers[k]!) r.reserve(charged[k] ? -1 : 0, -1);
    }
  }

  /**
   * Chunks of [offset, offset+length) the origin may discard without changing what any
   * snapshot reads: whole chunks every live snapshot holds an exception for.
   */
  originDiscardable(chunk: number): boolean {
    return !this.anyLacks(chunk);
  }

  // ---- snapshot I/O -------------------------------------------------------------------

  private checkReadable(rec: SnapshotRecord): void {
    if (rec.removing || this.records[rec.slot] !== rec) throw CowErrors.snapshotRemoved(rec.name);
    if (rec.state === 'invalid') throw CowErrors.snapshotInvalid(rec.name);
  }

  private checkWritable(rec: SnapshotRecord): void {
    this.checkReadable(rec);
    if (rec.readOnly) throw CowErrors.snapshotReadOnly(rec.name);
    if (rec.state === 'overflow') throw CowErrors.snapshotFull(rec.name);
  }

  async read(rec: SnapshotRecord, buf: Buffer, offset: number): Promise<void> {
    this.checkReadable(rec);
    const c = Math.floor(offset / this.chunkSize);
    rec.busy++;
    this.storeReads++;
    try {
      // Most small reads lie in one chunk: no segment bookkeeping for them.
      if (offset + buf.length <= (c + 1) * this.chunkSize) await this.readWithin(rec, buf, offset, c);
      else await this.readSpan(rec, buf, offset);
    } finally {
      rec.busy--;
      if (--this.storeReads === 0 && this.limbo.length) this.releaseLimbo();
    }
    // Invalidated meanwhile: what was read may mix in origin writes the snapshot never saw.
    if (rec.state === 'invalid') throw CowErrors.snapshotInvalid(rec.name);
  }

  private async readWithin(rec: SnapshotRecord, buf: Buffer, offset: number, c: number): Promise<void> {
    const p = rec.map.get(c);
    if (p === ZERO_CHUNK) {
      buf.fill(0);
    } else if (p !== ABSENT) {
      await this.dev.read(buf, p * this.chunkSize + (offset - c * this.chunkSize));
    } else {
      this.originReaders.enter(c);
      try {
        await this.readOrigin(rec, buf, offset);
      } finally {
        this.originReaders.leave(c);
      }
    }
  }

  private async readSpan(rec: SnapshotRecord, buf: Buffer, offset: number): Promise<void> {
    const cs = this.chunkSize;
    const len = buf.length;
    const ios: Promise<void>[] = [];
    const readers: number[] = [];
    // Coalesce: consecutive chunks from the origin, or from consecutive store chunks,
    // become one read each.
    let kind = -1; // 0 origin, 1 store, 2 zeros
    let segBuf = 0;
    let segDev = 0;
    let segLen = 0;
    const flush = (): void => {
      if (segLen === 0) return;
      const sub = buf.subarray(segBuf, segBuf + segLen);
      if (kind === 0) ios.push(this.readOrigin(rec, sub, segDev));
      else if (kind === 1) ios.push(this.dev.read(sub, segDev));
      else sub.fill(0);
    };
    try {
      let pos = 0;
      let c = Math.floor(offset / cs);
      while (pos < len) {
        const within = offset + pos - c * cs;
        const n = Math.min(cs - within, len - pos);
        const p = rec.map.get(c);
        let k: number;
        let dev: number;
        if (p === ABSENT) {
          k = 0;
          dev = offset + pos;
          this.originReaders.enter(c);
          readers.push(c);
        } else if (p === ZERO_CHUNK) {
          k = 2;
          dev = 0;
        } else {
          k = 1;
          dev = p * cs + within;
        }
        if (k === kind && (k === 2 || dev === segDev + segLen)) {
          segLen += n;
        } else {
          flush();
          kind = k;
          segBuf = pos;
          segDev = dev;
          segLen = n;
        }
        pos += n;
        c++;
      }
      flush();
      await Promise.all(ios);
    } finally {
      for (const c of readers) this.originReaders.leave(c);
    }
  }

  async write(rec: SnapshotRecord, buf: Buffer, offset: number, fua: boolean): Promise<void> {
    this.checkWritable(rec);
    const cs = this.chunkSize;
    rec.busy++;
    try {
      const parts: Promise<void>[] = [];
      let pos = 0;
      let c = Math.floor(offset / cs);
      while (pos < buf.length) {
        const within = offset + pos - c * cs;
        const n = Math.min(cs - within, buf.length - pos);
        parts.push(this.writeChunk(rec, c, within, buf.subarray(pos, pos + n)));
        pos += n;
        c++;
      }
      await Promise.all(parts);
      if (fua) await this.syncer.sync();
    } finally {
      rec.busy--;
    }
  }

  /** Zeroes a range of the snapshot. Whole chunks become zero exceptions: no data chunk at all. */
  async zero(rec: SnapshotRecord, offset: number, length: number, fua: boolean): Promise<void> {
    this.checkWritable(rec);
    const cs = this.chunkSize;
    rec.busy++;
    try {
      const parts: Promise<void>[] = [];
      let pos = 0;
      let c = Math.floor(offset / cs);
      while (pos < length) {
        const within = offset + pos - c * cs;
        const n = Math.min(cs - within, length - pos);
        if (n === cs) parts.push(this.zeroChunk(rec, c));
        else parts.push(this.writeChunk(rec, c, within, ZEROS.subarray(0, n)));
        pos += n;
        c++;
      }
      await Promise.all(parts);
      if (fua) await this.syncer.sync();
    } finally {
      rec.busy--;
    }
  }

  async flush(rec: SnapshotRecord): Promise<void> {
    this.checkReadable(rec);
    if (!this.transient) await this.syncer.sync();
  }

  private isPrivate(p: number): boolean {
    return p !== ABSENT && p !== ZERO_CHUNK && this.alloc.refs[p] === 1;
  }

  private async writeChunk(rec: SnapshotRecord, c: number, within: number, data: Buffer): Promise<void> {
    const cs = this.chunkSize;
    const wait = this.locks.acquire(c);
    if (wait) await wait;
    try {
      this.checkWritable(rec);
      const p = rec.map.get(c);
      if (this.isPrivate(p)) {
        // Only this snapshot maps it: overwrite in place, like any disk.
        await this.dev.write(data, p * cs + within);
        return;
      }
      // Unmapped, zero or shared: the write goes to a new private chunk.
      const dataDelta = p === ABSENT || p === ZERO_CHUNK ? 1 : 0;
      this.ensureFits(rec, dataDelta, 1);
      rec.reserve(dataDelta, 1);
      const np = this.alloc.allocOne(1);
      let ok = false;
      const full = data.length === cs;
      const buf = full ? data : this.bufs.get(cs);
      try {
        if (!full) {
          if (p === ABSENT) await this.readOrigin(rec, buf, c * cs);
          else if (p === ZERO_CHUNK) buf.fill(0);
          else await this.dev.read(buf, p * cs);
          data.copy(buf, within);
        }
        await this.dev.write(buf, np * cs);
        await this.committer.submit({
          dataSync: true,
          exceptions: 1,
          encode: (out) => {
            rec.log?.append(c, np, out);
            rec.log?.finish(out);
          },
          apply: () => {
            rec.map.set(c, np);
            if (p !== ABSENT && p !== ZERO_CHUNK && this.alloc.unref(p)) this.freeChunk(p);
          },
        });
        ok = true;
      } finally {
        if (!full) this.bufs.put(buf);
        if (!ok) {
          this.alloc.free(np);
          rec.reserve(-dataDelta, -1);
        }
      }
      this.reportUsage(rec);
    } finally {
      this.locks.release(c);
    }
  }

  private async zeroChunk(rec: SnapshotRecord, c: number): Promise<void> {
    const wait = this.locks.acquire(c);
    if (wait) await wait;
    try {
      this.checkWritable(rec);
      const p = rec.map.get(c);
      if (p === ZERO_CHUNK) return;
      this.ensureFits(rec, 0, 1);
      rec.reserve(0, 1);
      let ok = false;
      try {
        await this.committer.submit({
          dataSync: false,
          exceptions: 1,
          encode: (out) => {
            rec.log?.append(c, ZERO_CHUNK, out);
            rec.log?.finish(out);
          },
          apply: () => {
            rec.map.set(c, ZERO_CHUNK);
            if (p !== ABSENT) {
              rec.reserve(-1, 0);
              if (this.alloc.unref(p)) this.freeChunk(p);
            }
          },
        });
        ok = true;
      } finally {
        if (!ok) rec.reserve(0, -1);
      }
    } finally {
      this.locks.release(c);
    }
  }

  /** A snapshot's own write that does not fit: ENOSPC under the overflow policy, else invalidation. */
  private ensureFits(rec: SnapshotRecord, dataDelta: number, entryDelta: number): void {
    if (rec.fits(dataDelta, entryDelta)) return;
    if (rec.policy === 'overflow') {
      if (rec.state === 'valid') {
        rec.state = 'overflow';
        this.events.onOverflow?.(rec);
        this.committer.submit(this.slotJob(rec, true)).catch(() => {});
      }
      throw CowErrors.snapshotFull(rec.name);
    }
    this.invalidate(rec, 'exception store full');
    this.markInvalid([rec]).catch(() => {}); // origin writes that need the mark wait for it (or retry it)
    throw CowErrors.snapshotInvalidated(rec.name);
  }

  private freeChunk(p: number): void {
    // A snapshot read may still be reading it: reuse waits until reads drain.
    if (this.storeReads > 0) {
      this.alloc.refs[p] = REF_LIMBO;
      this.limbo.push(p);
    } else this.alloc.free(p);
  }

  private releaseLimbo(): void {
    const l = this.limbo;
    this.limbo = [];
    for (const p of l) this.alloc.free(p);
  }

  /** Waits for every queued commit. */
  async idle(): Promise<void> {
    await this.committer.idle();
    await this.reclaiming;
  }

  async close(): Promise<void> {
    await this.idle();
    await this.dev.close();
  }
}

