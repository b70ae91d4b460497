// Tells systemd (Type=notify) that the daemon is ready, or stopping. Node cannot send a
// unix datagram, so systemd-notify(1) sends it; without NOTIFY_SOCKET nothing is run.
import { spawn } from 'node:child_process';
import type { Logger } from 'pino';

export type NotifyState = 'ready' | 'stopping';

/**
 * Runs systemd-notify once when NOTIFY_SOCKET is set (the daemon runs under systemd).
 * Resolves when it has exited, or at once without NOTIFY_SOCKET; never rejects: a failed
 * notification is a warning, and the daemon serves anyway.
 */
export function notifySystemd(state: NotifyState, log: Logger, env: NodeJS.ProcessEnv = process.env): Promise<void> {
  if (!env.NOTIFY_SOCKET) return Promise.resolve();
  // --pid names the daemon as the main process, since the message comes from a child (the
  // unit needs NotifyAccess=all). No --no-block: systemd-notify then waits until systemd has
  // read the message, which it can only attribute to the unit while the sender is alive.
  const args = state === 'ready' ? ['--ready', `--pid=${process.pid}`] : ['STOPPING=1'];
  return new Promise<void>((resolve) => {
    let done = false;
    const finish = (problem?: Record<string, unknown>) => {
      if (done) return;
      done = true;
      if (problem) log.warn({ ...problem, args }, 'could not notify systemd');
      resolve();
    };
    log.debug({ args }, 'notifying systemd');
    try {
      const child = spawn('systemd-notify', args, { stdio: 'ignore', env });
      child.once('error', (err) => finish({ err }));
      child.once('exit', (code, signal) => finish(code === 0 ? undefined : { code, signal }));
    } catch (err) {
      finish({ err });
    }
  });
}
