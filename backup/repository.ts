// A backup repository on disk (docs/backup-repository.md): config, content-addressed blobs in
// pack files, index files caching the packs' trailers, one manifest per backup, and locks.
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { decompress } from '@mongodb-js/zstd';
import { type BlobWriter, type PackRecord, PackWriter, type WriterHost } from './blob-writer.js';
import { ensureDir, fsyncDir, listNames, writeDurable } from './durable-file.js';
import { BackupErrors, isBackupError } from './errors.js';
import { type RepoLock, takeLock } from './lock.js';
import {
  decodeHeader,
  decodeManifest,
  encodeManifest,
  headerLength,
  MANIFEST_ID_RE,
  MANIFEST_PREFIX_BYTES,
  type Manifest,
  type ManifestHeader,
  manifestProblem,
  toHeader,
} from './manifest.js';
import { type BlobEntry, decodeTrailer, trailerLength } from './pack-format.js';

export { ChunkTable } from './chunk-table.js';
export type { BlobWriter } from './blob-writer.js';
export type { RepoLock } from './lock.js';
export { type BackupStats, type Manifest, type ManifestHeader, newManifestId } from './manifest.js';

export const REPOSITORY_FORMAT = 'cowbd-backup-repository';
export const REPOSITORY_VERSION = 1;
export const CHUNK_SIZE = 65536;
const HEX64 = /^[0-9a-f]{64}$/;

interface Config {
  format: string;
  version: number;
  id: string;
  chunkSize: number;
  hash: string;
  compression: string;
}

/** Where a blob lives. */
export interface BlobLocation {
  pack: string;
  offset: number;
  length: number;
  rawLength: number;
  compressed: boolean;
}

/** A pack as the index knows it. */
export interface PackInfo {
  size: number;
  blobs: BlobEntry[];
}

interface IndexFile {
  version: number;
  packs: Array<{
    id: string;
    size: number;
    blobs: Array<{ id: string; offset: number; length: number; rawLength: number; compressed: boolean }>;
  }>;
}

export class Repository implements WriterHost {
  /** Every pack known, by id. */
  readonly packs = new Map<string, PackInfo>();
  /** Packs present in data/ whose trailer could not be read by loadIndex(), with why. */
  readonly unreadablePacks = new Map<string, string>();
  /** The index files loadIndex() read. */
  indexFiles: string[] = [];
  private readonly blobs = new Map<string, BlobLocation>();
  private readonly claims = new Set<string>();

  private constructor(
    readonly dir: string,
    readonly id: string,
    readonly version: number,
    readonly chunkSize: number,
  ) {}

  static async init(dir: string): Promise<Repository> {
    let names: string[] = [];
    try {
      names = await fs.readdir(dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    if (names.length > 0) throw BackupErrors.notEmpty(dir);
    await ensureDir(dir);
    await fs.chmod(dir, 0o700);
    const config: Config = {
      format: REPOSITORY_FORMAT,
      version: REPOSITORY_VERSION,
      id: randomBytes(32).toString('hex'),
      chunkSize: CHUNK_SIZE,
      hash: 'sha256',
      compression: 'zstd',
    };
    for (const sub of ['data', 'index', 'backups', 'locks']) await ensureDir(path.join(dir, sub));
    await writeDurable(path.join(dir, 'config'), `${JSON.stringify(config, null, 2)}\n`);
    return new Repository(dir, config.id, config.version, config.chunkSize);
  }

  static async open(dir: string): Promise<Repository> {
    let text: string;
    try {
      text = await fs.readFile(path.join(dir, 'config'), 'utf8');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENOTDIR') throw e;
      const names = await fs.readdir(dir).catch(() => [] as string[]);
      if (names.length > 0) throw BackupErrors.foreign(dir, 'it has files but no config');
      throw BackupErrors.noRepository(dir);
    }
    let c: Partial<Config>;
    try {
      c = JSON.parse(text);
    } catch {
      throw BackupErrors.damagedConfig(dir, 'not JSON');
    }
    if (typeof c !== 'object' || c === null) throw BackupErrors.damagedConfig(dir, 'not a JSON object');
    if (c.format !== REPOSITORY_FORMAT) throw BackupErrors.foreign(dir, `config format is ${JSON.stringify(c.format)}`);
    if (typeof c.version !== 'number' || !Number.isInteger(c.version) || c.version < 1) {
      throw BackupErrors.damagedConfig(dir, `version ${JSON.stringify(c.version)}`);
    }
    if (c.version > REPOSITORY_VERSION) throw BackupErrors.newerVersion(dir, c.version, REPOSITORY_VERSION);
    if (typeof c.id !== 'string' || !HEX64.test(c.id)) throw BackupErrors.damagedConfig(dir, 'id is not 64 hex digits');
    if (c.chunkSize !== CHUNK_SIZE) throw BackupErrors.damagedConfig(dir, `chunk size ${c.chunkSize}, expected ${CHUNK_SIZE}`);
    if (c.hash !== 'sha256' || c.compression !== 'zstd')
      throw BackupErrors.damagedConfig(dir, `hash ${c.hash} / compression ${c.compression}`);
    return new Repository(dir, c.id, c.version, c.chunkSize);
  }

  lock(exclusive: boolean, purpose: string): Promise<RepoLock> {
    return takeLock(path.join(this.dir, 'locks'), exclusive, purpose);
  }

  // ---- index

  /** Reads every index file, then the trailer of every pack no index names. */
  async loadIndex(): Promise<void> {
    this.packs.clear();
    this.blobs.clear();
    this.unreadablePacks.clear();
    this.indexFiles = [];
    const indexDir = path.join(this.dir, 'index');
    for (const name of await listNames(indexDir)) {
      let f: IndexFile;
      try {
        f = JSON.parse(await fs.readFile(path.join(indexDir, name), 'utf8'));
        if (!Array.isArray(f.packs)) throw new Error('no packs');
      } catch {
        continue; // a damaged index file is only a cache: the packs' trailers are read instead
      }
      this.indexFiles.push(name);
      for (const p of f.packs) {
        const blobs = p.blobs.map((b) => ({ ...b, id: Buffer.from(b.id, 'hex') }));
        this.addPack({ id: p.id, size: p.size, blobs });
      }
    }
    for (const pack of await this.listPackFiles()) {
      if (this.packs.has(pack)) continue;
      try {
        this.addPack({ id: pack, ...(await this.readTrailer(pack)) });
      } catch (e) {
        this.unreadablePacks.set(pack, (e as Error).message);
      }
    }
  }

  /** The ids of the pack files in data/. */
  async listPackFiles(): Promise<string[]> {
    const out: string[] = [];
    const dataDir = path.join(this.dir, 'data');
    for (const sub of await listNames(dataDir)) {
      if (!/^[0-9a-f]{2}$/.test(sub)) continue;
      for (const name of await listNames(path.join(dataDir, sub))) if (HEX64.test(name) && name.startsWith(sub)) out.push(name);
    }
    return out;
  }

  async readTrailer(pack: string): Promise<PackInfo> {
    const fd = await fs.open(this.packPath(pack), 'r');
    try {
      const { size } = await fd.stat();
      if (size < 4) throw BackupErrors.damagedPack(pack, `only ${size} bytes`);
      const last4 = Buffer.alloc(4);
      await fd.read(last4, 0, 4, size - 4);
      const n = trailerLength(last4, size, pack);
      const t = Buffer.alloc(n);
      await fd.read(t, 0, n, size - 4 - n);
      return { size, blobs: decodeTrailer(t, size, pack) };
    } finally {
      await fd.close();
    }
  }

  has(id: Buffer): boolean {
    const hex = id.toString('hex');
    return this.blobs.has(hex) || this.claims.has(hex);
  }

  /** Where the blob `id` lives, if the index knows it. */
  locate(id: Buffer | string): BlobLocation | undefined {
    return this.blobs.get(typeof id === 'string' ? id : id.toString('hex'));
  }

  claim(hex: string): void {
    this.claims.add(hex);
  }

  unclaim(hex: string): void {
    this.claims.delete(hex);
  }

  packPath(id: string): string {
    return path.join(this.dir, 'data', id.slice(0, 2), id);
  }

  addPack(p: PackRecord): void {
    this.packs.set(p.id, { size: p.size, blobs: p.blobs });
    for (const b of p.blobs) {
      const hex = b.id.toString('hex');
      if (!this.blobs.has(hex))
        this.blobs.set(hex, { pack: p.id, offset: b.offset, length: b.length, rawLength: b.rawLength, compressed: b.compressed });
    }
  }

  /** Forgets packs (prune deleted them): their blobs are re-pointed at another copy or dropped. */
  dropPacks(ids: Iterable<string>): void {
    for (const id of ids) this.packs.delete(id);
    this.blobs.clear();
    for (const [id, p] of this.packs)
      for (const b of p.blobs) {
        const hex = b.id.toString('hex');
        if (!this.blobs.has(hex))
          this.blobs.set(hex, { pack: id, offset: b.offset, length: b.length, rawLength: b.rawLength, compressed: b.compressed });
      }
  }

  /** Writes one index file naming `packs`; returns its name (the SHA-256 of its content). */
  async writeIndex(packs: readonly PackRecord[]): Promise<void> {
    await this.writeIndexFile(packs);
  }

  async writeIndexFile(packs: readonly PackRecord[]): Promise<string> {
    const f: IndexFile = {
      version: 1,
      packs: packs.map((p) => ({
        id: p.id,
        size: p.size,
        blobs: p.blobs.map((b) => ({
          id: b.id.toString('hex'),
          offset: b.offset,
          length: b.length,
          rawLength: b.rawLength,
          compressed: b.compressed,
        })),
      })),
    };
    const text = JSON.stringify(f);
    const name = createHash('sha256').update(text).digest('hex');
    await writeDurable(path.join(this.dir, 'index', name), text);
    return name;
  }

  newWriter(): BlobWriter {
    return new PackWriter(this);
  }

  // ---- blobs

  async readBlob(id: Buffer): Promise<Buffer> {
    const hex = id.toString('hex');
    const loc = this.blobs.get(hex);
    if (!loc) throw BackupErrors.missingChunk(hex, 'no pack holds it');
    let fd: fs.FileHandle;
    try {
      fd = await fs.open(this.packPath(loc.pack), 'r');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw BackupErrors.missingChunk(hex, `its pack ${loc.pack} is gone`);
      throw e;
    }
    let stored: Buffer;
    try {
      stored = Buffer.alloc(loc.length);
      const { bytesRead } = await fd.read(stored, 0, loc.length, loc.offset);
      if (bytesRead !== loc.length)
        throw BackupErrors.damagedChunk(hex, loc.pack, `pack is truncated (${bytesRead} of ${loc.length} bytes)`);
    } finally {
      await fd.close();
    }
    return this.unpack(hex, loc, stored);
  }

  /** The raw bytes of a blob from its stored bytes, checked against its id. */
  async unpack(hex: string, loc: { pack: string; rawLength: number; compressed: boolean }, stored: Buffer): Promise<Buffer> {
    let raw = stored;
    if (loc.compressed) {
      try {
        raw = await decompress(stored);
      } catch (e) {
        throw BackupErrors.damagedChunk(hex, loc.pack, `does not decompress: ${(e as Error).message}`);
      }
    }
    if (raw.length !== loc.rawLength) throw BackupErrors.damagedChunk(hex, loc.pack, `${raw.length} bytes, expected ${loc.rawLength}`);
    if (createHash('sha256').update(raw).digest('hex') !== hex) throw BackupErrors.damagedChunk(hex, loc.pack, 'SHA-256 mismatch');
    return raw;
  }

  // ---- manifests

  private manifestPath(id: string): string {
    return path.join(this.dir, 'backups', id);
  }

  async saveManifest(m: Manifest): Promise<void> {
    const problem = manifestProblem(m);
    if (problem) throw BackupErrors.badManifest(problem);
    await writeDurable(this.manifestPath(m.id), await encodeManifest(m));
  }

  async listManifests(): Promise<{ headers: ManifestHeader[]; damaged: { file: string; reason: string }[] }> {
    const headers: ManifestHeader[] = [];
    const damaged: { file: string; reason: string }[] = [];
    for (const name of await this.manifestIds()) {
      try {
        headers.push(await this.readHeader(name));
      } catch (e) {
        damaged.push({ file: name, reason: (e as Error).message });
      }
    }
    headers.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
    return { headers, damaged };
  }

  private async manifestIds(): Promise<string[]> {
    return (await listNames(path.join(this.dir, 'backups'))).filter((n) => MANIFEST_ID_RE.test(n));
  }

  private async readHeader(id: string): Promise<ManifestHeader> {
    const fd = await fs.open(this.manifestPath(id), 'r');
    try {
      const prefix = Buffer.alloc(MANIFEST_PREFIX_BYTES);
      await fd.read(prefix, 0, prefix.length, 0);
      const n = headerLength(prefix);
      const { size } = await fd.stat();
      if (MANIFEST_PREFIX_BYTES + n > size) throw new Error('header runs past the end of the file');
      const json = Buffer.alloc(n);
      await fd.read(json, 0, n, MANIFEST_PREFIX_BYTES);
      return toHeader(decodeHeader(json, id));
    } finally {
      await fd.close();
    }
  }

  async loadManifest(idOrUniquePrefix: string): Promise<Manifest> {
    const id = await this.resolveId(idOrUniquePrefix);
    let file: Buffer;
    try {
      file = await fs.readFile(this.manifestPath(id));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw BackupErrors.unknownBackup(id);
      throw e;
    }
    try {
      return await decodeManifest(file, id);
    } catch (e) {
      if (isBackupError(e)) throw e;
      throw BackupErrors.damagedManifest(id, (e as Error).message);
    }
  }

  private async resolveId(prefix: string): Promise<string> {
    const p = prefix.toLowerCase();
    if (p === '' || !/^[0-9a-f]+$/.test(p)) throw BackupErrors.unknownBackup(prefix);
    const matches = (await this.manifestIds()).filter((n) => n.startsWith(p));
    if (matches.length === 0) throw BackupErrors.unknownBackup(prefix);
    if (matches.length > 1) throw BackupErrors.ambiguousId(prefix, matches.sort());
    return matches[0]!;
  }

  async removeManifest(id: string): Promise<void> {
    if (!MANIFEST_ID_RE.test(id)) throw BackupErrors.unknownBackup(id);
    try {
      await fs.rm(this.manifestPath(id));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw BackupErrors.unknownBackup(id);
      throw e;
    }
    await fsyncDir(path.join(this.dir, 'backups'));
  }
}
