// Files of the repository: written under a temporary name, fsynced, renamed into place and the
// directory fsynced, so a crash leaves either the whole file or none. Modes are set explicitly
// (0700 directories, 0600 files) because the umask only ever removes bits and may remove ours.
import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import path from 'node:path';
import { BackupErrors } from './errors.js';

export const DIR_MODE = 0o700;
export const FILE_MODE = 0o600;
/** Temporary files end with this, so readers skip them and prune may remove stale ones. */
export const TEMP_SUFFIX = '.tmp';

export function tempName(final: string): string {
  return `${final}.${randomBytes(6).toString('hex')}${TEMP_SUFFIX}`;
}

export async function fsyncDir(dir: string): Promise<void> {
  const fd = await fs.open(dir, fsc.O_RDONLY);
  try {
    await fd.sync();
  } finally {
    await fd.close();
  }
}

/** Creates `dir` (and missing parents) with mode 0700, fsyncing each parent that gained an entry. */
export async function ensureDir(dir: string): Promise<void> {
  try {
    const st = await fs.stat(dir);
    if (st.isDirectory()) return;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  const parent = path.dirname(dir);
  if (parent !== dir) await ensureDir(parent);
  try {
    await fs.mkdir(dir, { mode: DIR_MODE });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    return;
  }
  await fs.chmod(dir, DIR_MODE);
  await fsyncDir(parent);
}

/** Opens a new file for writing with mode 0600 whatever the umask. */
export async function createFile(file: string): Promise<fs.FileHandle> {
  const fd = await fs.open(file, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, FILE_MODE);
  try {
    await fd.chmod(FILE_MODE);
  } catch (e) {
    await fd.close();
    throw e;
  }
  return fd;
}

/** Makes the finished temp file `tmp` durable under the name `final`. */
export async function commitFile(fd: fs.FileHandle, tmp: string, final: string): Promise<void> {
  await fd.sync();
  await fd.close();
  await fs.rename(tmp, final);
  await fsyncDir(path.dirname(final));
}

export function isDiskFull(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  return code === 'ENOSPC' || code === 'EDQUOT';
}

/** Writes `data` as the file `final` durably (temp, fsync, rename, fsync dir). */
export async function writeDurable(final: string, data: Buffer | string): Promise<void> {
  await ensureDir(path.dirname(final));
  const tmp = tempName(final);
  let fd: fs.FileHandle | undefined;
  try {
    fd = await createFile(tmp);
    await fd.writeFile(data);
    const f = fd;
    fd = undefined;
    await commitFile(f, tmp, final);
  } catch (e) {
    await fd?.close().catch(() => {});
    await fs.rm(tmp, { force: true }).catch(() => {});
    if (isDiskFull(e)) throw BackupErrors.diskFull(path.dirname(final));
    throw e;
  }
}

/** The names in `dir`, or none when it does not exist; temporary files are left out. */
export async function listNames(dir: string): Promise<string[]> {
  try {
    return (await fs.readdir(dir)).filter((n) => !n.endsWith(TEMP_SUFFIX));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}
