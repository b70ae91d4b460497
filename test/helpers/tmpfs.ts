// Small tmpfs mounts (root only), so a test can fill a real file system on purpose.
import { execFile } from 'node:child_process';
import { mkdir, stat, statfs } from 'node:fs/promises';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export interface Tmpfs {
  /** Mounts a tmpfs of `size` ("100m") at dir; resolves to why it cannot, or undefined. */
  mount(dir: string, size: string): Promise<string | undefined>;
  /** Lazily unmounts everything this mounted, newest first. */
  unmountAll(): Promise<void>;
}

export function tmpfsMounts(): Tmpfs {
  const mounted: string[] = [];
  return {
    async mount(dir, size) {
      if (process.getuid?.() !== 0) return 'needs root to mount a small tmpfs';
      await mkdir(dir, { recursive: true });
      try {
        await execFileP('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir]);
      } catch (e) {
        return `mount -t tmpfs failed: ${(e as { stderr?: string }).stderr?.trim() || String(e)}`;
      }
      mounted.push(dir);
      return undefined;
    },
    async unmountAll() {
      for (const m of mounted.splice(0).reverse()) await execFileP('umount', ['-l', m]).catch(() => undefined);
    },
  };
}

/** Bytes free for an unprivileged writer on the file system holding path. */
export async function freeBytes(path: string): Promise<number> {
  const s = await statfs(path);
  return s.bavail * s.bsize;
}

/** Bytes a file has allocated on disk (st_blocks counts 512-byte units). */
export async function allocatedBytes(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}
