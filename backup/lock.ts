// Repository locks in restic's manner: one file per holder under locks/. Backups share, prune is
// exclusive. A lock whose process is gone on this host, or that was not refreshed within
// STALE_LOCK_MS, is stale and removed; a held lock is refreshed every REFRESH_LOCK_MS.
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { listNames, writeDurable } from './durable-file.js';
import { BackupErrors } from './errors.js';

export const STALE_LOCK_MS = 30 * 60 * 1000;
export const REFRESH_LOCK_MS = 5 * 60 * 1000;

export interface LockInfo {
  exclusive: boolean;
  host: string;
  pid: number;
  time: string;
  purpose: string;
}

export interface RepoLock {
  release(): Promise<void>;
}

function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

export function isStale(l: LockInfo, now = Date.now()): boolean {
  const t = Date.parse(l.time);
  if (Number.isNaN(t) || now - t > STALE_LOCK_MS) return true;
  return l.host === os.hostname() && processGone(l.pid);
}

async function readLock(file: string): Promise<LockInfo | undefined> {
  try {
    const l = JSON.parse(await fs.readFile(file, 'utf8')) as LockInfo;
    if (typeof l !== 'object' || l === null || typeof l.exclusive !== 'boolean') return undefined;
    return l;
  } catch {
    return undefined; // vanished, or half written by a holder that died: treated as absent
  }
}

/** The live locks other than `mine`, removing stale ones on the way. */
async function otherLocks(dir: string, mine?: string): Promise<LockInfo[]> {
  const live: LockInfo[] = [];
  for (const name of await listNames(dir)) {
    if (name === mine) continue;
    const file = path.join(dir, name);
    const l = await readLock(file);
    if (!l) continue;
    if (isStale(l)) {
      await fs.rm(file, { force: true });
      continue;
    }
    live.push(l);
  }
  return live;
}

function conflict(exclusive: boolean, others: LockInfo[]): LockInfo | undefined {
  return others.find((o) => exclusive || o.exclusive);
}

function lockedBy(l: LockInfo) {
  return BackupErrors.locked(l.exclusive ? 'exclusive' : 'shared', l.purpose, l.host, l.pid, l.time);
}

/** Takes a lock on the repository whose locks directory is `dir`. */
export async function takeLock(dir: string, exclusive: boolean, purpose: string): Promise<RepoLock> {
  const before = conflict(exclusive, await otherLocks(dir));
  if (before) throw lockedBy(before);
  const name = randomBytes(16).toString('hex');
  const file = path.join(dir, name);
  const info = (): LockInfo => ({ exclusive, host: os.hostname(), pid: process.pid, time: new Date().toISOString(), purpose });
  await writeDurable(file, JSON.stringify(info()));
  // Two holders may have written at once: both look again, and a conflict makes this one back off.
  const after = conflict(exclusive, await otherLocks(dir, name));
  if (after) {
    await fs.rm(file, { force: true });
    throw lockedBy(after);
  }
  let released = false;
  const timer = setInterval(() => {
    writeDurable(file, JSON.stringify(info())).catch(() => {});
  }, REFRESH_LOCK_MS);
  timer.unref();
  return {
    async release() {
      if (released) return;
      released = true;
      clearInterval(timer);
      await fs.rm(file, { force: true });
    },
  };
}
