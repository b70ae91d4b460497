// A separate process that holds a file system frozen (FIFREEZE through fsfreeze) and
// thaws it when told, when its parent dies (its stdin closes, even after kill -9), or
// when the time bound passes: a frozen file system blocks every writer on the host,
// so a thaw must not depend on the CLI surviving. Own process group: a Ctrl-C on the
// terminal reaches the CLI, and this process thaws when the CLI's pipe closes.
//   node freeze-guard.js MOUNTPOINT TIMEOUT_MS
// Prints "frozen" once frozen, "thawed" once thawed, "timeout" first when the bound fired.
import { spawnSync } from 'node:child_process';

const [mountpoint, timeoutText] = process.argv.slice(2);
const FSFREEZE = process.env.COWBD_FSFREEZE ?? 'fsfreeze';

function fsfreeze(flag: '-f' | '-u'): string | undefined {
  const r = spawnSync(FSFREEZE, [flag, mountpoint!], { encoding: 'utf8' });
  if (r.error) return r.error.message;
  return r.status === 0 ? undefined : r.stderr.trim() || `fsfreeze ${flag} exited ${r.status}`;
}

let thawed = false;
function thaw(why: string): void {
  if (thawed) return;
  thawed = true;
  if (why === 'timeout') process.stdout.write('timeout\n');
  const err = fsfreeze('-u');
  process.stdout.write(err ? `thaw-failed ${err}\n` : 'thawed\n');
  process.exit(err ? 1 : 0);
}

const err = fsfreeze('-f');
if (err) {
  process.stdout.write(`freeze-failed ${err}\n`);
  process.exit(1);
}
process.stdout.write('frozen\n');
const timer = setTimeout(() => thaw('timeout'), Number(timeoutText));
process.stdin.on('data', () => thaw('asked'));
process.stdin.on('end', () => thaw('parent gone'));
process.stdin.on('error', () => thaw('parent gone'));
for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, () => thaw(sig));
timer.ref();
