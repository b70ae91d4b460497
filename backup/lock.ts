// Repository locks in restic's manner: one file (or object) per holder under locks/, naming its
// owner (host and pid) and when it was last refreshed. Backups share, prune is exclusive. A lock
// whose process is gone on this host, or that was not refreshed within STALE_LOCK_MS, is stale
// and removed; a held lock is refreshed every REFRESH_LOCK_MS. Object storage has no atomic
// create, so a holder writes its lock, then looks again and backs off on a conflict; a holder
// whose lock could not be refreshed, or was removed, knows it lost it and commits nothing.
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { BackupErrors } from './errors.js';
import type { RepoStorage } from './storage/storage.js';

export const STALE_LOCK_MS = 30 * 60 * 1000;
export const REFRESH_LOCK_MS = 5 * 60 * 1000;
/** A holder stops trusting its lock this long before others may call it stale, for clocks that differ. */
const LOCK_SAFETY_MS = 5 * 60 * 1000;
/** How long after its last refresh a holder still trusts its lock. */
const TRUST_LOCK_MS = Math.max(REFRESH_LOCK_MS, STALE_LOCK_MS - Math.min(LOCK_SAFETY_MS, STALE_LOCK_MS / 2));

export interface LockInfo {
  exclusive: boolean;
  host: string;
  pid: number;
  time: string;
  purpose: string;
}

export interface RepoLock {
  /** Throws COWBD_BACKUP_LOCK_LOST when the lock may have been taken over; call before committing. */
  check(): Promise<void>;
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

export function isStale(l: LockInfo, now = Date.now(), staleMs = STALE_LOCK_MS): boolean {
  const t = Date.parse(l.time);
  if (Number.isNaN(t) || now - t > staleMs) return true;
  return l.host === os.hostname() && processGone(l.pid);
}

async function readLock(storage: RepoStorage, name: string): Promise<LockInfo | undefined> {
  try {
    const file = await storage.load('locks', name);
    if (!file) return undefined;
    const l = JSON.parse(file.toString('utf8')) as LockInfo;
    if (typeof l !== 'object' || l === null || typeof l.exclusive !== 'boolean') return undefined;
    return l;
  } catch (e) {
    if (e instanceof SyntaxError) return undefined; // half written by a holder that died: treated as absent
    throw e;
  }
}

/** The live locks other than `mine`, removing stale ones on the way. */
async function otherLocks(storage: RepoStorage, mine?: string): Promise<LockInfo[]> {
  const live: LockInfo[] = [];
  for (const name of await storage.list('locks')) {
    if (name === mine) continue;
    const l = await readLock(storage, name);
    if (!l) continue;
    if (isStale(l)) {
      await storage.remove('locks', name);
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

/** Takes a lock on the repository in `storage`. */
export async function takeLock(storage: RepoStorage, exclusive: boolean, purpose: string): Promise<RepoLock> {
  const before = conflict(exclusive, await otherLocks(storage));
  if (before) throw lockedBy(before);
  const name = randomBytes(16).toString('hex');
  const info = (): LockInfo => ({ exclusive, host: os.hostname(), pid: process.pid, time: new Date().toISOString(), purpose });
  await storage.save('locks', name, JSON.stringify(info()));
  let refreshedAt = Date.now();
  // Two holders may have written at once: both look again, and a conflict makes this one back off.
  const after = conflict(exclusive, await otherLocks(storage, name));
  if (after) {
    await storage.remove('locks', name);
    throw lockedBy(after);
  }
  let released = false;
  let refreshing: Promise<void> | undefined;
  const timer = setInterval(() => {
    const at = Date.now();
    refreshing = storage.save('locks', name, JSON.stringify(info())).then(
      () => {
        refreshedAt = at;
      },
      () => {},
    );
  }, REFRESH_LOCK_MS);
  timer.unref();
  return {
    async check() {
      await refreshing;
      const age = Date.now() - refreshedAt;
      if (age > TRUST_LOCK_MS) throw BackupErrors.lockLost(purpose, `not refreshed for ${Math.round(age / 1000)} s`);
      if (!(await storage.stat('locks', name))) throw BackupErrors.lockLost(purpose, 'its lock file was removed by another process');
    },
    async release() {
      if (released) return;
      released = true;
      clearInterval(timer);
      await refreshing;
      await storage.remove('locks', name);
    },
  };
}
