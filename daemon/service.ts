// The daemon's model of its data directory: origin volumes and their snapshots,
// each served as an NBD export, created and removed live. The control API and
// the metrics read from here; cow/ does the storage work.
import { statfs, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import {
  CowError,
  CowErrors,
  CowManager,
  INVALID_WHY,
  type InvalidInfo,
  type Origin,
  type Snapshot,
  type SnapshotUsage,
} from '../cow/index.js';
import type { MergeEvent } from '../cow/manager.js';
import type { MergeProgress } from '../cow/merge.js';
import { ChangeContexts } from './change-contexts.js';
import { Errors, isCowbdError } from './errors.js';
import { checkName } from './names.js';
import { Registry } from './registry.js';
import { formatSize } from './sizes.js';
import { VolumeBackend } from './volume-backend.js';
import { createVolume, listVolumes, volumePath, type VolumeCreateOptions } from './volumes.js';
import { testFaults } from './test-faults.js';

export interface AutoExtendPolicy {
  /** Usage percent at which a snapshot is grown; 100 disables, as in lvm.conf. */
  threshold: number;
  /** Growth as a percent of the current size. */
  percent: number;
  /** Largest size auto-extend may reach, in bytes (0: no limit but free disk). */
  maxBytes: number;
}

export interface ServiceOptions {
  dataDir: string;
  readOnly: boolean;
  defaultVolume: string;
  autoExtend: AutoExtendPolicy;
  onCommit?: (seconds: number) => void;
  /** Exports NBD clients may only read (the config file's exports.NAME.readOnly). */
  exportReadOnly?: (name: string) => boolean;
  writeBehindBytes?: number;
}

export interface SnapshotCreate {
  name: string;
  origin: string;
  size: number;
  chunkSize?: number;
  policy?: 'invalidate' | 'overflow';
  transient?: boolean;
  readOnly?: boolean;
  /** Reserve nothing on disk (a thin pool). */
  sparse?: boolean;
}

/** A merge waiting for its origin's NBD clients to disconnect, as LVM waits for the origin to close. */
export interface PendingMerge {
  /** NBD clients connected to the origin now. */
  clients: number;
  /** The bound asked for, bytes a second (0: none); null: the engine's default. */
  rate: number | null;
}

/** A snapshot as the daemon shows it: the engine's usage and a merge the daemon holds back. */
export interface SnapshotView extends SnapshotUsage {
  mergePending: PendingMerge | null;
}

/** The answer to a merge request. */
export interface MergeView {
  snapshot: string;
  origin: string;
  /** merging: under way, the origin reads as the snapshot; pending: waits for the origin's clients to leave. */
  state: 'merging' | 'pending';
  /** NBD clients connected to the origin now. */
  clients: number;
  /** The bound, bytes a second (0: none); null for a pending merge using the engine's default. */
  rate: number | null;
  /** Null while pending. */
  progress: MergeProgress | null;
}

/** A merge's progress as status shows it, like lvs's Merge% column. */
export interface MergeStatus {
  totalChunks: number;
  mergedChunks: number;
  percent: number;
  rate: number;
}

export interface VolumeView {
  name: string;
  size: number;
  snapshots: string[];
}

export interface StatusRow {
  name: string;
  kind: 'origin' | 'snapshot';
  size: number;
  origin: string | null;
  chunkSize: number | null;
  usedPercent: number | null;
  state: string;
  storeSize: number | null;
  /** Snapshots only: reserves nothing on disk (a thin pool). */
  sparse: boolean | null;
  /** Snapshots only: bytes kept allocated on disk for it. */
  reservedBytes: number | null;
  /** Snapshots only: bytes its store holds for it, data and metadata. */
  usedBytes: number | null;
  /** Why the snapshot is invalid and what it held then; null otherwise. */
  invalid: InvalidInfo | null;
  /** Snapshots only: its merge into the origin while one runs. */
  merge: MergeStatus | null;
  /** Snapshots only: a merge waiting for the origin's NBD clients to disconnect. */
  mergePending: PendingMerge | null;
}

export function mergeStatus(p: MergeProgress): MergeStatus {
  const percent = p.totalChunks ? Math.floor((100 * p.mergedChunks) / p.totalChunks) : 100;
  return { totalChunks: p.totalChunks, mergedChunks: p.mergedChunks, percent, rate: p.rate };
}

/**
 * Why a snapshot is invalid and what it held then, for people: "its exception store filled
 * up; it held 2 of 16 chunks (12.5%)". A snapshot invalidated before reasons were recorded
 * has no count either.
 */
export function invalidWhy(invalid: InvalidInfo, capacityChunks: number): string {
  if (invalid.reason === 'unknown') return INVALID_WHY.unknown;
  const pct = capacityChunks ? ((100 * invalid.usedChunks) / capacityChunks).toFixed(1) : '0.0';
  return `${INVALID_WHY[invalid.reason]}; it held ${invalid.usedChunks} of ${capacityChunks} chunks (${pct}%)`;
}

export function rateText(rate: number): string {
  return rate > 0 ? `${formatSize(rate)}/s` : 'unbounded';
}

/** Free space held back from auto-extend so the file system never fills to the last byte. */
const FREE_DISK_RESERVE = 64 * 1024 * 1024;
const USAGE_WARNINGS = Array.from({ length: 11 }, (_, i) => 50 + 5 * i);

export function toCowbdError(err: unknown, what: { volume?: string; snapshot?: string }): unknown {
  if (!(err instanceof CowError)) return err;
  switch (err.id) {
    case CowErrors.unknownSnapshot.id:
      return Errors.unknownSnapshot(what.snapshot ?? '?');
    case CowErrors.unknownOrigin.id:
      return Errors.unknownVolume(what.volume ?? '?');
    case CowErrors.nameTaken.id:
    case CowErrors.fileExists.id:
      return Errors.nameTaken(what.snapshot ?? what.volume ?? '?');
    case CowErrors.noSpace.id:
      return Errors.noSpace(err.message);
    case CowErrors.mergeTransient.id:
    case CowErrors.mergeInvalid.id:
    case CowErrors.mergeReleased.id:
      return Errors.mergeRefused(err.message);
    case CowErrors.mergeBusy.id:
    case CowErrors.originMerging.id:
    case CowErrors.removeMerging.id:
    case CowErrors.snapshotMerging.id:
      return Errors.merging(err.message);
  }
  // The rest by kind: a request the engine refuses as given is the caller's to fix;
  // I/O errors pass through as they are.
  switch (err.code) {
    case 'EBUSY':
      return Errors.originBusy(what.volume ?? '?', err.message);
    case 'EINVAL':
    case 'ENOSPC':
      return Errors.invalidRequest(err.message);
    default:
      return err;
  }
}

export class Service {
  readonly registry: Registry;
  private readonly createdAt = new Map<string, Date>();
  private autoTimer?: NodeJS.Timeout;
  private extending = new Set<string>();
  private closed = false;
  /**
   * Merges waiting for their origin's NBD clients to disconnect, by origin. In memory only:
   * after a restart a merge that was pending is not, and the user asks again.
   */
  private readonly pendingMerges = new Map<string, { snapshot: string; rate: number | undefined }>();
  /** Snapshot by origin, for merges between their start and the engine taking them. */
  private readonly mergeStarting = new Map<string, string>();
  /** Each merging snapshot's chunk size, for the figures logged once it is gone. */
  private readonly mergeChunkSize = new Map<string, number>();
  /** Told when an export goes away, so its metric series can be dropped. */
  onExportRemoved?: (name: string) => void;

  private constructor(
    readonly cow: CowManager,
    private readonly opts: ServiceOptions,
    private readonly log: Logger,
  ) {
    this.registry = new Registry(opts.defaultVolume);
  }

  static async open(opts: ServiceOptions, log: Logger): Promise<Service> {
    const cowLog = log.child({ component: 'cow' });
    const cow = await CowManager.open(opts.dataDir, {
      logger: cowLog,
      usageThresholds: USAGE_WARNINGS,
      onCommit: opts.onCommit ? (s) => opts.onCommit!(s) : undefined,
      wrapDevice: testFaults(log),
      writeBehindBytes: opts.writeBehindBytes,
      // Incremental backups read only the chunks written since their parent's snapshot. A
      // read-only daemon writes nothing, and nothing it serves changes.
      changeTracking: !opts.readOnly,
    });
    const svc = new Service(cow, opts, log);
    // Before any origin is attached: a merge resumed there can finish while the others attach.
    cow.on('merge', (e) => svc.merged(e));
    try {
      for (const v of await listVolumes(opts.dataDir)) {
        const origin = await cow.attachOrigin(v.name);
        svc.exportOrigin(origin);
      }
      for (const s of cow.snapshotsOf()) {
        // A merge the engine resumed: the snapshot is on its way into the origin and serves no I/O.
        if (!s.merging) svc.exportSnapshot(s);
      }
    } catch (err) {
      await cow.close();
      throw err;
    }
    svc.registry.onConnectionClosed((exportName, left) => {
      if (left === 0) svc.startPending(exportName);
    });
    cow.on('usage', (e) => {
      log.warn(
        { snapshot: e.name, origin: e.origin, percent: e.percent, usedChunks: e.usedChunks, capacityChunks: e.capacityChunks },
        `snapshot ${e.name} is now ${e.percent.toFixed(2)}% full`,
      );
      void svc.autoExtend(e.name);
    });
    cow.on('invalidated', (e) => {
      log.error(
        {
          snapshot: e.name,
          origin: e.origin,
          reason: e.reason,
          why: INVALID_WHY[e.reason],
          detail: e.detail,
          usedChunks: e.usedChunks,
          capacityChunks: e.capacityChunks,
        },
        `snapshot ${e.name} invalidated`,
      );
    });
    if (opts.autoExtend.threshold < 100) {
      // Events can be missed across restarts; a slow sweep catches any snapshot above the threshold.
      svc.autoTimer = setInterval(() => {
        for (const s of cow.list()) void svc.autoExtend(s.name);
      }, 5000);
      svc.autoTimer.unref();
    }
    return svc;
  }

  get dataDir(): string {
    return this.opts.dataDir;
  }

  private readOnlyExport(name: string): boolean {
    return this.opts.readOnly || (this.opts.exportReadOnly?.(name) ?? false);
  }

  private describeOrigin(o: Origin): string {
    const snaps = this.cow.snapshotsOf(o.name);
    const n = snaps.length;
    const m = snaps.find((s) => s.merging);
    const merging = m ? `, merging snapshot ${m.name} (${mergeStatus(m.merging!.progress()).percent}%)` : '';
    return `origin volume ${o.name}, ${formatSize(o.size)}, ${n} snapshot${n === 1 ? '' : 's'}${merging}${this.readOnlyExport(o.name) ? ', read-only' : ''}`;
  }

  private describeSnapshot(s: Snapshot): string {
    const u = s.usage();
    const pct = u.capacityChunks ? ((100 * u.usedChunks) / u.capacityChunks).toFixed(1) : '0.0';
    const invalid = u.invalid ? ` (${invalidWhy(u.invalid, u.capacityChunks)})` : '';
    return (
      `snapshot of ${u.origin} taken at ${u.createdAt.toISOString()}, state ${u.state}${invalid}, ` +
      `${pct}% used (${u.usedChunks}/${u.capacityChunks} chunks of ${formatSize(u.chunkSize)}), ` +
      `${u.sparse ? 'sparse' : `${formatSize(u.reservedBytes)} reserved`}` +
      `${u.transient ? ', transient' : ''}${u.readOnly || this.readOnlyExport(s.name) ? ', read-only' : ''}`
    );
  }

  private exportOrigin(o: Origin): void {
    this.registry.add(new VolumeBackend(o, () => this.describeOrigin(o), this.readOnlyExport(o.name)), { defaultCandidate: true });
  }

  private exportSnapshot(s: Snapshot): void {
    const tracker = this.cow.tracker(s.origin.name);
    const checkpoint = tracker?.checkpointOf(s.name);
    // Only a read-only snapshot still reads exactly as the origin did at its checkpoint.
    const changes = tracker && checkpoint !== undefined && s.readOnly ? new ChangeContexts(tracker, checkpoint, s.size) : undefined;
    this.registry.add(new VolumeBackend(s, () => this.describeSnapshot(s), this.readOnlyExport(s.name) || s.readOnly, changes));
  }

  private nameFree(name: string): void {
    if (this.cow.origin(name) || this.cow.snapshot(name)) throw Errors.nameTaken(name);
  }

  volumes(): VolumeView[] {
    return this.registry
      .list()
      .filter((e) => this.cow.origin(e.name))
      .map((e) => ({
        name: e.name,
        size: e.size,
        snapshots: this.cow
          .snapshotsOf(e.name)
          .map((s) => s.name)
          .sort(),
      }));
  }

  async createVolume(name: string, size: number, opts: VolumeCreateOptions = {}): Promise<VolumeView> {
    checkName(name);
    this.nameFree(name);
    if (this.opts.readOnly) throw Errors.readOnly();
    await createVolume(this.opts.dataDir, name, size, opts);
    try {
      this.exportOrigin(await this.cow.attachOrigin(name));
    } catch (err) {
      await unlink(volumePath(this.opts.dataDir, name)).catch(() => undefined);
      throw err;
    }
    this.log.info({ volume: name, size, preallocate: opts.preallocate ?? false }, 'volume created');
    return { name, size, snapshots: [] };
  }

  async removeVolume(name: string): Promise<void> {
    checkName(name);
    if (!this.cow.origin(name)) throw Errors.unknownVolume(name);
    const snaps = this.cow.snapshotsOf(name);
    if (snaps.length) throw Errors.originBusy(name, `it has snapshots (${snaps.map((s) => s.name).join(', ')}); remove them first`);
    await this.registry.remove(name);
    this.onExportRemoved?.(name);
    await this.cow.detachOrigin(name);
    await unlink(volumePath(this.opts.dataDir, name));
    // Its change tracking describes a file that is gone; a new volume of that name starts afresh.
    await unlink(this.cow.trackerPath(name)).catch(() => undefined);
    this.log.info({ volume: name }, 'volume removed');
  }

  snapshots(): SnapshotView[] {
    return this.cow
      .list()
      .map((u) => this.snapshotView(u))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  snapshot(name: string): SnapshotView {
    const s = this.cow.snapshot(name);
    if (!s) throw Errors.unknownSnapshot(name);
    return this.snapshotView(s.usage());
  }

  private snapshotView(u: SnapshotUsage): SnapshotView {
    return { ...u, mergePending: this.mergePending(u.name, u.origin) };
  }

  private mergePending(snapshot: string, origin: string): PendingMerge | null {
    const p = this.pendingMerges.get(origin);
    if (p?.snapshot !== snapshot) return null;
    return { clients: this.registry.connections(origin), rate: p.rate ?? null };
  }

  async createSnapshot(o: SnapshotCreate): Promise<SnapshotUsage> {
    const [s] = await this.createSnapshots([o]);
    return s!.usage();
  }

  /** Several snapshots at one instant (a consistency group), each exported; all or none. */
  async createSnapshots(list: SnapshotCreate[]): Promise<Snapshot[]> {
    for (const o of list) {
      checkName(o.name);
      checkName(o.origin);
      this.nameFree(o.name);
      if (!this.cow.origin(o.origin)) throw Errors.unknownVolume(o.origin);
    }
    let snaps: Snapshot[];
    try {
      snaps = await this.cow.createSnapshots(list);
    } catch (err) {
      throw toCowbdError(err, { volume: list[0]?.origin, snapshot: list[0]?.name });
    }
    for (const s of snaps) this.exportSnapshot(s);
    return snaps;
  }

  /** lvextend: `size` is the new total, or added when `relative`. */
  async extendSnapshot(name: string, size: number, relative: boolean): Promise<SnapshotUsage> {
    const s = this.cow.snapshot(name);
    if (!s) throw Errors.unknownSnapshot(name);
    const current = s.usage().capacityBytes;
    const target = relative ? current + size : size;
    if (target < current) throw Errors.cannotShrink(name, formatSize(current));
    try {
      const u = await this.cow.extendSnapshot(name, target);
      this.log.info({ snapshot: name, from: current, to: u.capacityBytes }, 'snapshot extended');
      return u;
    } catch (err) {
      throw toCowbdError(err, { snapshot: name });
    }
  }

  async removeSnapshot(name: string): Promise<void> {
    const s = this.cow.snapshot(name);
    if (!s) throw Errors.unknownSnapshot(name);
    // Refused before its export is touched: a merging snapshot has none, one starting still has.
    if (s.merging || this.mergeStarting.get(s.origin.name) === name) throw toCowbdError(CowErrors.removeMerging(name), { snapshot: name });
    if (this.pendingMerges.get(s.origin.name)?.snapshot === name) {
      this.pendingMerges.delete(s.origin.name);
      this.log.info({ snapshot: name, origin: s.origin.name }, `pending merge of snapshot ${name} dropped: the snapshot is removed`);
    }
    // Connections first: they close cleanly, then the space is freed.
    await this.registry.remove(name);
    this.onExportRemoved?.(name);
    try {
      await this.cow.removeSnapshot(name);
    } catch (err) {
      throw toCowbdError(err, { snapshot: name });
    }
  }

  /**
   * lvconvert --merge: the origin becomes the snapshot's content, and the snapshot goes once its
   * chunks are copied back. While the origin has NBD clients the merge waits for the last one to
   * disconnect (a mounted file system must not see its blocks change); `now` refuses instead. On
   * a merge that runs, or waits, `rate` changes its bound (bytes a second, 0: none).
   */
  async mergeSnapshot(name: string, opts: { now?: boolean; rate?: number } = {}): Promise<MergeView> {
    checkName(name);
    const s = this.cow.snapshot(name);
    if (!s) throw Errors.unknownSnapshot(name);
    const origin = s.origin.name;
    if (s.merging) {
      if (opts.rate === undefined) throw Errors.merging(`snapshot ${name} is already merging into ${origin}; --rate changes its bound`);
      this.cow.setMergeRate(name, opts.rate);
      this.log.info({ snapshot: name, origin, rate: opts.rate }, `merge rate of snapshot ${name} now ${rateText(opts.rate)}`);
      return this.mergeView(s);
    }
    const starting = this.mergeStarting.get(origin);
    if (starting) throw Errors.merging(`origin ${origin} is starting a merge of snapshot ${starting}`);
    const pending = this.pendingMerges.get(origin);
    if (pending && pending.snapshot !== name) throw Errors.mergePending(origin, pending.snapshot);
    this.checkMergeable(s);
    const clients = this.registry.connections(origin);
    if (opts.now && clients > 0) throw Errors.mergeDeferred(origin, clients);
    if (pending) {
      // Asking again with --rate changes the bound it will start with.
      if (opts.rate !== undefined) pending.rate = opts.rate;
      return this.mergeView(s);
    }
    if (clients > 0 || !(await this.startMerge(s, opts.rate))) this.deferMerge(s, opts.rate);
    return this.mergeView(s);
  }

  /** The engine's refusals, asked before the snapshot's export is taken down. */
  private checkMergeable(s: Snapshot): void {
    try {
      this.cow.checkMergeable(s.name);
    } catch (err) {
      throw toCowbdError(err, { volume: s.origin.name, snapshot: s.name });
    }
  }

  private deferMerge(s: Snapshot, rate: number | undefined): void {
    const origin = s.origin.name;
    const clients = this.registry.connections(origin);
    this.pendingMerges.set(origin, { snapshot: s.name, rate });
    this.log.info(
      { snapshot: s.name, origin, clients },
      `merge of snapshot ${s.name} pending: ${clients} client${clients === 1 ? '' : 's'} on ${origin}`,
    );
  }

  /**
   * Takes the snapshot's export down and hands the merge to the engine; false, with the export
   * back, when a client reached the origin meanwhile. A refusal leaves the snapshot served as it was.
   */
  private async startMerge(s: Snapshot, rate: number | undefined): Promise<boolean> {
    const name = s.name;
    const origin = s.origin.name;
    this.mergeStarting.set(origin, name);
    try {
      // Its connections close first, their requests answered: once its chunks are being copied
      // back nothing may write to it.
      await this.registry.remove(name);
      this.onExportRemoved?.(name);
      if (this.registry.connections(origin) > 0) {
        this.exportSnapshot(s);
        return false;
      }
      try {
        await this.cow.mergeSnapshot(name, { rate });
      } catch (err) {
        if (this.cow.snapshot(name) === s && !s.merging) this.exportSnapshot(s);
        throw toCowbdError(err, { volume: origin, snapshot: name });
      }
      return true;
    } finally {
      this.mergeStarting.delete(origin);
    }
  }

  /** The origin's last NBD client is gone: a merge waiting for that starts. */
  private startPending(origin: string): void {
    const p = this.pendingMerges.get(origin);
    if (!p || this.closed || this.mergeStarting.has(origin)) return;
    const s = this.cow.snapshot(p.snapshot);
    this.pendingMerges.delete(origin);
    if (!s) return;
    this.log.info({ snapshot: p.snapshot, origin }, `last NBD client of ${origin} disconnected: merging snapshot ${p.snapshot}`);
    this.startMerge(s, p.rate).then(
      (started) => {
        if (!started) this.deferMerge(s, p.rate);
      },
      (err: unknown) =>
        this.log.error(
          { err, snapshot: p.snapshot, origin },
          `pending merge of snapshot ${p.snapshot} into ${origin} failed: ${err instanceof Error ? err.message : String(err)}`,
        ),
    );
  }

  private mergeView(s: Snapshot): MergeView {
    const origin = s.origin.name;
    const progress = s.merging?.progress() ?? null;
    return {
      snapshot: s.name,
      origin,
      state: progress ? 'merging' : 'pending',
      clients: this.registry.connections(origin),
      rate: progress ? progress.rate : (this.pendingMerges.get(origin)?.rate ?? null),
      progress,
    };
  }

  /** The engine logs a merge's start and end; the daemon adds the throughput, and its errors. */
  private merged(e: MergeEvent): void {
    if (e.phase === 'error') {
      this.log.error(
        { err: e.error, snapshot: e.name, origin: e.origin, mergedChunks: e.mergedChunks, totalChunks: e.totalChunks },
        `merge of snapshot ${e.name} into ${e.origin} failed: ${e.error instanceof Error ? e.error.message : String(e.error)}`,
      );
      return;
    }
    if (e.phase === 'started' || e.phase === 'resumed') {
      const s = this.cow.snapshot(e.name);
      if (s) this.mergeChunkSize.set(e.name, s.pool.chunkSize);
      return;
    }
    this.createdAt.delete(e.name);
    const bytes = e.totalChunks * (this.mergeChunkSize.get(e.name) ?? 0);
    this.mergeChunkSize.delete(e.name);
    const mibPerSecond = e.seconds > 0 ? Number((bytes / 2 ** 20 / e.seconds).toFixed(1)) : null;
    this.log.info(
      { snapshot: e.name, origin: e.origin, chunks: e.totalChunks, bytes, seconds: e.seconds, mibPerSecond },
      `snapshot ${e.name} merged into ${e.origin} and removed`,
    );
  }

  status(): StatusRow[] {
    const rows: StatusRow[] = [];
    for (const v of this.volumes()) {
      rows.push({
        name: v.name,
        kind: 'origin',
        size: v.size,
        origin: null,
        chunkSize: null,
        usedPercent: null,
        state: 'active',
        storeSize: null,
        sparse: null,
        reservedBytes: null,
        usedBytes: null,
        invalid: null,
        merge: null,
        mergePending: null,
      });
    }
    for (const u of this.snapshots()) {
      const origin = this.cow.origin(u.origin);
      rows.push({
        name: u.name,
        kind: 'snapshot',
        size: origin?.size ?? 0,
        origin: u.origin,
        chunkSize: u.chunkSize,
        usedPercent: u.capacityChunks ? (100 * u.usedChunks) / u.capacityChunks : 0,
        state: u.state,
        storeSize: u.capacityBytes,
        sparse: u.sparse,
        reservedBytes: u.reservedBytes,
        usedBytes: u.usedBytes,
        invalid: u.invalid,
        merge: u.merge ? mergeStatus(u.merge) : null,
        mergePending: u.mergePending,
      });
    }
    return rows;
  }

  /** Grows a snapshot past the threshold by `percent`, within the maximum and free disk. */
  async autoExtend(name: string): Promise<void> {
    const p = this.opts.autoExtend;
    if (p.threshold >= 100 || this.closed || this.extending.has(name)) return;
    const s = this.cow.snapshot(name);
    if (!s) return;
    const u = s.usage();
    if (u.state === 'invalid' || u.capacityChunks === 0) return;
    const pct = (100 * u.usedChunks) / u.capacityChunks;
    if (pct < p.threshold) return;
    this.extending.add(name);
    try {
      let grow = Math.max(u.chunkSize, Math.ceil((u.capacityBytes * p.percent) / 100 / u.chunkSize) * u.chunkSize);
      if (p.maxBytes > 0) grow = Math.min(grow, p.maxBytes - u.capacityBytes);
      const fs = await statfs(this.opts.dataDir);
      const free = Number(fs.bavail) * Number(fs.bsize) - FREE_DISK_RESERVE;
      grow = Math.min(grow, Math.floor(free / u.chunkSize) * u.chunkSize);
      if (grow < u.chunkSize) {
        this.log.warn(
          { snapshot: name, usedPercent: pct, capacityBytes: u.capacityBytes, maxBytes: p.maxBytes, freeBytes: free },
          `snapshot ${name} cannot be auto-extended: at its maximum or out of disk`,
        );
        return;
      }
      const after = await this.cow.extendSnapshot(name, u.capacityBytes + grow);
      this.log.info(
        {
          snapshot: name,
          usedPercent: pct,
          fromBytes: u.capacityBytes,
          toBytes: after.capacityBytes,
          usedChunks: after.usedChunks,
          capacityChunks: after.capacityChunks,
        },
        `snapshot ${name} auto-extended`,
      );
    } catch (err) {
      const e = toCowbdError(err, { snapshot: name });
      // Out of disk is the file system's state, not a fault here: the snapshot keeps its size.
      if (isCowbdError(e, Errors.noSpace))
        this.log.warn({ snapshot: name, usedPercent: pct }, `snapshot ${name} cannot be auto-extended: ${e.message}`);
      else this.log.error({ err, snapshot: name }, 'auto-extend failed');
    } finally {
      this.extending.delete(name);
    }
  }

  async flushAll(): Promise<void> {
    for (const b of this.registry.backends()) {
      // An invalid snapshot has nothing to flush: its I/O fails, and so would the flush, logging an error at every clean stop.
      if (b instanceof VolumeBackend && b.volume.state === 'invalid') continue;
      await b.flush().catch((err: unknown) => this.log.error({ err, export: b.info.name }, 'flush failed'));
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.autoTimer);
    await this.cow.close();
  }
}
