// Checks a repository: every manifest decodes, every chunk it names is in the index and its pack
// exists with the size the index says; with readData, every pack is read whole and every blob in
// it decompressed and hashed. Damage is named, with the backups that use a damaged chunk.
import { createHash } from 'node:crypto';
import { BackupErrors, isBackupError } from './errors.js';
import type { Repository } from './repository.js';

export interface Damage {
  what: 'backup' | 'chunk' | 'pack';
  id: string;
  reason: string;
}

export interface VerifyOptions {
  id?: string;
  readData: boolean;
  onProgress?(done: number, total: number): void;
}

export async function verifyRepository(
  repo: Repository,
  o: VerifyOptions,
): Promise<{ backups: number; chunks: number; damaged: Damage[] }> {
  await repo.loadIndex();
  const damaged: Damage[] = [];
  let ids: string[];
  if (o.id !== undefined) {
    ids = [(await repo.loadManifest(o.id)).id];
  } else {
    const list = await repo.listManifests();
    for (const d of list.damaged) damaged.push({ what: 'backup', id: d.file, reason: d.reason });
    ids = list.headers.map((h) => h.id);
  }

  const packsToRead = o.readData ? (o.id === undefined ? [...repo.packs.keys()] : []) : [];
  let total = ids.length + packsToRead.length;
  let done = 0;
  const users = new Map<string, string[]>();
  let backups = 0;
  for (const id of ids) {
    try {
      const m = await repo.loadManifest(id);
      backups++;
      for (const [, chunk] of m.chunks.entries()) {
        const hex = chunk.toString('hex');
        const u = users.get(hex);
        if (!u) users.set(hex, [id]);
        else if (u[u.length - 1] !== id) u.push(id);
      }
    } catch (e) {
      damaged.push({ what: 'backup', id, reason: (e as Error).message });
    }
    o.onProgress?.(++done, total);
  }

  const bad = new Map<string, string>();
  const packSize = new Map<string, number | undefined>();
  for (const hex of users.keys()) {
    const loc = repo.locate(hex);
    if (!loc) {
      bad.set(hex, 'not in the index');
      continue;
    }
    if (!packSize.has(loc.pack)) {
      packSize.set(
        loc.pack,
        await repo.storage.stat('data', loc.pack).then(
          (s) => s?.size,
          (e: unknown) => {
            if (isBackupError(e, BackupErrors.storage)) throw e;
            return undefined;
          },
        ),
      );
    }
    const have = packSize.get(loc.pack);
    const want = repo.packs.get(loc.pack)?.size;
    if (have === undefined) bad.set(hex, `its pack ${loc.pack} is missing`);
    else if (have !== want) bad.set(hex, `its pack ${loc.pack} is ${have} bytes, the index says ${want}`);
  }
  for (const [pack, why] of repo.unreadablePacks) damaged.push({ what: 'pack', id: pack, reason: why });

  if (o.readData) {
    if (o.id !== undefined) {
      const mine = new Set<string>();
      for (const hex of users.keys()) {
        const loc = repo.locate(hex);
        if (loc) mine.add(loc.pack);
      }
      packsToRead.push(...mine);
      total += mine.size;
    }
    for (const pack of packsToRead) {
      await readPack(repo, pack, bad, damaged);
      o.onProgress?.(++done, total);
    }
  }

  const perBackup = new Map<string, number>();
  for (const [hex, why] of bad) {
    const u = users.get(hex) ?? [];
    damaged.push({ what: 'chunk', id: hex, reason: u.length ? `${why}; used by backups ${u.join(', ')}` : `${why}; used by no backup` });
    for (const id of u) perBackup.set(id, (perBackup.get(id) ?? 0) + 1);
  }
  for (const [id, n] of perBackup) damaged.push({ what: 'backup', id, reason: `${n} of its chunks are damaged or missing` });
  return { backups, chunks: users.size, damaged };
}

async function readPack(repo: Repository, pack: string, bad: Map<string, string>, damaged: Damage[]): Promise<void> {
  let data: Buffer | undefined;
  try {
    data = await repo.loadPack(pack);
  } catch (e) {
    if (isBackupError(e, BackupErrors.storage)) throw e;
    damaged.push({ what: 'pack', id: pack, reason: (e as Error).message });
    return;
  }
  if (!data) {
    damaged.push({ what: 'pack', id: pack, reason: 'it is gone' });
    return;
  }
  if (createHash('sha256').update(data).digest('hex') !== pack)
    damaged.push({ what: 'pack', id: pack, reason: 'its SHA-256 does not match its name' });
  for (const b of repo.packs.get(pack)?.blobs ?? []) {
    const hex = b.id.toString('hex');
    const inUse = repo.locate(hex)?.pack === pack;
    try {
      if (b.offset + b.length > data.length) throw new Error(`pack is truncated at ${data.length} bytes`);
      await repo.unpack(hex, { pack, rawLength: b.rawLength, compressed: b.compressed }, data.subarray(b.offset, b.offset + b.length));
    } catch (e) {
      const why = (e as Error).message;
      if (inUse) bad.set(hex, why);
      else damaged.push({ what: 'pack', id: pack, reason: `a second copy of chunk ${hex}: ${why}` });
    }
  }
}
