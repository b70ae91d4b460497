// Writes blobs into pack files: each blob is zstd-compressed (or kept raw when that does not
// shrink it), appended to the open pack, and the pack is closed, named by its hash and saved to
// the repository's storage once it reaches PACK_TARGET_BYTES. Compression runs on libuv's
// threadpool, at most COMPRESSIONS_IN_FLIGHT at once, and at most the storage's parallelSaves
// packs are saved at once; add() waits for both, which bounds the bytes in memory.
import { createHash, type Hash } from 'node:crypto';
import { compress } from '@mongodb-js/zstd';
import { isDiskFull } from './durable-file.js';
import { BackupErrors } from './errors.js';
import { type BlobEntry, encodeTrailer, PACK_TARGET_BYTES } from './pack-format.js';

/** See docs/backup-repository.md, "Writing". */
export const COMPRESSIONS_IN_FLIGHT = 4;
/** An index file is written after this many packs as well as at finish(), so a long backup that is killed leaves little to rescan. */
export const INDEX_EVERY_PACKS = 64;

export interface BlobWriter {
  add(id: Buffer, data: Buffer): Promise<{ fresh: boolean; storedBytes: number }>;
  finish(): Promise<{ packs: number; storedBytes: number }>;
  abort(): Promise<void>;
}

export interface PackRecord {
  id: string;
  size: number;
  blobs: BlobEntry[];
}

/** What a writer needs of its repository. */
export interface WriterHost {
  /** The repository as the user named it, for messages. */
  readonly dir: string;
  /** Packs saved at once. */
  readonly parallelSaves: number;
  has(id: Buffer): boolean;
  /** Marks a blob as being written by this process, so has() is true for it and other writers skip it. */
  claim(hex: string): void;
  unclaim(hex: string): void;
  /** A blob's stored form from its packed (compressed or raw) bytes: sealed when the repository is encrypted. */
  storeBlob(packed: Buffer): Buffer;
  /** A pack's trailer as it is written into the pack. */
  storeTrailer(trailer: Buffer): Buffer;
  /** Stores a whole pack durably. */
  savePack(id: string, data: Buffer): Promise<void>;
  /** A pack is durable: its blobs become readable. */
  addPack(p: PackRecord): void;
  writeIndex(packs: readonly PackRecord[]): Promise<void>;
}

interface OpenPack {
  parts: Buffer[];
  hash: Hash;
  size: number;
  blobs: BlobEntry[];
}

export class PackWriter implements BlobWriter {
  private free = COMPRESSIONS_IN_FLIGHT;
  private waiting: Array<() => void> = [];
  private chain: Promise<void> = Promise.resolve();
  private open?: OpenPack;
  private readonly saving = new Set<Promise<void>>();
  private unindexed: PackRecord[] = [];
  private claimed: string[] = [];
  private failed?: Error;
  private closed = false;
  private packs = 0;
  private storedBytes = 0;

  constructor(private readonly host: WriterHost) {}

  async add(id: Buffer, data: Buffer): Promise<{ fresh: boolean; storedBytes: number }> {
    this.check();
    if (this.host.has(id)) return { fresh: false, storedBytes: 0 };
    const hex = id.toString('hex');
    this.host.claim(hex);
    this.claimed.push(hex);
    await this.slot();
    try {
      // The binding takes no level: it compresses at zstd's default, 3 (docs/backup-repository.md, "Blobs").
      const packed = await compress(data);
      const compressed = packed.length < data.length;
      // The caller reuses `data` once this resolves: the pack keeps a copy.
      const stored = this.host.storeBlob(compressed ? packed : Buffer.from(data));
      await this.append({ id: Buffer.from(id), offset: 0, length: stored.length, rawLength: data.length, compressed }, stored);
      return { fresh: true, storedBytes: stored.length };
    } finally {
      this.unslot();
    }
  }

  /** Appends a blob already in its stored form (prune's repack). */
  async addStored(e: BlobEntry, stored: Buffer): Promise<void> {
    this.check();
    await this.append({ ...e, offset: 0 }, stored);
  }

  async finish(): Promise<{ packs: number; storedBytes: number }> {
    this.check();
    this.closed = true;
    await this.serial(async () => {
      if (this.open) await this.closePack();
      await this.drain(0);
      if (this.unindexed.length > 0) await this.host.writeIndex(this.unindexed);
      this.unindexed = [];
    });
    this.releaseClaims();
    return { packs: this.packs, storedBytes: this.storedBytes };
  }

  async abort(): Promise<void> {
    this.closed = true;
    await this.chain.catch(() => {});
    this.open = undefined;
    await Promise.allSettled([...this.saving]);
    this.releaseClaims();
  }

  private check(): void {
    if (this.failed) throw this.failed;
    if (this.closed) throw BackupErrors.writerClosed();
  }

  private async slot(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }

  private unslot(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.free++;
  }

  private fail(e: unknown): Error {
    this.open = undefined;
    this.failed ??= isDiskFull(e) ? BackupErrors.diskFull(this.host.dir) : (e as Error);
    return this.failed;
  }

  /** Runs `fn` after every earlier pack operation; the first failure poisons the writer. */
  private serial(fn: () => Promise<void>): Promise<void> {
    const run = this.chain.then(async () => {
      if (this.failed) throw this.failed;
      try {
        await fn();
      } catch (e) {
        throw this.fail(e);
      }
    });
    this.chain = run.catch(() => {});
    return run;
  }

  private append(e: BlobEntry, stored: Buffer): Promise<void> {
    return this.serial(async () => {
      this.open ??= { parts: [], hash: createHash('sha256'), size: 0, blobs: [] };
      const p = this.open;
      e.offset = p.size;
      p.parts.push(stored);
      p.hash.update(stored);
      p.size += stored.length;
      p.blobs.push(e);
      if (p.size >= PACK_TARGET_BYTES) await this.closePack();
    });
  }

  /** Waits until at most `max` saves are in flight; a failed save fails the writer. */
  private async drain(max: number): Promise<void> {
    while (this.saving.size > max) await Promise.race(this.saving);
    if (this.failed) throw this.failed;
  }

  private async closePack(): Promise<void> {
    const p = this.open!;
    this.open = undefined;
    const trailer = this.host.storeTrailer(encodeTrailer(p.blobs));
    const tail = Buffer.alloc(4);
    tail.writeUInt32LE(trailer.length);
    p.hash.update(trailer).update(tail);
    const data = Buffer.concat([...p.parts, trailer, tail]);
    const id = p.hash.digest('hex');
    const record = { id, size: data.length, blobs: p.blobs };
    await this.drain(this.host.parallelSaves - 1);
    const save: Promise<void> = this.host.savePack(id, data).then(
      () => {
        this.saving.delete(save);
        this.host.addPack(record);
        this.unindexed.push(record);
        this.packs++;
        this.storedBytes += record.size;
      },
      (e: unknown) => {
        this.saving.delete(save);
        this.fail(e);
      },
    );
    this.saving.add(save);
    if (this.unindexed.length >= INDEX_EVERY_PACKS) {
      const packs = this.unindexed;
      this.unindexed = [];
      await this.host.writeIndex(packs);
    }
  }

  private releaseClaims(): void {
    for (const hex of this.claimed) this.host.unclaim(hex);
    this.claimed = [];
  }
}
