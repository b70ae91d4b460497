// One backup served as a read-only NBD export: reads fetch the chunks they touch from
// the repository (verified, decompressed, kept in a bounded cache shared by every
// backup served), zero chunks read as zeros and are holes in base:allocation.
import { type Backend, type Extent, type ExportInfo, STATE_HOLE, STATE_ZERO } from '../protocol/backend.js';
import type { Manifest, Repository } from '../backup/repository.js';
import { chunkExtents } from './change-contexts.js';
import { Errors } from './errors.js';

/** Decompressed chunks kept across reads: a sequential reader rereads a chunk per request otherwise. */
export class ChunkCache {
  private readonly map = new Map<string, Promise<Buffer>>();
  constructor(private readonly maxEntries: number) {}

  /** The chunks `ids`, those not cached read together (Repository.readBlobs coalesces neighbours). */
  getMany(repo: Repository, ids: readonly Buffer[]): Promise<Buffer>[] {
    const out: Promise<Buffer>[] = new Array(ids.length);
    const missing: number[] = [];
    for (const [k, id] of ids.entries()) {
      const key = id.toString('hex');
      const p = this.map.get(key);
      if (!p) {
        missing.push(k);
        continue;
      }
      // Most recently used last: Map keeps insertion order.
      this.map.delete(key);
      this.map.set(key, p);
      out[k] = p;
    }
    const read = repo.readBlobs(missing.map((k) => ids[k]!));
    missing.forEach((k, n) => {
      const key = ids[k]!.toString('hex');
      const p = read[n]!;
      p.catch(() => this.map.delete(key));
      this.map.set(key, p);
      out[k] = p;
    });
    while (this.map.size > this.maxEntries) this.map.delete(this.map.keys().next().value!);
    return out;
  }
}

export class BackupBackend implements Backend {
  readonly info: ExportInfo;

  constructor(
    name: string,
    private readonly repo: Repository,
    private readonly m: Manifest,
    private readonly chunks: ChunkCache,
  ) {
    this.info = {
      name,
      description: `backup ${m.id} of volume ${m.volume} taken at ${m.time}${m.group ? ` (group ${m.group})` : ''}, read-only`,
      size: m.size,
      readOnly: true,
      canFlush: true,
      canFua: false,
      canTrim: false,
      canZero: false,
      canFastZero: false,
      canCache: true,
      canMultiConn: true,
    };
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    const cs = this.m.chunkSize;
    const end = offset + buf.length;
    const wanted: number[] = [];
    const ids: Buffer[] = [];
    for (let i = Math.floor(offset / cs); i * cs < end; i++) {
      const id = this.m.chunks.get(i);
      if (id) {
        wanted.push(i);
        ids.push(id);
      } else buf.fill(0, Math.max(offset, i * cs) - offset, Math.min(end, (i + 1) * cs) - offset);
    }
    const reads = this.chunks.getMany(this.repo, ids);
    await Promise.all(
      wanted.map((i, k) =>
        reads[k]!.then((data) => {
          const a = Math.max(offset, i * cs);
          const b = Math.min(end, (i + 1) * cs);
          const from = a - i * cs;
          if (data.length < b - i * cs) throw Errors.internal(`chunk ${i} of backup ${this.m.id} is short`);
          data.copy(buf, a - offset, from, from + (b - a));
        }),
      ),
    );
  }

  pwrite(): Promise<void> {
    return Promise.reject(Errors.internal('backups are read-only'));
  }
  async flush(): Promise<void> {}
  trim(): Promise<void> {
    return this.pwrite();
  }
  zero(): Promise<void> {
    return this.pwrite();
  }
  async cache(offset: number, length: number): Promise<void> {
    await this.pread(Buffer.allocUnsafe(Math.min(length, 4 << 20)), offset);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const zero = STATE_HOLE | STATE_ZERO;
    return chunkExtents((i) => (this.m.chunks.get(i) ? 0 : zero), this.m.chunkSize, this.m.size, offset, length);
  }
}
