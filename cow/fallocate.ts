// fallocate(2) for Node, which has none: holes are punched and space is reserved by one
// long-lived Perl process (perl-base is part of every Debian system) started while the
// daemon is still small, which makes the system call itself: no process per call.
//
// Why: spawning forks the daemon, which blocks the event loop to copy its page tables and
// makes the next write to every page fault; the daemon is largest exactly when TRIM and
// snapshot removal come. And a fork and exec of fallocate(1) per call cost more than the
// allocation of a whole 1 GiB store (docs/tuning.md, fallocateHelper).
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { CowErrors } from './errors.js';

/** fallocate's system call number on 64-bit systems whose table is known; elsewhere fallocate(1) is run. */
const SYS_FALLOCATE: Partial<Record<string, number>> = { x64: 285, arm64: 47, riscv64: 47 };

// A request is two lines, "MODE OFFSET LENGTH" then the path (read whole, so any byte but
// a newline may be in it); one reply line each, "ok" or "err ERRNO MESSAGE", in order.
// MODE p punches a hole (PUNCH_HOLE | KEEP_SIZE); a allocates the range (mode 0), growing
// the file when it ends past it.
const SCRIPT = `
use strict; use Fcntl; $| = 1;
my $nr = $ARGV[0] + 0;
while (defined(my $req = <STDIN>)) {
  my $path = <STDIN>; last unless defined $path;
  chomp $req; chomp $path;
  my ($mode, $off, $len) = split / /, $req;
  my $err;
  if (!sysopen(my $fh, $path, O_WRONLY)) { $err = ($! + 0) . " $!"; }
  elsif ($nr) {
    $err = ($! + 0) . " $!" if syscall($nr, fileno($fh), $mode eq 'p' ? 3 : 0, $off + 0, $len + 0) != 0;
    close $fh;
  } else {
    close $fh;
    my @punch = $mode eq 'p' ? ('--punch-hole', '--keep-size') : ();
    $err = "5 fallocate exited " . ($? >> 8) if system('fallocate', @punch, '-o', $off, '-l', $len, '--', $path) != 0;
  }
  print defined $err ? "err $err\n" : "ok\n";
}
`;

/** The errno names a failed call maps to; any other is EIO. */
const ERRNO_NAMES: Partial<Record<number, string>> = { 28: 'ENOSPC', 122: 'EDQUOT' };

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
      child = spawn('perl', ['-e', SCRIPT, String(SYS_FALLOCATE[process.arch] ?? 0)], { stdio: ['pipe', 'pipe', 'pipe'] });
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
      if (err !== undefined) throw CowErrors.punchFailed(path, stripErrno(err));
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
      const errno = ERRNO_NAMES[Number.parseInt(err, 10)];
      throw errno ? CowErrors.allocateNoSpace(path, stripErrno(err)) : CowErrors.allocateFailed(path, stripErrno(err));
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

/** "28 No space left on device" as people read it. */
function stripErrno(err: string): string {
  return err.replace(/^\d+ /, '');
}

function handle(s: unknown): { ref?(): void; unref?(): void } {
  return s as { ref?(): void; unref?(): void };
}

/** The process's helper, shared by every file device. */
export const fallocateHelper = new FallocateHelper();

/** Allocates a file's blocks over a range (and grows it to the range's end): see FallocateHelper.allocate. */
export const allocateFile = (path: string, offset: number, length: number): Promise<void> => fallocateHelper.allocate(path, offset, length);
