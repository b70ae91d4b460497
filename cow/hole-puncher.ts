// Holes are punched by fallocate(1) (Node has no fallocate), run by one long-lived shell
// started while the daemon is still small, not by a new child per punch.
//
// Why: spawning forks the daemon, which blocks the event loop to copy its page tables and
// makes the next write to every page fault; the daemon is largest exactly when TRIM and
// snapshot removal come. The shell forks fallocate from its own small image instead
// (docs/tuning.md, holePuncher).
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { CowErrors } from './errors.js';

// A request is two lines, "OFFSET LENGTH" then the path (read whole, so any byte but a
// newline may be in it); one reply line each, "ok" or "err MESSAGE", in order.
const SCRIPT =
  'while read -r o l && IFS= read -r p; do ' +
  'if m=$(fallocate --punch-hole --keep-size -o "$o" -l "$l" -- "$p" 2>&1); then echo ok; ' +
  'else printf "err %s\\n" "$(printf %s "$m" | tr "\\n" " ")"; fi; done';

export class HolePuncher {
  private child: ChildProcessWithoutNullStreams | undefined;
  /** One per request written and not yet answered, in order. */
  private waiting: Array<(err: string | undefined) => void> = [];
  private partial = '';
  private spawnError = '';

  /** The helper's pid, once started. */
  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Starts the helper if it is not running. Idempotent; call it early, while the process is small. */
  start(): void {
    if (this.child) return;
    let child: ChildProcessWithoutNullStreams;
    try {
      child = spawn('/bin/sh', ['-c', SCRIPT], { stdio: ['pipe', 'pipe', 'pipe'] });
    } catch (e) {
      // Never fails a device's open: the punch that needs the helper reports it.
      this.spawnError = e instanceof Error ? e.message : String(e);
      return;
    }
    this.child = child;
    // It must not keep the daemon alive; at the daemon's exit its stdin closes and the loop ends.
    child.unref();
    for (const s of [child.stdin, child.stdout, child.stderr]) handle(s).unref?.();
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (s: string) => this.onOutput(s));
    child.stderr.resume();
    child.stdin.on('error', () => {}); // reported through 'exit'
    child.on('error', (e) => this.gone(child, e.message));
    child.on('exit', (code, signal) => this.gone(child, `hole punch helper exited (${signal ?? code})`));
  }

  /** Deallocates the ranges of the file at path (they then read as zeros). */
  punch(path: string, ranges: ReadonlyArray<readonly [number, number]>): Promise<void> {
    if (ranges.length === 0) return Promise.resolve();
    if (path.includes('\n')) return Promise.reject(CowErrors.punchPath(path));
    this.start();
    const child = this.child;
    if (!child) return Promise.reject(CowErrors.punchHelper(String(this.spawnError)));
    const replies = ranges.map(
      () =>
        new Promise<string | undefined>((res) => {
          this.waiting.push(res);
        }),
    );
    // While replies are due the process stays up to read them, or to learn of the
    // helper's exit: with only stdout held, its EOF could end the loop before 'exit'
    // came, leaving these replies unanswered (seen once in CI, in the killed-helper test).
    child.ref();
    handle(child.stdout).ref?.();
    child.stdin.write(ranges.map(([o, l]) => `${Math.trunc(o)} ${Math.trunc(l)}\n${path}\n`).join(''));
    return Promise.all(replies).then((errs) => {
      const err = errs.find((e) => e !== undefined);
      if (err !== undefined) throw CowErrors.punchFailed(path, err);
    });
  }

  private onOutput(s: string): void {
    this.partial += s;
    for (let nl = this.partial.indexOf('\n'); nl >= 0; nl = this.partial.indexOf('\n')) {
      const line = this.partial.slice(0, nl);
      this.partial = this.partial.slice(nl + 1);
      this.waiting.shift()?.(line === 'ok' ? undefined : line.replace(/^err /, '').trim() || 'failed');
    }
    if (this.waiting.length === 0 && this.child) {
      this.child.unref();
      handle(this.child.stdout).unref?.();
    }
  }

  /** The helper died: its unanswered requests fail, and the next punch starts a new one. */
  private gone(child: ChildProcessWithoutNullStreams, why: string): void {
    if (this.child !== child) return;
    this.child = undefined;
    this.partial = '';
    const w = this.waiting;
    this.waiting = [];
    for (const res of w) res(why);
  }

  /** Stops the helper (tests); a later punch starts a new one. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.ref();
    child.kill();
    await exited;
  }
}

function handle(s: unknown): { ref?(): void; unref?(): void } {
  return s as { ref?(): void; unref?(): void };
}

/** The process's helper, shared by every file device. */
export const holePuncher = new HolePuncher();
