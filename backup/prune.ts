// Forgets the backups a keep policy does not keep, then frees the chunks no remaining backup
// uses: packs with nothing used are deleted, packs with more than REPACK_UNUSED_FRACTION unused
// are rewritten. New packs and the new index are durable before anything old is deleted. A pack
// holding chunks of no backup at all (a backup still running elsewhere) is left alone until it
// is older than the grace period.
import { PackWriter } from './blob-writer.js';
import { BackupErrors } from './errors.js';
import { type KeepPolicy, keptByPolicy } from './keep-policy.js';
import type { ManifestHeader } from './manifest.js';
import type { Repository } from './repository.js';

export type { KeepPolicy } from './keep-policy.js';

/** A partly used pack is rewritten when more than this fraction of it is unused; see docs/backup-repository.md, "Prune". */
export const REPACK_UNUSED_FRACTION = 1 / 5;
/** Packs with chunks of no backup stay this long: a backup on another host may still name them; see docs/backup-repository.md, "Prune". */
export const PRUNE_GRACE_MS = 60 * 60 * 1000;

export interface PruneOptions {
  keep: KeepPolicy;
  volume?: string;
  dryRun?: boolean;
  /** Accepted for policies relative to the present; the count-based rules here do not use it. */
  now?: Date;
  /** PRUNE_GRACE_MS unless given. */
  graceMs?: number;
}

export interface PruneResult {
  kept: string[];
  forgotten: string[];
  packsDeleted: number;
  packsRewritten: number;
  bytesFreed: number;
  /** Packs left alone because they hold chunks of no backup and are younger than the grace period. */
  packsInGrace: number;
}

/** The backups to forget: per volume by policy, then whole consistency groups kept if any member is. */
export function selectForgotten(headers: readonly ManifestHeader[], keep: KeepPolicy, volume?: string): Set<string> {
  const kept = new Set<string>();
  const byVolume = new Map<string, ManifestHeader[]>();
  for (const h of headers) {
    if (volume !== undefined && h.volume !== volume) kept.add(h.id);
    else byVolume.set(h.volume, [...(byVolume.get(h.volume) ?? []), h]);
  }
  for (const list of byVolume.values()) for (const id of keptByPolicy(list, keep)) kept.add(id);
  const keptGroups = new Set(headers.filter((h) => h.group !== undefined && kept.has(h.id)).map((h) => h.group));
  for (const h of headers) if (h.group !== undefined && keptGroups.has(h.group)) kept.add(h.id);
  return new Set(headers.filter((h) => !kept.has(h.id)).map((h) => h.id));
}

export async function prune(repo: Repository, o: PruneOptions): Promise<PruneResult> {
  const lock = await repo.lock(true, 'prune');
  try {
    await repo.loadIndex();
    const { headers, damaged } = await repo.listManifests();
    const first = damaged[0];
    if (first) throw BackupErrors.damagedManifest(first.file, `${first.reason}; prune will not run while a backup's chunks are unknown`);
    const forgotten = selectForgotten(headers, o.keep, o.volume);
    const kept = headers.filter((h) => !forgotten.has(h.id)).map((h) => h.id);

    const used = new Set<string>();
    for (const id of kept) for (const [, chunk] of (await repo.loadManifest(id)).chunks.entries()) used.add(chunk.toString('hex'));
    // Chunks of the backups forgotten now: unused, but known, so no grace is owed to them.
    const known = new Set(used);
    for (const id of forgotten) for (const [, chunk] of (await repo.loadManifest(id)).chunks.entries()) known.add(chunk.toString('hex'));

    const graceMs = o.graceMs ?? PRUNE_GRACE_MS;
    const now = Date.now();
    const deletes: string[] = [];
    const rewrites: string[] = [];
    let bytesFreed = 0;
    let packsInGrace = 0;
    for (const [pack, info] of repo.packs) {
      let usedBytes = 0;
      let blobBytes = 0;
      let orphans = false;
      for (const b of info.blobs) {
        blobBytes += b.length;
        const hex = b.id.toString('hex');
        if (used.has(hex) && repo.locate(hex)?.pack === pack) usedBytes += b.length;
        else if (!known.has(hex)) orphans = true;
      }
      const garbage = usedBytes === 0 || blobBytes - usedBytes > blobBytes * REPACK_UNUSED_FRACTION;
      if (garbage && orphans && graceMs > 0) {
        const st = await repo.storage.stat('data', pack);
        if (st && now - st.mtimeMs < graceMs) {
          packsInGrace++;
          continue;
        }
      }
      if (usedBytes === 0) {
        deletes.push(pack);
        bytesFreed += info.size;
      } else if (blobBytes - usedBytes > blobBytes * REPACK_UNUSED_FRACTION) {
        // Blob bytes only: a small pack is mostly trailer, and rewriting it would free nothing.
        rewrites.push(pack);
        bytesFreed += blobBytes - usedBytes; // an estimate: the new pack's trailer is smaller too
      }
    }
    const result = {
      kept,
      forgotten: [...forgotten],
      packsDeleted: deletes.length,
      packsRewritten: rewrites.length,
      bytesFreed,
      packsInGrace,
    };
    if (o.dryRun) return result;

    await lock.check();
    for (const id of forgotten) await repo.removeManifest(id);
    let newBytes = 0;
    if (rewrites.length > 0) {
      const writer = new PackWriter(repo);
      try {
        for (const pack of rewrites) {
          const data = await repo.loadPack(pack);
          if (!data) throw BackupErrors.damagedPack(pack, 'it vanished during prune');
          for (const b of repo.packs.get(pack)!.blobs) {
            const hex = b.id.toString('hex');
            if (!used.has(hex) || repo.locate(hex)?.pack !== pack) continue;
            const stored = data.subarray(b.offset, b.offset + b.length);
            // A damaged blob must not be copied as if it were good: this throws and prune stops before deleting anything.
            await repo.unpack(hex, { pack, rawLength: b.rawLength, compressed: b.compressed }, stored);
            await writer.addStored(b, stored);
          }
        }
        newBytes = (await writer.finish()).storedBytes;
      } catch (e) {
        await writer.abort();
        throw e;
      }
    }
    const old = [...deletes, ...rewrites];
    let oldBytes = 0;
    for (const pack of old) oldBytes += repo.packs.get(pack)!.size;
    if (old.length > 0) {
      repo.dropPacks(old);
      const keepIndex = await repo.writeIndexFile([...repo.packs].map(([id, p]) => ({ id, size: p.size, blobs: p.blobs })));
      for (const name of await repo.storage.list('index')) if (name !== keepIndex) await repo.storage.remove('index', name);
      for (const pack of old) await repo.storage.remove('data', pack);
    }
    await repo.storage.removeLeftovers();
    result.bytesFreed = oldBytes - newBytes;
    return result;
  } finally {
    await lock.release();
  }
}
