// `cowbd backup restore`: the image back, chunk by chunk, each checked against its id
// before it is written (and, asked to, read back after); zero chunks are left as holes,
// so the target must start out zero (a new sparse file or a new volume).
import { BackupErrors } from './errors.js';
import type { Progress, ProgressFigures } from './progress.js';
import type { Manifest, Repository } from './repository.js';

export interface RestoreTarget {
  write(buf: Buffer, offset: number): Promise<void>;
  read(buf: Buffer, offset: number): Promise<void>;
  /** Makes every write durable. */
  flush(): Promise<void>;
}

/** Chunks fetched and written at once: enough to keep the threadpool and the disk busy. */
const IN_FLIGHT = 8;
/** Chunks each worker asks for at once (16 × 64 KiB = 1 MiB reads from a pack). */
const BATCH_CHUNKS = 16;

export interface RestoreStats {
  chunks: number;
  bytesWritten: number;
  zeroChunks: number;
  durationMs: number;
}

export async function restoreImage(
  repo: Repository,
  m: Manifest,
  target: RestoreTarget,
  progress: Progress,
  verify = false,
): Promise<RestoreStats> {
  const started = Date.now();
  const entries = [...m.chunks.entries()];
  const f: ProgressFigures = { done: 0, total: m.size, read: 0, newBytes: 0, dedupBytes: 0 };
  const stats: RestoreStats = { chunks: m.chunks.count, bytesWritten: 0, zeroChunks: m.chunks.count - entries.length, durationMs: 0 };
  f.done = m.size - entries.reduce((n, [i]) => n + Math.min(m.chunkSize, m.size - i * m.chunkSize), 0);
  let next = 0;
  const worker = async () => {
    while (next < entries.length) {
      // Neighbouring chunks usually sit next to each other in a pack: one read fetches them all.
      const batch = entries.slice(next, next + BATCH_CHUNKS);
      next += batch.length;
      const reads = repo.readBlobs(batch.map(([, id]) => id));
      for (const r of reads) r.catch(() => undefined);
      for (let k = 0; k < batch.length; k++) {
        const [i, id] = batch[k]!;
        const data = await reads[k]!;
        const expect = Math.min(m.chunkSize, m.size - i * m.chunkSize);
        if (data.length !== expect) throw BackupErrors.shortChunk(id.toString('hex'), i, data.length, expect);
        await target.write(data, i * m.chunkSize);
        stats.bytesWritten += data.length;
        f.read += data.length;
        f.done += data.length;
        progress.update(f);
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
    await target.flush();
    if (verify) await verifyWritten(repo, m, entries, target);
  } finally {
    progress.stop();
  }
  stats.durationMs = Date.now() - started;
  return stats;
}

/** Reads every written chunk back and checks its hash: what landed is what was backed up. */
async function verifyWritten(repo: Repository, m: Manifest, entries: Array<[number, Buffer]>, target: RestoreTarget): Promise<void> {
  let next = 0;
  const worker = async () => {
    const buf = Buffer.allocUnsafe(m.chunkSize);
    while (next < entries.length) {
      const [i, id] = entries[next++]!;
      const view = buf.subarray(0, Math.min(m.chunkSize, m.size - i * m.chunkSize));
      await target.read(view, i * m.chunkSize);
      if (!repo.chunkId(view).equals(id)) throw BackupErrors.restoreMismatch(i * m.chunkSize);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
}
