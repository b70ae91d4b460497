// The data directory's plain volumes: one sparse file NAME.vol per volume.
import { open, readdir, stat, mkdir, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { checkName, isValidName } from './names.js';
import { Errors } from './errors.js';
import { syncDirectory, syncMadeDirectories } from '../cow/index.js';

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

/** Creates a sparse volume file; refuses an existing name. */
export async function createVolume(dataDir: string, name: string, size: number): Promise<VolumeEntry> {
  const path = volumePath(dataDir, name);
  await makeDataDir(dataDir);
  let fh: FileHandle;
  try {
    fh = await open(path, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw Errors.nameTaken(name);
    throw err;
  }
  try {
    await fh.truncate(size);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await syncDirectory(dataDir);
  return { name, path, size };
}
