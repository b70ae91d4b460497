// What `cowbd backup create` and restore do with a repository, in a few lines, so tests can make
// backups of in-memory volumes and read them back.
import { createHash } from 'node:crypto';
import os from 'node:os';
import { ChunkTable, type Manifest, newManifestId, type Repository } from '../../backup/repository.js';

export const CHUNK = 65536;

export const sha = (b: Buffer): Buffer => createHash('sha256').update(b).digest();

/** A volume of `chunks` chunks: chunk i is random when i % 3 === 0, text when i % 3 === 1, zero otherwise. */
export function sampleVolume(chunks: number, seed = 1): Buffer {
  const v = Buffer.alloc(chunks * CHUNK);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < chunks; i++) {
    const c = v.subarray(i * CHUNK, (i + 1) * CHUNK);
    if (i % 3 === 0) {
      for (let j = 0; j < CHUNK; j += 4) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        c.writeUInt32LE(x >>> 0, j);
      }
    } else if (i % 3 === 1) {
      c.fill(`chunk ${i} of seed ${seed}\n`);
    }
  }
  return v;
}

export async function backupVolume(
  repo: Repository,
  volume: string,
  data: Buffer,
  o: { time?: string; group?: string; parent?: string } = {},
): Promise<Manifest> {
  const started = Date.now();
  const count = Math.ceil(data.length / CHUNK);
  const chunks = new ChunkTable(count);
  const w = repo.newWriter();
  const stats = { bytesRead: 0, newBytes: 0, dedupBytes: 0, storedBytes: 0, zeroChunks: 0, chunks: count, durationMs: 0 };
  for (let i = 0; i < count; i++) {
    const c = data.subarray(i * CHUNK, Math.min(data.length, (i + 1) * CHUNK));
    stats.bytesRead += c.length;
    if (c.every((b) => b === 0)) {
      stats.zeroChunks++;
      continue;
    }
    const id = repo.chunkId(c);
    chunks.set(i, id);
    const r = await w.add(id, c);
    if (r.fresh) stats.newBytes += c.length;
    else stats.dedupBytes += c.length;
    stats.storedBytes += r.storedBytes;
  }
  await w.finish();
  stats.durationMs = Date.now() - started;
  const m: Manifest = {
    id: newManifestId(),
    volume,
    size: data.length,
    chunkSize: CHUNK,
    time: o.time ?? new Date().toISOString(),
    snapshot: `${volume}-backup`,
    host: os.hostname(),
    stats,
    chunks,
  };
  if (o.group) m.group = o.group;
  if (o.parent) m.parent = o.parent;
  await repo.saveManifest(m);
  return m;
}

export async function restore(repo: Repository, idOrPrefix: string): Promise<Buffer> {
  const m = await repo.loadManifest(idOrPrefix);
  const out = Buffer.alloc(m.size);
  for (const [i, id] of m.chunks.entries()) (await repo.readBlob(id)).copy(out, i * CHUNK);
  return out;
}
