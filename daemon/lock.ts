// One daemon per data directory. A pid file created with O_EXCL; a file left by
// a dead process (kill -9, power loss) is detected by probing its pid and replaced.
import { open, readFile, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Errors } from './errors.js';

export const LOCK_FILE = 'cowbd.pid';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface DataDirLock {
  release(): Promise<void>;
}

export async function lockDataDir(dataDir: string): Promise<DataDirLock> {
  const path = join(dataDir, LOCK_FILE);
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fh = await open(path, 'wx', 0o644);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      let released = false;
      return {
        async release() {
          if (released) return;
          released = true;
          await unlink(path).catch(() => undefined);
        },
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const text = (await readFile(path, 'utf8').catch(() => '')).trim();
      const pid = Number(text);
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && alive(pid)) throw Errors.dataDirLocked(dataDir, text);
      // Stale: its owner is gone. Remove and retry; O_EXCL settles a race with another starter.
      await unlink(path).catch(() => undefined);
    }
  }
  throw Errors.dataDirLocked(dataDir, 'unknown');
}
