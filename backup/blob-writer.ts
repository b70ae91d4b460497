// Writes blobs into pack files: each blob is zstd-compressed (or kept raw when that does not
// shrink it), appended to the open pack, and the pack is closed, named by its hash and made
// durable once it reaches PACK_TARGET_BYTES. Compression runs on libuv's threadpool, at most
// COMPRESSIONS_IN_FLIGHT at once; add() waits for a slot, which bounds the bytes in flight.
import { createHash, type Hash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { compress } from '@mongodb-js/zstd';
import { commitFile, createFile, ensureDir, isDiskFull, tempName } from './durable-file.js';
import { BackupErrors } from './errors.js';
import { type BlobEntry, encodeTrailer, PACK_TARGET_BYTES } from './pack-format.js';

/** See docs/backup-repository.md, "Writing". */
export const COMPRESSIONS_IN_FLIGHT = 4;
export const ZSTD_LEVEL = 3;
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
  readonly dir: string;
  has(id: Buffer): boolean;
  /** Marks a blob as being written by this process, so has() is true for it and other writers skip it. */
  claim(hex: string): void;
  unclaim(hex: string): void;
  packPath(id: string): string;
  /** A pack is durable: its blobs become readable. */
  addPack(p: PackRecord): void;
  writeIndex(packs: readonly PackRecord[]): Promise<void>;
}

interface OpenPack {
  fd: fs.FileHandle;
  tmp: string;
  hash: Hash;
  size: number;
  blobs: BlobEntry[];
}

export class PackWriter implements BlobWriter {
  private free = COMPRESSIONS_IN_FLIGHT;
  private waiting: Array<() => void> = [];
  private chain: Promise<void> = Promise.resolve();
  private open?: OpenPack;
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
      const packed = await compress(data, ZSTD_LEVEL);
      const compressed = packed.length < data.length;
      const stored = compressed ? packed : data;
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
      if (this.unindexed.length > 0) await this.host.writeIndex(this.unindexed);
      this.unindexed = [];
    });
    this.releaseClaims();
    return { packs: this.packs, storedBytes: this.storedBytes };
  }

  async abort(): Promise<void> {
    this.closed = true;
    await this.chain.catch(() => {});
    await this.dropOpen();
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

  /** Runs `fn` after every earlier pack operation; the first failure poisons the writer. */
  private serial(fn: () => Promise<void>): Promise<void> {
    const run = this.chain.then(async () => {
      if (this.failed) throw this.failed;
      try {
        await fn();
      } catch (e) {
        await this.dropOpen();
        this.failed = isDiskFull(e) ? BackupErrors.diskFull(this.host.dir) : (e as Error);
        throw this.failed;
      }
    });
    this.chain = run.catch(() => {});
    return run;
  }

  private append(e: BlobEntry, stored: Buffer): Promise<void> {
    return this.serial(async () => {
      const p = this.open ?? (await this.newPack());
      e.offset = p.size;
      await p.fd.write(stored, 0, stored.length, p.size);
      p.hash.update(stored);
      p.size += stored.length;
      p.blobs.push(e);
      if (p.size >= PACK_TARGET_BYTES) await this.closePack();
    });
  }

  private async newPack(): Promise<OpenPack> {
    const dataDir = path.join(this.host.dir, 'data');
    await ensureDir(dataDir);
    const tmp = tempName(path.join(dataDir, 'pack'));
    const fd = await createFile(tmp);
    this.open = { fd, tmp, hash: createHash('sha256'), size: 0, blobs: [] };
    return this.open;
  }

  private async closePack(): Promise<void> {
    const p = this.open!;
    const trailer = encodeTrailer(p.blobs);
    await p.fd.write(trailer, 0, trailer.length, p.size);
    p.hash.update(trailer);
    const size = p.size + trailer.length;
    const id = p.hash.digest('hex');
    const final = this.host.packPath(id);
    await ensureDir(path.dirname(final));
    this.open = undefined;
    try {
      await commitFile(p.fd, p.tmp, final);
    } catch (e) {
      await p.fd.close().catch(() => {});
      await fs.rm(p.tmp, { force: true }).catch(() => {});
      throw e;
    }
    const record = { id, size, blobs: p.blobs };
    this.host.addPack(record);
    this.unindexed.push(record);
    this.packs++;
    this.storedBytes += size;
    if (this.unindexed.length >= INDEX_EVERY_PACKS) {
      await this.host.writeIndex(this.unindexed);
      this.unindexed = [];
    }
  }

  private async dropOpen(): Promise<void> {
    const p = this.open;
    if (!p) return;
    this.open = undefined;
    await p.fd.close().catch(() => {});
    await fs.rm(p.tmp, { force: true }).catch(() => {});
  }

  private releaseClaims(): void {
    for (const hex of this.claimed) this.host.unclaim(hex);
    this.claimed = [];
  }
}
