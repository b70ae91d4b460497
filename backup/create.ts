// `cowbd backup create VOL...`: snapshots of every volume at one instant (frozen if
// asked), each read through the daemon, stored, and listed only once all of it is
// durable: manifests are written last, so a backup cut short at any point lists nothing.
import { hostname } from 'node:os';
import { BackupErrors } from './errors.js';
import { freeze } from './freeze.js';
import type { Progress, ProgressFigures } from './progress.js';
import { newManifestId, type Manifest, type ManifestHeader, type Repository } from './repository.js';
import { backupVolume, wantedContexts, type SnapshotExport, type Stats, type VolumeSource } from './volume-backup.js';

/** What a backup asks of the running daemon. */
export interface DaemonLink {
  /** Read-only snapshots of every volume at one instant, each with its checkpoint. */
  snapshotVolumes(volumes: string[], storeBytes: number | undefined): Promise<VolumeSource[]>;
  /** An existing snapshot as a source (its origin, size, and checkpoint if it has one). */
  snapshotSource(name: string): Promise<VolumeSource>;
  removeSnapshot(name: string): Promise<void>;
  /** Byte ranges of a snapshot the backup took and has read: its origin's writes stop copying them. */
  release(name: string, ranges: Array<[number, number]>): Promise<void>;
  /** The snapshot's export over the daemon's private NBD socket, with the contexts granted of those asked. */
  open(exportName: string, contexts: string[]): Promise<SnapshotExport & { close(): Promise<void> }>;
  /** Why a snapshot's reads fail, when it was invalidated (its store filled). */
  invalidReason(name: string): Promise<string | undefined>;
  /** Tells the daemon the outcome, for its metrics and log. */
  report(r: BackupReport): Promise<void>;
}

export interface BackupReport {
  volume: string;
  repository: string;
  ok: boolean;
  id?: string;
  error?: string;
  stats?: Stats;
  mode?: string;
}

export interface CreateOptions {
  repo: Repository;
  /** Shown in reports and metrics: the repository as the user named it. */
  repoName: string;
  volumes: string[];
  fromSnapshot?: string;
  keepSnapshot: boolean;
  storeBytes?: number;
  freeze?: { mountpoint: string; timeoutMs: number };
  progress: Progress;
  log?: (msg: string) => void;
}

export interface CreatedBackup {
  header: ManifestHeader;
  mode: string;
}

/**
 * The backup to build on: the newest of the volume whose checkpoint the daemon's tracking
 * can diff against (same tracker, earlier checkpoint), else the newest of the volume.
 */
function parentOf(headers: ManifestHeader[], src: VolumeSource): ManifestHeader | undefined {
  const mine = headers.filter((h) => h.volume === src.volume).sort((a, b) => b.time.localeCompare(a.time));
  const c = src.checkpoint;
  const usable =
    c && mine.find((h) => h.checkpoint?.tracker === c.tracker && h.checkpoint.generation < c.generation && h.size === src.size);
  return usable || mine[0];
}

async function takeSnapshots(link: DaemonLink, o: CreateOptions): Promise<VolumeSource[]> {
  if (o.fromSnapshot) {
    const src = await link.snapshotSource(o.fromSnapshot);
    if (o.volumes.length !== 1 || src.volume !== o.volumes[0])
      throw BackupErrors.wrongOrigin(o.fromSnapshot, src.volume, o.volumes.join(' '));
    return [src];
  }
  if (!o.freeze) return link.snapshotVolumes(o.volumes, o.storeBytes);
  const frozen = await freeze(o.freeze.mountpoint, o.freeze.timeoutMs);
  let sources: VolumeSource[];
  try {
    sources = await link.snapshotVolumes(o.volumes, o.storeBytes);
  } catch (err) {
    await frozen.thaw().catch(() => undefined);
    throw err;
  }
  try {
    await frozen.thaw();
  } catch (err) {
    // Thawed by the bound before the snapshots were taken: they may not be consistent.
    for (const s of sources) await link.removeSnapshot(s.snapshot).catch(() => undefined);
    throw err;
  }
  return sources;
}

export async function createBackup(link: DaemonLink, o: CreateOptions): Promise<CreatedBackup[]> {
  const { repo } = o;
  const lock = await repo.lock(false, `backup of ${o.volumes.join(', ')}`);
  const made: VolumeSource[] = [];
  const reported = new Set<string>();
  try {
    await repo.loadIndex();
    const { headers } = await repo.listManifests();
    const sources = await takeSnapshots(link, o);
    if (!o.fromSnapshot) made.push(...sources);
    const group = sources.length > 1 ? newManifestId() : undefined;
    const writer = repo.newWriter();
    const results: Array<{ src: VolumeSource; manifest: Manifest; mode: string }> = [];
    const total = sources.reduce((n, s) => n + s.size, 0);
    let before = { done: 0, read: 0, newBytes: 0, dedupBytes: 0 };
    try {
      for (const src of sources) {
        const ph = parentOf(headers, src);
        const parent = ph ? await repo.loadManifest(ph.id).catch(() => undefined) : undefined;
        const nbd = await link.open(src.snapshot, wantedContexts(src, parent, repo.chunkSize));
        let out: Awaited<ReturnType<typeof backupVolume>>;
        try {
          const base = before;
          // Only a snapshot this backup took and removes may give up chunks it has read.
          const release = o.fromSnapshot || o.keepSnapshot ? undefined : (r: Array<[number, number]>) => link.release(src.snapshot, r);
          out = await backupVolume(repo, writer, src, nbd, parent, release, (f: ProgressFigures) =>
            o.progress.update({
              done: base.done + f.done,
              total,
              read: base.read + f.read,
              newBytes: base.newBytes + f.newBytes,
              dedupBytes: base.dedupBytes + f.dedupBytes,
            }),
          );
        } catch (err) {
          const reason = await link.invalidReason(src.snapshot).catch(() => undefined);
          if (reason) throw BackupErrors.snapshotInvalidated(src.snapshot, reason);
          throw err;
        } finally {
          await nbd.close().catch(() => undefined);
        }
        before = {
          done: before.done + src.size,
          read: before.read + out.stats.bytesRead,
          newBytes: before.newBytes + out.stats.newBytes,
          dedupBytes: before.dedupBytes + out.stats.dedupBytes,
        };
        const manifest: Manifest = {
          id: newManifestId(),
          volume: src.volume,
          size: src.size,
          chunkSize: repo.chunkSize,
          time: new Date().toISOString(),
          ...(parent ? { parent: parent.id } : {}),
          ...(group ? { group } : {}),
          snapshot: src.snapshot,
          host: hostname(),
          ...(src.checkpoint ? { checkpoint: src.checkpoint } : {}),
          stats: out.stats,
          chunks: out.chunks,
        };
        results.push({ src, manifest, mode: out.mode });
        o.log?.(
          `${src.volume}: ${out.mode} backup read ${out.stats.bytesRead} bytes, ${out.stats.newBytes} new, ${out.stats.dedupBytes} deduplicated`,
        );
      }
      await writer.finish();
    } catch (err) {
      await writer.abort().catch(() => undefined);
      throw err;
    }
    // Every chunk is durable: now the manifests, each one file written whole, if no prune could have
    // run meanwhile (a lost lock means one might have deleted chunks this backup found already stored).
    await lock.check();
    for (const r of results) await repo.saveManifest(r.manifest);
    for (const r of results) {
      reported.add(r.src.volume);
      await link
        .report({ volume: r.src.volume, repository: o.repoName, ok: true, id: r.manifest.id, stats: r.manifest.stats, mode: r.mode })
        .catch(() => undefined);
    }
    return results.map((r) => {
      const { chunks: _chunks, ...header } = r.manifest;
      return { header, mode: r.mode };
    });
  } catch (err) {
    for (const v of o.volumes)
      if (!reported.has(v))
        await link.report({ volume: v, repository: o.repoName, ok: false, error: (err as Error).message }).catch(() => undefined);
    throw err;
  } finally {
    o.progress.stop();
    if (!o.keepSnapshot) for (const s of made) await link.removeSnapshot(s.snapshot).catch(() => undefined);
    await lock.release().catch(() => undefined);
  }
}
