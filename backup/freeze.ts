// --freeze MOUNTPOINT: the file system is frozen around the snapshot's creation, as
// lvcreate does through device-mapper's suspend, by a guard process that thaws it even
// if this one is killed (see freeze-guard.ts) and after a bound on how long writers wait.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { BackupErrors } from './errors.js';

// The guard beside this module, in the same form: compiled .js, or .ts under a test's
// loader, whose flags the guard then needs too.
const FROM_SOURCE = import.meta.url.endsWith('.ts');
const GUARD = fileURLToPath(new URL(`./freeze-guard${FROM_SOURCE ? '.ts' : '.js'}`, import.meta.url));
const GUARD_FLAGS = FROM_SOURCE ? process.execArgv : [];

export interface Frozen {
  /** Thaws; rejects when the bound passed before (the snapshot may then not be consistent). */
  thaw(): Promise<void>;
}

export async function freeze(mountpoint: string, timeoutMs: number): Promise<Frozen> {
  const child = spawn(process.execPath, [...GUARD_FLAGS, GUARD, mountpoint, String(timeoutMs)], {
    detached: true,
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout! });
  const events: string[] = [];
  let wake: (() => void) | undefined;
  lines.on('line', (l) => {
    events.push(l);
    wake?.();
  });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const next = async (): Promise<string> => {
    while (!events.length) {
      const got = new Promise<void>((r) => (wake = r));
      const done = await Promise.race([got.then(() => false), exited.then(() => true)]);
      if (done && !events.length) return 'exited';
    }
    return events.shift()!;
  };
  const first = await next();
  if (first !== 'frozen') {
    child.stdin!.destroy();
    throw BackupErrors.freezeFailed(mountpoint, first.replace(/^freeze-failed /, ''));
  }
  return {
    async thaw() {
      const timedOut = events.includes('timeout');
      if (!timedOut) child.stdin!.write('thaw\n');
      let ev = await next();
      if (ev === 'timeout') ev = await next();
      child.stdin!.destroy();
      await exited;
      if (ev.startsWith('thaw-failed')) throw BackupErrors.thawFailed(mountpoint, ev.slice('thaw-failed '.length));
      if (timedOut || events.includes('timeout')) throw BackupErrors.freezeTimedOut(mountpoint, timeoutMs);
    },
  };
}
