// fallocate(2) for Node, which has none: holes are punched and space is reserved by
// fallocate(1), run by one long-lived shell started while the daemon is still small, not
// by a new child per call.
//
// Why: spawning forks the daemon, which blocks the event loop to copy its page tables and
// makes the next write to every page fault; the daemon is largest exactly when TRIM and
// snapshot removal come. The shell forks fallocate from its own small image instead
// (docs/tuning.md, fallocateHelper).
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { CowErrors } from './errors.js';

// A request is two lines, "MODE OFFSET LENGTH" then the path (read whole, so any byte but
// a newline may be in it); one reply line each, "ok" or "err MESSAGE", in order. MODE p
// punches a hole; a allocates the range, growing the file when it ends past it.
const SCRIPT =
  'while read -r k o l && IFS= read -r p; do ' +
  'if [ "$k" = p ]; then set -- --punch-hole --keep-size; else set --; fi; ' +
  'if m=$(fallocate "$@" -o "$o" -l "$l" -- "$p" 2>&1); then echo ok; ' +
  'else printf "err %s\\n" "$(printf %s "$m" | tr "\\n" " ")"; fi; done';

type Mode = 'p' | 'a';

export class FallocateHelper {
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
    return this.run('p', path, ranges).then((err) => {
      if (err !== undefined) throw CowErrors.punchFailed(path, err);
    });
  }

  /**
   * Allocates the file's blocks over [offset, offset+length) (fallocate mode 0): writes
   * there then need no new space. The file grows to offset+length if it is shorter.
   * Rejects with code ENOSPC when the file system cannot hold it.
   */
  allocate(path: string, offset: number, length: number): Promise<void> {
    return this.run('a', path, [[offset, length]]).then((err) => {
      if (err === undefined) return;
      throw /No space left|Disk quota/.test(err) ? CowErrors.allocateNoSpace(path, err) : CowErrors.allocateFailed(path, err);
    });
  }

  /** Runs one request per range; resolves with the first error message, if any. */
  private run(mode: Mode, path: string, ranges: ReadonlyArray<readonly [number, number]>): Promise<string | undefined> {
    if (ranges.length === 0) return Promise.resolve(undefined);
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
    child.stdin.write(ranges.map(([o, l]) => `${mode} ${Math.trunc(o)} ${Math.trunc(l)}\n${path}\n`).join(''));
    return Promise.all(replies).then((errs) => errs.find((e) => e !== undefined));
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

  /** The helper died: its unanswered requests fail, and the next call starts a new one. */
  private gone(child: ChildProcessWithoutNullStreams, why: string): void {
    if (this.child !== child) return;
    this.child = undefined;
    this.partial = '';
    const w = this.waiting;
    this.waiting = [];
    for (const res of w) res(why);
  }

  /** Stops the helper (tests); a later call starts a new one. */
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
export const fallocateHelper = new FallocateHelper();

/** Allocates a file's blocks over a range (and grows it to the range's end): see FallocateHelper.allocate. */
export const allocateFile = (path: string, offset: number, length: number): Promise<void> => fallocateHelper.allocate(path, offset, length);
