// A backup repository (docs/backup-repository.md): config, content-addressed blobs in pack files,
// index files caching the packs' trailers, one manifest per backup, and locks, kept in a
// directory or a bucket through RepoStorage.
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { decompress } from '@mongodb-js/zstd';
import { type BlobWriter, type PackRecord, PackWriter, type WriterHost } from './blob-writer.js';
import { chunkId, newMasterKey, objectAad, type RepoKey, SEAL_OVERHEAD, seal, unseal } from './crypto.js';
import { BackupErrors, isBackupError } from './errors.js';
import { keyFileId, makeKeyFile, openKeyFile } from './key-file.js';
import { type RepoLock, takeLock } from './lock.js';
import { mapLimit, STORAGE_READS_IN_FLIGHT } from './parallel.js';
import { openStorage, type S3Options } from './storage/open-storage.js';
import type { RepoStorage } from './storage/storage.js';
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
export type { S3Options } from './storage/open-storage.js';
export type { RepoStorage } from './storage/storage.js';
export { type BackupStats, type Manifest, type ManifestHeader, newManifestId } from './manifest.js';

export const REPOSITORY_FORMAT = 'cowbd-backup-repository';
/** The newest format this code reads; a plain repository is still written as version 1, so older cowbd reads it. */
export const REPOSITORY_VERSION = 2;
/** Version 2 adds encryption (docs/backup-repository.md, "Encryption"). */
const ENCRYPTED_VERSION = 2;
const CIPHER_NAME = 'aes-256-gcm';
export const CHUNK_SIZE = 65536;
const HEX64 = /^[0-9a-f]{64}$/;
const INDEX_AAD = Buffer.from('index');
/** readBlobs() reads across a gap this small rather than make a second request. */
const RUN_GAP_BYTES = 64 * 1024;
/** ...and reads at most this much in one request. */
const RUN_MAX_BYTES = 4 * 1024 * 1024;
/** listManifests() reads this much of each manifest at first, enough for any header but a huge one. */
const HEADER_READ_BYTES = 16 * 1024;

interface Config {
  format: string;
  version: number;
  id: string;
  chunkSize: number;
  hash: string;
  compression: string;
  encryption?: string;
}

export interface OpenOptions {
  s3?: S3Options;
  /** The user's key or passphrase: init encrypts the new repository with it, open needs it for an encrypted one. */
  secret?: Buffer;
  /** scrypt's cost for a new key file; tests lower it. */
  scryptN?: number;
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
    readonly storage: RepoStorage,
    readonly id: string,
    readonly version: number,
    readonly chunkSize: number,
    private readonly key?: RepoKey,
  ) {}

  get encrypted(): boolean {
    return this.key !== undefined;
  }

  /** The repository as the user named it (a directory, or s3://BUCKET/PREFIX). */
  get dir(): string {
    return this.storage.location;
  }

  get parallelSaves(): number {
    return this.storage.parallelSaves;
  }

  static async init(where: string | RepoStorage, o: OpenOptions = {}): Promise<Repository> {
    const storage = typeof where === 'string' ? await openStorage(where, o.s3) : where;
    if (!(await storage.isEmpty())) throw BackupErrors.notEmpty(storage.location);
    const key = o.secret ? newMasterKey() : undefined;
    const keyFile = o.secret && key ? await makeKeyFile(o.secret, key, { N: o.scryptN }) : undefined;
    await storage.create();
    const config: Config = {
      format: REPOSITORY_FORMAT,
      version: key ? ENCRYPTED_VERSION : 1,
      id: randomBytes(32).toString('hex'),
      chunkSize: CHUNK_SIZE,
      hash: key ? 'hmac-sha256' : 'sha256',
      compression: 'zstd',
      ...(key ? { encryption: CIPHER_NAME } : {}),
    };
    // The key file first: a config naming encryption must never be there without a key to open it.
    if (keyFile) await storage.save('keys', keyFileId(keyFile), keyFile);
    await storage.save('config', 'config', `${JSON.stringify(config, null, 2)}\n`);
    return new Repository(storage, config.id, config.version, config.chunkSize, key);
  }

  static async open(where: string | RepoStorage, o: OpenOptions = {}): Promise<Repository> {
    const storage = typeof where === 'string' ? await openStorage(where, o.s3) : where;
    const dir = storage.location;
    const file = await storage.load('config', 'config');
    if (!file) {
      if (!(await storage.isEmpty())) throw BackupErrors.foreign(dir, 'it has files but no config');
      throw BackupErrors.noRepository(dir);
    }
    let c: Partial<Config>;
    try {
      c = JSON.parse(file.toString('utf8'));
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
    const encrypted = c.encryption !== undefined;
    if (encrypted && (c.encryption !== CIPHER_NAME || c.version < ENCRYPTED_VERSION))
      throw BackupErrors.damagedConfig(dir, `encryption ${JSON.stringify(c.encryption)} in version ${c.version}`);
    if (c.hash !== (encrypted ? 'hmac-sha256' : 'sha256') || c.compression !== 'zstd')
      throw BackupErrors.damagedConfig(dir, `hash ${c.hash} / compression ${c.compression}`);
    if (!encrypted) {
      if (o.secret) throw BackupErrors.notEncrypted(dir);
      return new Repository(storage, c.id, c.version, c.chunkSize);
    }
    if (!o.secret) throw BackupErrors.keyRequired(dir);
    return new Repository(storage, c.id, c.version, c.chunkSize, await Repository.openKey(storage, o.secret));
  }

  /** The master key from the first key file the secret opens; nothing else is read before it. */
  private static async openKey(storage: RepoStorage, secret: Buffer): Promise<RepoKey> {
    const names = await storage.list('keys');
    if (names.length === 0) throw BackupErrors.damagedConfig(storage.location, 'it is encrypted but has no key file');
    let firstError: unknown;
    for (const name of names) {
      const bytes = await storage.load('keys', name);
      if (!bytes) continue;
      try {
        return await openKeyFile(bytes, secret, storage.location, `keys/${name}`);
      } catch (e) {
        firstError ??= e;
      }
    }
    throw firstError ?? BackupErrors.wrongKey(storage.location);
  }

  /** A chunk's id: its SHA-256, or in an encrypted repository its HMAC under the repository's key. */
  chunkId(raw: Uint8Array): Buffer {
    return chunkId(this.key, raw);
  }

  private seal(plain: Buffer, aad?: Buffer): Buffer {
    return this.key ? seal(this.key, plain, aad) : plain;
  }

  private unseal(stored: Buffer, what: string, aad?: Buffer): Buffer {
    return this.key ? unseal(this.key, stored, what, aad) : stored;
  }

  close(): Promise<void> {
    return this.storage.close();
  }

  lock(exclusive: boolean, purpose: string): Promise<RepoLock> {
    return takeLock(this.storage, exclusive, purpose);
  }

  // ---- index

  /** Reads every index file, then the trailer of every pack no index names. */
  async loadIndex(): Promise<void> {
    this.packs.clear();
    this.blobs.clear();
    this.unreadablePacks.clear();
    this.indexFiles = [];
    const names = await this.storage.list('index');
    const files = await mapLimit(names, STORAGE_READS_IN_FLIGHT, async (name) => {
      try {
        const file = await this.storage.load('index', name);
        if (!file) return undefined;
        const f: IndexFile = JSON.parse(this.unseal(file, `index file ${name}`, INDEX_AAD).toString('utf8'));
        if (!Array.isArray(f.packs)) throw new Error('no packs');
        return f;
      } catch (e) {
        if (isBackupError(e, BackupErrors.storage)) throw e;
        return undefined; // a damaged index file is only a cache: the packs' trailers are read instead
      }
    });
    for (const [k, f] of files.entries()) {
      if (!f) continue;
      this.indexFiles.push(names[k]!);
      for (const p of f.packs) {
        const blobs = p.blobs.map((b) => ({ ...b, id: Buffer.from(b.id, 'hex') }));
        this.addPack({ id: p.id, size: p.size, blobs });
      }
    }
    const unindexed = (await this.listPackFiles()).filter((pack) => !this.packs.has(pack));
    await mapLimit(unindexed, STORAGE_READS_IN_FLIGHT, async (pack) => {
      try {
        this.addPack({ id: pack, ...(await this.readTrailer(pack)) });
      } catch (e) {
        if (isBackupError(e, BackupErrors.storage)) throw e;
        this.unreadablePacks.set(pack, (e as Error).message);
      }
    });
  }

  /** The ids of the pack files in data/. */
  listPackFiles(): Promise<string[]> {
    return this.storage.list('data');
  }

  async readTrailer(pack: string): Promise<PackInfo> {
    const st = await this.storage.stat('data', pack);
    if (!st) throw BackupErrors.damagedPack(pack, 'it is gone');
    const size = st.size;
    if (size < 4) throw BackupErrors.damagedPack(pack, `only ${size} bytes`);
    const last4 = await this.loadExactly(pack, size - 4, 4);
    const n = trailerLength(last4, size, pack, this.key ? SEAL_OVERHEAD : 0);
    const t = this.unseal(await this.loadExactly(pack, size - 4 - n, n), `the trailer of pack ${pack}`);
    return { size, blobs: decodeTrailer(t, size - 4 - n, pack) };
  }

  private async loadExactly(pack: string, offset: number, length: number): Promise<Buffer> {
    const b = await this.storage.load('data', pack, { offset, length });
    if (!b || b.length !== length) throw BackupErrors.damagedPack(pack, `short read at byte ${offset}`);
    return b;
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

  /** A pack's file in a directory repository (tests damage them). */
  packPath(id: string): string {
    return path.join(this.dir, 'data', id.slice(0, 2), id);
  }

  storeBlob(packed: Buffer): Buffer {
    return this.seal(packed);
  }

  storeTrailer(trailer: Buffer): Buffer {
    return this.seal(trailer);
  }

  savePack(id: string, data: Buffer): Promise<void> {
    return this.storage.save('data', id, data);
  }

  /** A pack's whole stored bytes; undefined when it is gone. */
  loadPack(id: string): Promise<Buffer | undefined> {
    return this.storage.load('data', id);
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
    const stored = this.seal(Buffer.from(JSON.stringify(f)), INDEX_AAD);
    const name = createHash('sha256').update(stored).digest('hex');
    await this.storage.save('index', name, stored);
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
    const stored = await this.storage.load('data', loc.pack, { offset: loc.offset, length: loc.length });
    if (!stored) throw BackupErrors.missingChunk(hex, `its pack ${loc.pack} is gone`);
    if (stored.length !== loc.length)
      throw BackupErrors.damagedChunk(hex, loc.pack, `pack is truncated (${stored.length} of ${loc.length} bytes)`);
    return this.unpack(hex, loc, stored);
  }

  /**
   * Several blobs at once: those stored next to each other in one pack (as a backup writes a
   * volume's consecutive chunks) are fetched by one ranged read, which on object storage saves a
   * request per chunk. Each promise settles on its own.
   */
  readBlobs(ids: readonly Buffer[]): Promise<Buffer>[] {
    const out: Promise<Buffer>[] = new Array(ids.length);
    const located: Array<{ k: number; hex: string; loc: BlobLocation }> = [];
    ids.forEach((id, k) => {
      const hex = id.toString('hex');
      const loc = this.blobs.get(hex);
      if (loc) located.push({ k, hex, loc });
      else out[k] = this.readBlob(id);
    });
    located.sort((a, b) => a.loc.pack.localeCompare(b.loc.pack) || a.loc.offset - b.loc.offset);
    for (let i = 0; i < located.length; ) {
      const first = located[i]!;
      let end = first.loc.offset + first.loc.length;
      let j = i + 1;
      for (; j < located.length; j++) {
        const next = located[j]!.loc;
        const nextEnd = Math.max(end, next.offset + next.length);
        if (next.pack !== first.loc.pack || next.offset - end > RUN_GAP_BYTES || nextEnd - first.loc.offset > RUN_MAX_BYTES) break;
        end = nextEnd;
      }
      const run = located.slice(i, j);
      const start = first.loc.offset;
      const bytes = this.storage.load('data', first.loc.pack, { offset: start, length: end - start });
      bytes.catch(() => undefined);
      for (const { k, hex, loc } of run)
        out[k] = bytes.then((b) => {
          if (!b) throw BackupErrors.missingChunk(hex, `its pack ${loc.pack} is gone`);
          const stored = b.subarray(loc.offset - start, loc.offset - start + loc.length);
          if (stored.length !== loc.length)
            throw BackupErrors.damagedChunk(hex, loc.pack, `pack is truncated (${stored.length} of ${loc.length} bytes)`);
          return this.unpack(hex, loc, stored);
        });
      i = j;
    }
    return out;
  }

  /** The raw bytes of a blob from its stored bytes, checked against its id. */
  async unpack(hex: string, loc: { pack: string; rawLength: number; compressed: boolean }, stored: Buffer): Promise<Buffer> {
    let raw = stored;
    if (this.key) {
      try {
        raw = unseal(this.key, stored, `chunk ${hex}`);
      } catch {
        throw BackupErrors.damagedChunk(hex, loc.pack, 'it does not authenticate under the repository key');
      }
    }
    if (loc.compressed) {
      try {
        raw = await decompress(raw);
      } catch (e) {
        throw BackupErrors.damagedChunk(hex, loc.pack, `does not decompress: ${(e as Error).message}`);
      }
    }
    if (raw.length !== loc.rawLength) throw BackupErrors.damagedChunk(hex, loc.pack, `${raw.length} bytes, expected ${loc.rawLength}`);
    if (this.chunkId(raw).toString('hex') !== hex)
      throw BackupErrors.damagedChunk(hex, loc.pack, this.key ? 'HMAC mismatch' : 'SHA-256 mismatch');
    return raw;
  }

  // ---- manifests

  async saveManifest(m: Manifest): Promise<void> {
    const problem = manifestProblem(m);
    if (problem) throw BackupErrors.badManifest(problem);
    await this.storage.save('backups', m.id, this.seal(await encodeManifest(m), objectAad('manifest', m.id)));
  }

  async listManifests(): Promise<{ headers: ManifestHeader[]; damaged: { file: string; reason: string }[] }> {
    const headers: ManifestHeader[] = [];
    const damaged: { file: string; reason: string }[] = [];
    await mapLimit(await this.manifestIds(), STORAGE_READS_IN_FLIGHT, async (name) => {
      try {
        const h = await this.readHeader(name);
        if (h) headers.push(h);
      } catch (e) {
        if (isBackupError(e, BackupErrors.storage)) throw e;
        damaged.push({ file: name, reason: (e as Error).message });
      }
    });
    damaged.sort((a, b) => a.file.localeCompare(b.file));
    headers.sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
    return { headers, damaged };
  }

  private async manifestIds(): Promise<string[]> {
    return (await this.storage.list('backups')).filter((n) => MANIFEST_ID_RE.test(n));
  }

  /** A manifest's header, read without its chunk table; undefined when it vanished meanwhile. */
  private async readHeader(id: string): Promise<ManifestHeader | undefined> {
    if (this.key) {
      const file = await this.loadManifestFile(id);
      return file && toHeader(decodeHeader(file.subarray(MANIFEST_PREFIX_BYTES, MANIFEST_PREFIX_BYTES + headerLength(file)), id));
    }
    // One read that usually holds the whole header: on object storage a request costs the same for 8 bytes or 16 KiB.
    const head = await this.storage.load('backups', id, { offset: 0, length: HEADER_READ_BYTES });
    if (!head) return undefined;
    if (head.length < MANIFEST_PREFIX_BYTES) throw new Error('header runs past the end of the file');
    const n = headerLength(head);
    const json =
      MANIFEST_PREFIX_BYTES + n <= head.length
        ? head.subarray(MANIFEST_PREFIX_BYTES, MANIFEST_PREFIX_BYTES + n)
        : await this.storage.load('backups', id, { offset: MANIFEST_PREFIX_BYTES, length: n });
    if (!json) return undefined;
    if (json.length < n) throw new Error('header runs past the end of the file');
    return toHeader(decodeHeader(json, id));
  }

  async loadManifest(idOrUniquePrefix: string): Promise<Manifest> {
    const id = await this.resolveId(idOrUniquePrefix);
    let file: Buffer | undefined;
    try {
      file = await this.loadManifestFile(id);
    } catch (e) {
      if (isBackupError(e, BackupErrors.decryptFailed)) throw BackupErrors.damagedManifest(id, e.message);
      throw e;
    }
    if (!file) throw BackupErrors.unknownBackup(id);
    try {
      return await decodeManifest(file, id);
    } catch (e) {
      if (isBackupError(e)) throw e;
      throw BackupErrors.damagedManifest(id, (e as Error).message);
    }
  }

  /** A manifest's plain bytes, bound to its name when sealed so one cannot stand in for another. */
  private async loadManifestFile(id: string): Promise<Buffer | undefined> {
    const stored = await this.storage.load('backups', id);
    return stored && this.unseal(stored, `backup ${id}`, objectAad('manifest', id));
  }

  private async resolveId(prefix: string): Promise<string> {
    const p = prefix.toLowerCase();
    // A whole id needs no listing; loadManifest says so if there is no such backup.
    if (MANIFEST_ID_RE.test(p)) return p;
    if (p === '' || !/^[0-9a-f]+$/.test(p)) throw BackupErrors.unknownBackup(prefix);
    const matches = (await this.manifestIds()).filter((n) => n.startsWith(p));
    if (matches.length === 0) throw BackupErrors.unknownBackup(prefix);
    if (matches.length > 1) throw BackupErrors.ambiguousId(prefix, matches.sort());
    return matches[0]!;
  }

  async removeManifest(id: string): Promise<void> {
    if (!MANIFEST_ID_RE.test(id) || !(await this.storage.stat('backups', id))) throw BackupErrors.unknownBackup(id);
    await this.storage.remove('backups', id);
  }
}
