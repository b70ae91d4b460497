// One volume's backup from its snapshot's export: read what the plan says, hash each
// chunk, store what the repository lacks, and build the manifest's chunk table;
// chunks unchanged since the parent are taken from the parent's manifest unread.
import type { Extent } from '../protocol/backend.js';
import { readChunks } from './chunk-reader.js';
import { ALLOCATED, changedSince, contextBits } from './plan.js';
import type { ProgressFigures } from './progress.js';
import { ChunkTable, type BlobWriter, type Manifest, type ManifestHeader, type Repository } from './repository.js';

export interface SnapshotExport {
  read(buf: Buffer, offset: number): Promise<void>;
  blockStatus(offset: number, length: number): Promise<Map<string, Extent[]>>;
  readonly contexts: ReadonlyMap<string, number>;
}

export interface Checkpoint {
  tracker: string;
  generation: number;
}

export interface VolumeSource {
  volume: string;
  snapshot: string;
  size: number;
  /** The change-tracking checkpoint the snapshot's creation made, when tracked. */
  checkpoint?: Checkpoint;
}

export type Stats = ManifestHeader['stats'];

export interface BackupPlan {
  /** How the chunks to read were chosen. */
  mode: 'incremental' | 'allocated' | 'full';
  parent?: Manifest;
}

/** Contexts to ask the snapshot's export for, given the parent backup this one builds on. */
export function wantedContexts(src: VolumeSource, parent: Manifest | undefined, chunkSize: number): string[] {
  const out = [ALLOCATED];
  const p = parent?.checkpoint;
  if (parent && p && src.checkpoint && p.tracker === src.checkpoint.tracker && p.generation < src.checkpoint.generation)
    if (parent.size === src.size && parent.chunkSize === chunkSize) out.push(changedSince(p.generation));
  return out;
}

/** Chunks read between two releases: 16 MiB, a control call per 16 MiB of reading. */
const RELEASE_EVERY = 256;

const ZERO_CHUNK = new Map<number, Buffer>();
function zeros(n: number): Buffer {
  let z = ZERO_CHUNK.get(n);
  if (!z) {
    z = Buffer.alloc(n);
    ZERO_CHUNK.set(n, z);
  }
  return z;
}

export async function backupVolume(
  repo: Repository,
  writer: BlobWriter,
  src: VolumeSource,
  nbd: SnapshotExport,
  parent: Manifest | undefined,
  release: ((ranges: Array<[number, number]>) => Promise<void>) | undefined,
  onProgress: (f: ProgressFigures) => void,
): Promise<{ chunks: ChunkTable; stats: Stats; mode: BackupPlan['mode'] }> {
  const started = Date.now();
  const cs = repo.chunkSize;
  const count = Math.ceil(src.size / cs);
  const granted = wantedContexts(src, parent, cs).filter((c) => nbd.contexts.has(c));
  const bits = await contextBits({ size: src.size, blockStatus: (o, l) => nbd.blockStatus(o, l) }, granted, cs);
  const allocated = bits.get(ALLOCATED);
  const changedName = granted.find((c) => c !== ALLOCATED);
  const changed = changedName ? bits.get(changedName) : undefined;
  const mode: BackupPlan['mode'] = changed ? 'incremental' : allocated ? 'allocated' : 'full';
  const table = new ChunkTable(count);
  const stats: Stats = { bytesRead: 0, newBytes: 0, dedupBytes: 0, storedBytes: 0, zeroChunks: 0, chunks: count, durationMs: 0 };
  const f: ProgressFigures = { done: 0, total: src.size, read: 0, newBytes: 0, dedupBytes: 0 };
  const chunkBytes = (i: number) => Math.min(cs, src.size - i * cs);
  // Chunks not read: unchanged since the parent (its id, or zero), or never written.
  const want = (i: number): boolean => {
    if (changed && !changed.has(i)) return false;
    if (allocated && !allocated.has(i)) return false;
    return true;
  };
  // The table is sorted: entries go in by one ascending merge of these two lists.
  const kept: number[] = [];
  for (let i = 0; i < count; i++) {
    if (want(i)) continue;
    if (changed && !changed.has(i) && parent!.chunks.get(i)) {
      kept.push(i);
      stats.dedupBytes += chunkBytes(i);
    } else stats.zeroChunks++;
    f.done += chunkBytes(i);
  }
  // What the backup will not read, and then what it has read, the snapshot need not keep
  // any more: origin writes there stop paying for copies (a failed release only costs that).
  const releaser = release && new Releaser(release, cs);
  if (releaser) {
    const unwanted: Array<[number, number]> = [];
    for (let i = 0; i < count; i++) {
      if (want(i)) continue;
      const first = i;
      while (i + 1 < count && !want(i + 1)) i++;
      unwanted.push([first * cs, (i - first + 1) * cs]);
    }
    releaser.add(unwanted);
  }
  const readIdx: number[] = [];
  const readIds: Buffer[] = [];
  const seen = new Set<string>();
  let lastReport = 0;
  const stored = (bytes: number, r: { fresh: boolean; storedBytes: number }) => {
    if (r.fresh) {
      stats.newBytes += bytes;
      stats.storedBytes += r.storedBytes;
    } else stats.dedupBytes += bytes;
  };
  // Synchronous but for the store: chunks are hashed and listed in volume order, and many
  // stores run at once (the writer bounds them), each holding its chunk's buffer.
  await readChunks(nbd, src.size, cs, want, (i, data) => {
    stats.bytesRead += data.length;
    f.read += data.length;
    f.done += data.length;
    releaser?.readUpTo(i + 1);
    const now = Date.now();
    if (now - lastReport >= 100) {
      lastReport = now;
      f.newBytes = stats.newBytes;
      f.dedupBytes = stats.dedupBytes;
      onProgress(f);
    }
    if (data.equals(zeros(data.length))) {
      stats.zeroChunks++;
      return undefined;
    }
    const id = repo.chunkId(data);
    readIdx.push(i);
    readIds.push(id);
    const key = id.toString('hex');
    if (seen.has(key) || repo.has(id)) {
      stats.dedupBytes += data.length;
      return undefined;
    }
    seen.add(key);
    const bytes = data.length;
    return writer.add(id, data).then((r) => stored(bytes, r));
  });
  await releaser?.done();
  f.newBytes = stats.newBytes;
  f.dedupBytes = stats.dedupBytes;
  onProgress(f);
  for (let a = 0, b = 0; a < kept.length || b < readIdx.length; ) {
    if (b >= readIdx.length || (a < kept.length && kept[a]! < readIdx[b]!)) {
      const i = kept[a++]!;
      table.set(i, parent!.chunks.get(i)!);
    } else {
      table.set(readIdx[b]!, readIds[b]!);
      b++;
    }
  }
  stats.durationMs = Date.now() - started;
  return { chunks: table, stats, mode };
}

/** Releases read chunks in batches, one call at a time, never holding up the reading. */
class Releaser {
  private chain: Promise<void> = Promise.resolve();
  private from = 0;

  constructor(
    private readonly release: (ranges: Array<[number, number]>) => Promise<void>,
    private readonly cs: number,
  ) {}

  add(ranges: Array<[number, number]>): void {
    if (!ranges.length) return;
    this.chain = this.chain.then(() => this.release(ranges)).catch(() => undefined);
  }

  /** Chunks below `end` have been read; released once RELEASE_EVERY of them are. */
  readUpTo(end: number): void {
    if (end - this.from < RELEASE_EVERY) return;
    this.add([[this.from * this.cs, (end - this.from) * this.cs]]);
    this.from = end;
  }

  done(): Promise<void> {
    return this.chain;
  }
}
