// Owns the COW state of a data directory. Files:
//   DATA_DIR/NAME.vol                      origin volume (the daemon's; opened here, never created)
//   DATA_DIR/cow/NAME.<K>k.cows            persistent exception store of origin NAME for chunk size K KiB
//   DATA_DIR/cow/NAME.<K>k.transient       transient store: data only, deleted at open
//   DATA_DIR/cow/NAME.<K>k.sparse.cows     the same for --sparse snapshots (and .sparse.transient):
//                                          their space is not reserved (reservation.ts)
//   DATA_DIR/cow/NAME.cbt                  changed-chunk tracker of origin NAME (change-tracker.ts)
// A store holds every snapshot of one origin with one chunk size (up to 127).
import { EventEmitter } from 'node:events';
import { mkdir, readdir, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { FileDevice, syncDirectory, syncMadeDirectories, type BlockDevice, type FileDeviceOptions } from './device.js';
import { CowErrors, isNoSpace } from './errors.js';
import { MAX_SNAPSHOTS, headerChunks, type OverflowPolicy } from './format.js';
import { isValidName } from './names.js';
import { Origin } from './origin.js';
import { ChangeTracker } from './change-tracker.js';
import type { SnapshotRecord } from './snapshot-record.js';
import { Snapshot, type SnapshotUsage } from './snapshot.js';
import { checkGeometry } from './exception-store.js';
import { OriginPools } from './origin-copy.js';
import { SnapshotMerge, type MergeProgress } from './merge.js';
import { SnapshotPool, type PoolEvents, type StoreSpace } from './snapshot-pool.js';
import type { Claim } from './reservation.js';
import type { InvalidReason } from './format.js';

export interface CowLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

export interface CowManagerOptions {
  logger?: CowLogger;
  /** Usage percentages at which a 'usage' event fires (default 50, 80, 90, 100). */
  usageThresholds?: number[];
  /** Called after each group commit with its latency in seconds. */
  onCommit?: (seconds: number, exceptions: number) => void;
  /** Chunk copies in flight per store (default: 16 MiB of chunks). */
  maxCopies?: number;
  /** Bytes of origin writes each origin may acknowledge before their copies land (write-behind.ts). */
  writeBehindBytes?: number;
  /** Keep a changed-chunk tracker (cow/NAME.cbt) per attached origin, for incremental backups. */
  changeTracking?: boolean;
  /** TEST-ONLY: wraps every file opened here (origins and stores), e.g. in a FaultDevice. */
  wrapDevice?: (dev: FileDevice) => ManagedDevice;
  /** TEST-ONLY: replaces syncDirectory, to see when directories are made durable. */
  syncDirectory?: (dir: string) => Promise<void>;
}

/** A device as the manager opens it: stores need truncate. */
export type ManagedDevice = BlockDevice & { truncate(size: number): Promise<void> };

export interface CreateSnapshotOptions {
  name: string;
  origin: string;
  /** Bytes of exception store, metadata included (lvcreate --size). Rounded down to chunks. */
  size: number;
  chunkSize?: number;
  policy?: OverflowPolicy;
  transient?: boolean;
  readOnly?: boolean;
  /** Reserve nothing on disk (a thin pool): a full file system may invalidate it. */
  sparse?: boolean;
}

/** One store file and the space it holds (SnapshotPool.space). */
export interface StoreUsage extends StoreSpace {
  origin: string;
  path: string;
  chunkSize: number;
  sparse: boolean;
  transient: boolean;
  snapshots: string[];
}

export interface CowStats {
  copies: number;
  bytesCopied: number;
  exceptionsCommitted: number;
  commits: number;
  commitSecondsTotal: number;
  snapshots: number;
  storeChunks: number;
  memoryBytes: number;
  /** Origin writes acknowledged and not yet in their volume files. */
  writeBehindBytes: number;
}

export interface InvalidatedEvent {
  name: string;
  origin: string;
  reason: InvalidReason;
  /** The error behind an I/O or disk-full invalidation. */
  detail?: string;
  usedChunks: number;
  capacityChunks: number;
}

export interface UsageEvent {
  name: string;
  origin: string;
  percent: number;
  usedChunks: number;
  capacityChunks: number;
}

export interface MergeEvent {
  name: string;
  origin: string;
  /** started: by mergeSnapshot; resumed: at attach, after a restart; done: the snapshot is gone. */
  phase: 'started' | 'resumed' | 'done' | 'error';
  totalChunks: number;
  mergedChunks: number;
  seconds: number;
  error?: unknown;
}

export interface MergeSnapshotOptions {
  /** Bytes a second the background copy may take (0: no bound); default DEFAULT_MERGE_RATE. */
  rate?: number;
}

export interface CowManagerEvents {
  merge: [MergeEvent];
  invalidated: [InvalidatedEvent];
  overflow: [{ name: string; origin: string }];
  usage: [UsageEvent];
  commit: [{ seconds: number; exceptions: number }];
}

/** Names become file names: checked here too, whatever the caller checked (see cow/names.ts). */
export const validName = isValidName;

interface PoolEntry {
  pool: SnapshotPool;
  path: string;
}

/** A snapshot of a group about to be created, with the pool it goes into. */
interface Planned {
  o: CreateSnapshotOptions;
  attached: Attached;
  entry: PoolEntry;
  /** The pool was made for it: dropped again if no snapshot ends up in it. */
  created: boolean;
  /** Its space, reserved before the origins are quiesced. */
  claim?: Claim;
  capacityChunks: number;
  chunkSize: number;
}

/** An attached origin with the pools of its snapshots. */
interface Attached {
  origin: Origin;
  tracker: ChangeTracker | undefined;
  pools: OriginPools;
  entries: PoolEntry[];
  /** The snapshot being merged into this origin, at most one. */
  merge?: SnapshotMerge;
}

export class CowManager extends EventEmitter<CowManagerEvents> {
  private readonly origins = new Map<string, Attached>();
  private readonly snaps = new Map<string, Snapshot>();
  private readonly totals = { copies: 0, bytesCopied: 0, exceptionsCommitted: 0, commits: 0, commitSecondsTotal: 0 };
  private closed = false;

  private constructor(
    readonly dataDir: string,
    private readonly opts: CowManagerOptions,
  ) {
    super();
  }

  static async open(dataDir: string, opts: CowManagerOptions = {}): Promise<CowManager> {
    const m = new CowManager(dataDir, opts);
    await syncMadeDirectories(await mkdir(m.cowDir, { recursive: true }), m.cowDir, (d) => m.syncDir(d));
    for (const f of await readdir(m.cowDir)) {
      if (f.endsWith('.transient')) await unlink(join(m.cowDir, f)).catch(() => {});
    }
    return m;
  }

  get cowDir(): string {
    return join(this.dataDir, 'cow');
  }

  private async openDevice(path: string, opts?: FileDeviceOptions): Promise<ManagedDevice> {
    const dev = await FileDevice.open(path, opts);
    return this.opts.wrapDevice ? this.opts.wrapDevice(dev) : dev;
  }

  private syncDir(dir: string): Promise<void> {
    return (this.opts.syncDirectory ?? syncDirectory)(dir);
  }

  private storePath(origin: string, chunkSize: number, transient: boolean, sparse: boolean): string {
    return join(this.cowDir, `${origin}.${chunkSize / 1024}k.${sparse ? 'sparse.' : ''}${transient ? 'transient' : 'cows'}`);
  }

  private poolEvents(originName: string): PoolEvents {
    const figures = (r: { name: string; usedChunks: number; capacityChunks: number }) => ({
      name: r.name,
      origin: originName,
      usedChunks: r.usedChunks,
      capacityChunks: r.capacityChunks,
    });
    return {
      onCommit: (seconds, exceptions) => {
        this.totals.commits++;
        this.totals.commitSecondsTotal += seconds;
        this.totals.exceptionsCommitted += exceptions;
        this.opts.onCommit?.(seconds, exceptions);
        if (this.listenerCount('commit')) this.emit('commit', { seconds, exceptions });
      },
      onCopy: (chunks, bytes) => {
        this.totals.copies += chunks;
        this.totals.bytesCopied += bytes;
      },
      onInvalidated: (rec, reason, detail) => {
        this.opts.logger?.warn({ snapshot: rec.name, origin: originName, reason, detail }, 'snapshot invalidated');
        this.emit('invalidated', { ...figures(rec), reason, detail });
      },
      onOverflow: (rec) => {
        this.opts.logger?.warn({ snapshot: rec.name, origin: originName }, 'snapshot overflowed: its writes now fail with ENOSPC');
        this.emit('overflow', { name: rec.name, origin: originName });
      },
      onUsage: (rec, percent) => this.emit('usage', { ...figures(rec), percent }),
      onError: (err, what) => this.opts.logger?.error({ err, origin: originName, what }, `exception store: ${what} failed`),
    };
  }

  /** Opens DATA_DIR/NAME.vol and every persistent store of it, replaying their snapshots. */
  async attachOrigin(name: string): Promise<Origin> {
    this.checkOpen();
    if (!validName(name)) throw CowErrors.invalidName('volume', name);
    const existing = this.origins.get(name);
    if (existing) return existing.origin;
    const volPath = join(this.dataDir, `${name}.vol`);
    const dev = await this.openDevice(volPath);
    let tracker: ChangeTracker | undefined;
    try {
      if (this.opts.changeTracking) tracker = await this.openTracker(name, volPath, dev.size);
    } catch (e) {
      await dev.close();
      throw e;
    }
    const pools = new OriginPools();
    const origin = new Origin(name, dev, pools, {
      marks: tracker,
      writeBehindBytes: this.opts.writeBehindBytes,
      onLost: (err, offset, length) => this.opts.logger?.error({ err, origin: name, offset, length }, 'acknowledged origin write lost'),
    });
    const entries: PoolEntry[] = [];
    try {
      const prefix = `${name}.`;
      for (const f of (await readdir(this.cowDir)).sort()) {
        const m = /^(.+)\.(\d+)k\.(sparse\.)?cows$/.exec(f);
        if (!m || m[1] !== name || !f.startsWith(prefix)) continue;
        const sparse = m[3] !== undefined;
        const path = join(this.cowDir, f);
        const sdev = await this.openDevice(path);
        if (await SnapshotPool.unfinished(sdev).catch(() => false)) {
          // Its creation was cut short (a kill or power loss before the header was written),
          // so it holds no snapshot that was ever acknowledged; left alone, it would stop
          // the origin from attaching and block new stores of that chunk size.
          await sdev.close();
          await unlink(path).catch(() => {});
          this.opts.logger?.warn({ origin: name, path }, 'removed an exception store whose creation never finished');
          continue;
        }
        const pool = await SnapshotPool.open(sdev, origin, { ...this.poolOpts(name), sparse }).catch(async (e: unknown) => {
          await sdev.close();
          throw e;
        });
        if (pool.snapshotCount === 0) {
          await pool.close();
          await unlink(path).catch(() => {});
          continue;
        }
        entries.push({ pool, path });
      }
    } catch (e) {
      for (const s of entries) await s.pool.close();
      await dev.close();
      await tracker?.close();
      throw e;
    }
    const attached: Attached = { origin, tracker, pools, entries };
    this.origins.set(name, attached);
    let merging: Snapshot | undefined;
    for (const { pool } of entries) {
      pools.add(pool);
      for (const rec of pool.records) {
        if (!rec) continue;
        const snap = new Snapshot(origin, pool, rec);
        this.snaps.set(rec.name, snap);
        if (rec.state === 'merging') merging = snap;
      }
    }
    // A merge a stop or a crash interrupted goes on.
    if (merging) await this.startMerge(attached, merging, {}, 'resumed');
    this.opts.logger?.info({ origin: name, snapshots: entries.reduce((n, e) => n + e.pool.snapshotCount, 0) }, 'origin attached');
    return origin;
  }

  /** Where origin NAME's changed-chunk tracker lives (deleted with the volume). */
  trackerPath(originName: string): string {
    return join(this.cowDir, `${originName}.cbt`);
  }

  tracker(originName: string): ChangeTracker | undefined {
    return this.origins.get(originName)?.tracker;
  }

  private async openTracker(name: string, volPath: string, volumeSize: number): Promise<ChangeTracker> {
    const path = this.trackerPath(name);
    const tdev = await this.openDevice(path, { create: true });
    const fresh = tdev.size === 0;
    try {
      const tracker = await ChangeTracker.open(tdev, {
        volumeSize,
        volumeState: async () => {
          const st = await stat(volPath);
          return { blocks: st.blocks, mtimeMs: st.mtimeMs, size: st.size };
        },
      });
      // A lost name would cost trust (a volume with data and no tracker), not correctness.
      if (fresh) await this.syncDir(this.cowDir);
      return tracker;
    } catch (e) {
      await tdev.close();
      throw e;
    }
  }

  private poolOpts(originName: string) {
    return { events: this.poolEvents(originName), usageThresholds: this.opts.usageThresholds, maxCopies: this.opts.maxCopies };
  }

  async detachOrigin(name: string): Promise<void> {
    const a = this.origins.get(name);
    if (!a) return;
    // Held writes still need their pools for their copies.
    await a.merge?.stop();
    await a.origin.settle();
    for (const [sn, s] of this.snaps) if (s.origin === a.origin) this.snaps.delete(sn);
    for (const e of a.entries) {
      await e.pool.close();
      if (!e.pool.store.persistent) await unlink(e.path).catch(() => {});
    }
    this.origins.delete(name);
    await a.origin.close();
    // After the volume file is closed: the clean record holds its final mtime.
    await a.tracker?.close();
  }

  origin(name: string): Origin | undefined {
    return this.origins.get(name)?.origin;
  }

  snapshot(name: string): Snapshot | undefined {
    return this.snaps.get(name);
  }

  /** Snapshots of one origin (or all), for refusing to delete an origin that has some. */
  snapshotsOf(origin?: string): Snapshot[] {
    return [...this.snaps.values()].filter((s) => origin === undefined || s.origin.name === origin);
  }

  list(): SnapshotUsage[] {
    return this.snapshotsOf().map((s) => s.usage());
  }

  async createSnapshot(o: CreateSnapshotOptions): Promise<Snapshot> {
    return (await this.createSnapshots([o]))[0]!;
  }

  /**
   * Creates several snapshots (of one origin or several) at one instant: every origin
   * involved is quiesced at once, so a write is in all of them or in none. On any failure
   * the ones made are removed and the error is rethrown.
   */
  async createSnapshots(list: CreateSnapshotOptions[]): Promise<Snapshot[]> {
    this.checkOpen();
    const names = new Set<string>();
    for (const o of list) {
      if (!validName(o.name)) throw CowErrors.invalidName('snapshot', o.name);
      if (names.has(o.name) || this.snaps.has(o.name) || this.origins.has(o.name)) throw CowErrors.nameTaken(o.name);
      names.add(o.name);
      const a = this.origins.get(o.origin);
      if (!a) throw CowErrors.unknownOrigin(o.origin);
      // As LVM: a snapshot taken now would need the merge's chunks at two points in time.
      if (a.merge) throw CowErrors.originMerging(o.origin, a.merge.name);
    }
    const plan: Planned[] = [];
    const made: Array<{ p: Planned; rec: SnapshotRecord }> = [];
    try {
      for (const o of list) {
        const p = await this.preparePool(o);
        plan.push(p);
        // Before any origin is quiesced: allocating a large store may take a while.
        p.claim = await p.entry.pool.claim(p.capacityChunks, `snapshot ${o.name}`);
      }
      const involved = [...new Set(plan.map((p) => p.attached))].sort((a, b) => (a.origin.name < b.origin.name ? -1 : 1));
      await this.quiesceAll(involved, async () => {
        for (const p of plan) {
          // Before the creation: a checkpoint with no snapshot is harmless, the reverse is not.
          await p.attached.tracker?.checkpoint(p.o.name);
          const rec = await p.entry.pool.createSnapshot({
            name: p.o.name,
            capacityChunks: p.capacityChunks,
            policy: p.o.policy ?? 'invalidate',
            readOnly: p.o.readOnly ?? false,
          });
          made.push({ p, rec });
        }
      });
      for (const { p } of made) if (this.snaps.has(p.o.name)) throw CowErrors.nameTaken(p.o.name);
    } catch (e) {
      for (const { p, rec } of made) await p.entry.pool.remove(rec).catch(() => {});
      for (const p of plan) {
        p.claim?.done();
        if (p.created && p.entry.pool.snapshotCount === 0 && p.attached.entries.includes(p.entry)) await this.dropPool(p.attached, p.entry);
        else p.entry.pool.reclaimer.trim();
      }
      throw e;
    }
    for (const p of plan) p.claim?.done();
    return made.map(({ p, rec }) => {
      const snap = new Snapshot(p.attached.origin, p.entry.pool, rec);
      this.snaps.set(p.o.name, snap);
      const { chunkSize, capacityChunks } = p;
      const { persistent } = p.entry.pool.store;
      this.opts.logger?.info(
        { snapshot: p.o.name, origin: p.o.origin, capacityChunks, chunkSize, transient: !persistent, sparse: p.entry.pool.sparse },
        'snapshot created',
      );
      return snap;
    });
  }

  /** Runs fn with every origin quiesced, nested in the given (name) order so two groups never deadlock. */
  private quiesceAll(list: Attached[], fn: () => Promise<void>, i = 0): Promise<void> {
    if (i === list.length) return fn();
    return list[i]!.origin.quiesced(() => this.quiesceAll(list, fn, i + 1));
  }

  /** Finds or makes the pool a new snapshot goes into, before any origin is quiesced. */
  private async preparePool(o: CreateSnapshotOptions): Promise<Planned> {
    const attached = this.origins.get(o.origin);
    if (!attached) throw CowErrors.unknownOrigin(o.origin);
    const { origin, entries } = attached;
    const chunkSize = o.chunkSize ?? 65536;
    const persistent = !(o.transient ?? false);
    const sparse = o.sparse ?? false;
    const geometry = { chunkSize, originSize: origin.size, originName: origin.name };
    checkGeometry(geometry);
    const capacityChunks = Math.floor(o.size / chunkSize);
    const entry = entries.find(
      (e) =>
        e.pool.chunkSize === chunkSize &&
        e.pool.store.persistent === persistent &&
        e.pool.sparse === sparse &&
        e.pool.snapshotCount < MAX_SNAPSHOTS,
    );
    if (entry) return { o, attached, entry, created: false, capacityChunks, chunkSize };
    const path = this.storePath(o.origin, chunkSize, !persistent, sparse);
    const sdev = await this.openDevice(path, { create: true });
    const opts = { ...this.poolOpts(origin.name), ...geometry, sparse };
    let ours = false;
    let made: PoolEntry | undefined;
    try {
      if (sdev.size > 0 && persistent) throw CowErrors.fileExists(path);
      ours = true;
      if (!persistent) await sdev.truncate(0);
      const pool = persistent ? await SnapshotPool.create(sdev, origin, opts, true) : SnapshotPool.transient(sdev, origin, opts);
      made = { pool, path };
      // Before any snapshot in it is acknowledged: the file's sync does not cover its name.
      // A crash between the two leaves a nameable but unfinished store, removed at attach.
      if (persistent) await this.syncDir(this.cowDir);
    } catch (e) {
      // Asked before the file goes: a full file system is told as a reservation would tell it.
      const free = isNoSpace(e) ? await sdev.freeBytes?.().catch(() => 0) : undefined;
      await (made ? made.pool.close() : sdev.close());
      // A half-written store (ENOSPC, EIO) would refuse the next creation as EEXIST.
      if (ours) await unlink(path).catch(() => {});
      if (free !== undefined) throw CowErrors.noSpace(`snapshot ${o.name}`, (headerChunks(chunkSize) + capacityChunks) * chunkSize, free);
      throw e;
    }
    entries.push(made);
    attached.pools.add(made.pool);
    return { o, attached, entry: made, created: true, capacityChunks, chunkSize };
  }

  /** Grows a snapshot to newSize bytes (lvextend). An overflowed snapshot becomes writable again. */
  async extendSnapshot(name: string, newSize: number): Promise<SnapshotUsage> {
    const s = this.snaps.get(name);
    if (!s) throw CowErrors.unknownSnapshot(name);
    await s.pool.extend(s.record, Math.floor(newSize / s.pool.chunkSize));
    return s.usage();
  }

  /**
   * A backup has read these byte ranges of a read-only snapshot: origin writes stop
   * copying their whole chunks for it (SnapshotRecord.released). Returns the chunks released.
   */
  releaseChunks(name: string, ranges: ReadonlyArray<readonly [offset: number, length: number]>): number {
    const s = this.snaps.get(name);
    if (!s) throw CowErrors.unknownSnapshot(name);
    if (!s.readOnly) throw CowErrors.releaseWritable(name);
    const cs = s.pool.chunkSize;
    const n = Math.ceil(s.origin.size / cs);
    s.record.released ??= new Uint8Array(Math.ceil(n / 8));
    const bits = s.record.released;
    let count = 0;
    for (const [offset, length] of ranges) {
      const end = Math.min(n, Math.floor((offset + length) / cs) + (offset + length >= s.origin.size ? 1 : 0));
      for (let c = Math.max(0, Math.ceil(offset / cs)); c < end; c++) {
        if (((bits[c >>> 3]! >>> (c & 7)) & 1) === 0) count++;
        bits[c >>> 3]! |= 1 << (c & 7);
      }
    }
    return count;
  }

  /** Frees the snapshot's space at once; the origin and other snapshots are untouched. */
  async removeSnapshot(name: string): Promise<void> {
    const s = this.snaps.get(name);
    if (!s) throw CowErrors.unknownSnapshot(name);
    if (s.record.state === 'merging') throw CowErrors.removeMerging(name);
    this.snaps.delete(name);
    await s.pool.remove(s.record);
    if (s.pool.snapshotCount === 0) {
      const attached = this.origins.get(s.origin.name);
      const entry = attached?.entries.find((e) => e.pool === s.pool);
      if (attached && entry) await this.dropPool(attached, entry);
    }
    this.opts.logger?.info({ snapshot: name }, 'snapshot removed');
  }

  private async dropPool(attached: Attached, entry: PoolEntry): Promise<void> {
    attached.entries.splice(attached.entries.indexOf(entry), 1);
    attached.pools.remove(entry.pool);
    await entry.pool.close();
    await unlink(entry.path).catch(() => {});
  }

  /**
   * Merges a snapshot back into its origin (lvconvert --merge): from now on the origin
   * reads as the snapshot, and the snapshot's chunks are copied back in the background,
   * after which it is gone. Durable when it resolves: a restart resumes it.
   */
  async mergeSnapshot(name: string, opts: MergeSnapshotOptions = {}): Promise<MergeProgress> {
    this.checkOpen();
    this.checkMergeable(name);
    const s = this.snaps.get(name)!;
    const a = this.origins.get(s.origin.name)!;
    await this.startMerge(a, s, opts, 'started');
    return a.merge!.progress();
  }

  /** Throws the CowError mergeSnapshot would refuse the snapshot with; returns when it may be merged. */
  checkMergeable(name: string): void {
    const s = this.snaps.get(name);
    if (!s) throw CowErrors.unknownSnapshot(name);
    const a = this.origins.get(s.origin.name)!;
    const rec = s.record;
    if (a.merge) throw CowErrors.mergeBusy(s.origin.name, a.merge.name);
    if (!s.pool.store.persistent) throw CowErrors.mergeTransient(name);
    if (rec.state === 'invalid') throw CowErrors.mergeInvalid(name);
    if (rec.released) throw CowErrors.mergeReleased(name);
  }

  /** Sets a running merge's bound on its background copy. */
  setMergeRate(name: string, rate: number): MergeProgress {
    const s = this.snaps.get(name);
    if (!s?.merging) throw CowErrors.unknownSnapshot(name);
    const m = this.origins.get(s.origin.name)!.merge!;
    m.setRate(rate);
    return m.progress();
  }

  private async startMerge(a: Attached, s: Snapshot, opts: MergeSnapshotOptions, phase: 'started' | 'resumed'): Promise<void> {
    const { origin } = a;
    const rec = s.record;
    const events = (m: SnapshotMerge, p: MergeEvent['phase'], error?: unknown): MergeEvent => ({
      name: rec.name,
      origin: origin.name,
      phase: p,
      totalChunks: m.totalChunks,
      mergedChunks: m.mergedChunks,
      seconds: (Date.now() - m.startedAt.getTime()) / 1000,
      error,
    });
    // Quiesced, with every held write landed first: they belong to the origin before the
    // merge, and the merge's epoch must be above every snapshot's.
    await origin.quiesced(async () => {
      await origin.settle();
      if (phase === 'started') {
        const before = rec.state;
        rec.state = 'merging';
        try {
          await s.pool.store.updateSnapshot(rec);
        } catch (e) {
          rec.state = before;
          throw e;
        }
        s.pool.refreshLive();
      }
      const m = new SnapshotMerge(origin, s.pool, rec, {
        rate: opts.rate,
        onDone: (done) => {
          void this.finishMerge(a, s, done).then(
            () => this.emit('merge', events(done, 'done')),
            (e: unknown) => this.emit('merge', events(done, 'error', e)),
          );
        },
        onError: (e, failed) => this.emit('merge', events(failed, 'error', e)),
      });
      a.merge = m;
      s.merging = m;
      origin.merge = m;
      this.opts.logger?.info(
        { snapshot: rec.name, origin: origin.name, chunks: m.totalChunks, rate: m.rate },
        phase === 'started' ? 'merge started' : 'merge resumed',
      );
      this.emit('merge', events(m, phase));
      m.start();
    });
  }

  /** The last chunk is back: the origin reads its own file again, and the snapshot goes. */
  private async finishMerge(a: Attached, s: Snapshot, m: SnapshotMerge): Promise<void> {
    a.origin.merge = undefined;
    a.merge = undefined;
    s.merging = undefined;
    this.snaps.delete(s.name);
    await s.pool.remove(s.record);
    if (s.pool.snapshotCount === 0) {
      const entry = a.entries.find((e) => e.pool === s.pool);
      if (entry) await this.dropPool(a, entry);
    }
    this.opts.logger?.info(
      {
        snapshot: s.name,
        origin: a.origin.name,
        chunks: m.totalChunks,
        bytes: m.totalChunks * s.pool.chunkSize,
        seconds: (Date.now() - m.startedAt.getTime()) / 1000,
      },
      'merge done',
    );
  }

  /** Every store file of every attached origin, with the space it holds. */
  stores(): StoreUsage[] {
    const out: StoreUsage[] = [];
    for (const [origin, { entries }] of this.origins)
      for (const { pool, path } of entries)
        out.push({
          origin,
          path,
          chunkSize: pool.chunkSize,
          sparse: pool.sparse,
          transient: !pool.store.persistent,
          snapshots: pool.records.filter((r): r is SnapshotRecord => r !== undefined && !r.removing).map((r) => r.name),
          ...pool.space(),
        });
    return out;
  }

  stats(): CowStats {
    let storeChunks = 0;
    let memoryBytes = 0;
    let writeBehindBytes = 0;
    for (const { origin, entries } of this.origins.values()) {
      writeBehindBytes += origin.behind.heldBytes;
      for (const { pool } of entries) {
        storeChunks += pool.fileChunks;
        memoryBytes += pool.memoryBytes;
      }
    }
    return { ...this.totals, snapshots: this.snaps.size, storeChunks, memoryBytes, writeBehindBytes };
  }

  private checkOpen(): void {
    if (this.closed) throw CowErrors.closed();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const name of [...this.origins.keys()]) await this.detachOrigin(name);
  }
}
