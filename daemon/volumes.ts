// The data directory's plain volumes: one file NAME.vol per volume, sparse unless preallocated.
import { open, readdir, stat, statfs, mkdir, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { checkName, isValidName } from './names.js';
import { Errors } from './errors.js';
import { allocateFile, CowErrors, isCowError, syncDirectory, syncMadeDirectories } from '../cow/index.js';
import { formatSize } from './sizes.js';

export const VOLUME_SUFFIX = '.vol';

export function volumePath(dataDir: string, name: string): string {
  return join(dataDir, checkName(name) + VOLUME_SUFFIX);
}

export interface VolumeEntry {
  name: string;
  path: string;
  size: number;
}

export async function listVolumes(dataDir: string): Promise<VolumeEntry[]> {
  const names = (await readdir(dataDir).catch(() => [] as string[]))
    .filter((f) => f.endsWith(VOLUME_SUFFIX))
    .map((f) => f.slice(0, -VOLUME_SUFFIX.length))
    .filter(isValidName)
    .sort();
  const out: VolumeEntry[] = [];
  for (const name of names) {
    const path = join(dataDir, name + VOLUME_SUFFIX);
    const st = await stat(path);
    if (st.isFile()) out.push({ name, path, size: st.size });
  }
  return out;
}

/**
 * Makes the data directory if missing, 0700: the control socket and volume files are the
 * daemon user's alone. A directory it makes has its name synced into its parent.
 */
export async function makeDataDir(dataDir: string): Promise<void> {
  await syncMadeDirectories(await mkdir(dataDir, { recursive: true, mode: 0o700 }), dataDir);
}

export interface VolumeCreateOptions {
  /** Allocate the file's blocks now, so writes to the volume never find the disk full. */
  preallocate?: boolean;
}

/** Creates a volume file, sparse unless preallocated; refuses an existing name. */
export async function createVolume(dataDir: string, name: string, size: number, opts: VolumeCreateOptions = {}): Promise<VolumeEntry> {
  const path = volumePath(dataDir, name);
  await makeDataDir(dataDir);
  // Checked first too: a size past the file system's own file size limit would otherwise
  // fail as EFBIG, which says nothing about space.
  if (opts.preallocate) await checkFits(dataDir, name, size);
  let fh: FileHandle;
  try {
    fh = await open(path, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw Errors.nameTaken(name);
    throw err;
  }
  try {
    try {
      await fh.truncate(size);
      if (opts.preallocate) await allocateFile(path, 0, size);
      await fh.sync();
    } finally {
      await fh.close();
    }
  } catch (err) {
    await unlink(path).catch(() => undefined);
    if (isCowError(err) && err.id === CowErrors.allocateNoSpace.id) throw await noSpace(dataDir, name, size);
    throw err;
  }
  await syncDirectory(dataDir);
  return { name, path, size };
}

async function freeBytes(dataDir: string): Promise<number> {
  const fs = await statfs(dataDir);
  return Number(fs.bavail) * Number(fs.bsize);
}

async function noSpace(dataDir: string, name: string, size: number) {
  const free = await freeBytes(dataDir);
  return Errors.volumeNoSpace(name, formatSize(size), formatSize(free));
}

async function checkFits(dataDir: string, name: string, size: number): Promise<void> {
  if (size > (await freeBytes(dataDir))) throw await noSpace(dataDir, name, size);
}
