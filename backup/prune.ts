// Forgets the backups a keep policy does not keep, then frees the chunks no remaining backup
// uses: packs with nothing used are deleted, packs with more than REPACK_UNUSED_FRACTION unused
// are rewritten. New packs and the new index are durable before anything old is deleted.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { PackWriter } from './blob-writer.js';
import { fsyncDir, TEMP_SUFFIX } from './durable-file.js';
import { BackupErrors } from './errors.js';
import { type KeepPolicy, keptByPolicy } from './keep-policy.js';
import type { ManifestHeader } from './manifest.js';
import type { Repository } from './repository.js';

export type { KeepPolicy } from './keep-policy.js';

/** A partly used pack is rewritten when more than this fraction of it is unused; see docs/backup-repository.md, "Prune". */
export const REPACK_UNUSED_FRACTION = 1 / 5;

export interface PruneOptions {
  keep: KeepPolicy;
  volume?: string;
  dryRun?: boolean;
  /** Accepted for policies relative to the present; the count-based rules here do not use it. */
  now?: Date;
}

export interface PruneResult {
  kept: string[];
  forgotten: string[];
  packsDeleted: number;
  packsRewritten: number;
  bytesFreed: number;
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

    const deletes: string[] = [];
    const rewrites: string[] = [];
    let bytesFreed = 0;
    for (const [pack, info] of repo.packs) {
      let usedBytes = 0;
      let blobBytes = 0;
      for (const b of info.blobs) {
        blobBytes += b.length;
        const hex = b.id.toString('hex');
        if (used.has(hex) && repo.locate(hex)?.pack === pack) usedBytes += b.length;
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
    const result = { kept, forgotten: [...forgotten], packsDeleted: deletes.length, packsRewritten: rewrites.length, bytesFreed };
    if (o.dryRun) return result;

    for (const id of forgotten) await repo.removeManifest(id);
    let newBytes = 0;
    if (rewrites.length > 0) {
      const writer = new PackWriter(repo);
      try {
        for (const pack of rewrites) {
          const data = await fs.readFile(repo.packPath(pack));
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
      const indexDir = path.join(repo.dir, 'index');
      const keepIndex = await repo.writeIndexFile([...repo.packs].map(([id, p]) => ({ id, size: p.size, blobs: p.blobs })));
      for (const name of await fs.readdir(indexDir)) if (name !== keepIndex) await fs.rm(path.join(indexDir, name), { force: true });
      await fsyncDir(indexDir);
      const dirs = new Set<string>();
      for (const pack of old) {
        const file = repo.packPath(pack);
        await fs.rm(file, { force: true });
        dirs.add(path.dirname(file));
      }
      for (const d of dirs) await fsyncDir(d);
    }
    await removeTempFiles(repo.dir);
    result.bytesFreed = oldBytes - newBytes;
    return result;
  } finally {
    await lock.release();
  }
}

/** Temp files left by killed writers: safe to remove under the exclusive lock, which no writer holds. */
async function removeTempFiles(dir: string): Promise<void> {
  for (const sub of ['data', 'index', 'backups']) {
    const d = path.join(dir, sub);
    const names = await fs.readdir(d).catch(() => [] as string[]);
    for (const n of names) if (n.endsWith(TEMP_SUFFIX)) await fs.rm(path.join(d, n), { force: true });
  }
}
