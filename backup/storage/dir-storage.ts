// A repository in a local (or NFS) directory: files are written under a temporary name, fsynced,
// renamed into place and the directory fsynced (backup/durable-file.ts).
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ensureDir, fsyncDir, isDiskFull, listNames, TEMP_SUFFIX, writeDurable } from '../durable-file.js';
import { BackupErrors } from '../errors.js';
import { type FileKind, type FileStat, FILE_KINDS, type RepoStorage, relativePath } from './storage.js';

const HEX64 = /^[0-9a-f]{64}$/;

export class DirStorage implements RepoStorage {
  /** Two packs written at once keep the disk busy while the next is hashed. */
  readonly parallelSaves = 2;

  constructor(readonly location: string) {}

  path(kind: FileKind, name: string): string {
    return path.join(this.location, relativePath(kind, name));
  }

  async isEmpty(): Promise<boolean> {
    try {
      return (await fs.readdir(this.location)).length === 0;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return true;
      throw e;
    }
  }

  async create(): Promise<void> {
    await ensureDir(this.location);
    await fs.chmod(this.location, 0o700);
    for (const kind of FILE_KINDS) if (kind !== 'config') await ensureDir(path.join(this.location, kind));
  }

  async save(kind: FileKind, name: string, data: Buffer | string): Promise<void> {
    try {
      await writeDurable(this.path(kind, name), data);
    } catch (e) {
      if (isDiskFull(e)) throw BackupErrors.diskFull(this.location);
      throw e;
    }
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer | undefined> {
    try {
      if (!range) return await fs.readFile(this.path(kind, name));
      const fd = await fs.open(this.path(kind, name), 'r');
      try {
        const buf = Buffer.alloc(range.length);
        const { bytesRead } = await fd.read(buf, 0, range.length, range.offset);
        return buf.subarray(0, bytesRead);
      } finally {
        await fd.close();
      }
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
      throw e;
    }
  }

  async stat(kind: FileKind, name: string): Promise<FileStat | undefined> {
    try {
      const s = await fs.stat(this.path(kind, name));
      return { size: s.size, mtimeMs: s.mtimeMs };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
      throw e;
    }
  }

  async list(kind: FileKind): Promise<string[]> {
    if (kind === 'config') return (await this.stat('config', '')) ? ['config'] : [];
    if (kind !== 'data') return listNames(path.join(this.location, kind));
    const out: string[] = [];
    const dataDir = path.join(this.location, 'data');
    for (const sub of await listNames(dataDir)) {
      if (!/^[0-9a-f]{2}$/.test(sub)) continue;
      for (const name of await listNames(path.join(dataDir, sub))) if (HEX64.test(name) && name.startsWith(sub)) out.push(name);
    }
    return out;
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    const file = this.path(kind, name);
    await fs.rm(file, { force: true });
    await fsyncDir(path.dirname(file)).catch(() => {});
  }

  async removeLeftovers(): Promise<void> {
    const dirs = [path.join(this.location, 'data'), ...FILE_KINDS.filter((k) => k !== 'config').map((k) => path.join(this.location, k))];
    for (const d of dirs) {
      const names = await fs.readdir(d).catch(() => [] as string[]);
      for (const n of names) if (n.endsWith(TEMP_SUFFIX)) await fs.rm(path.join(d, n), { force: true });
    }
    for (const n of await fs.readdir(this.location).catch(() => [] as string[]))
      if (n.endsWith(TEMP_SUFFIX)) await fs.rm(path.join(this.location, n), { force: true });
  }

  async close(): Promise<void> {}
}
