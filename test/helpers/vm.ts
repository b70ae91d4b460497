// Boots a stock Debian kernel in QEMU (TCG) so that tests can drive the real Linux
// NBD client against our exports: the host kernel has no nbd module. The guest is
// prepared once by scripts/guest/prepare.sh and cached; each run appends a small
// cpio (the export list and the test's shell script) to the cached initramfs.
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT } from './daemon.js';

export interface GuestExport {
  /** Host TCP port; the guest reaches the host's 127.0.0.1 as 10.0.2.2. */
  port: number;
  /** Export name; empty or absent attaches the server's default export. */
  name?: string;
  /** Guest block device, e.g. /dev/nbd0. */
  device: string;
  /** `nbd-client -C n`: n connections (the server must advertise CAN_MULTI_CONN). */
  connections?: number;
}

export interface GuestOptions {
  exports?: GuestExport[];
  /** Guest shell script, run with `sh -ex` after every export is attached. */
  script: string;
  /** Kill the guest after this long; default 120 s. */
  timeoutMs?: number;
  /** Streams the serial console (kernel messages included) to this file. */
  log?: string;
  /** Seconds nbd-client may take to attach, also its `-t` I/O timeout; default 30. */
  attachTimeoutS?: number;
  memoryMb?: number;
  /** Guest CPUs; default $COWBD_GUEST_CPUS or 1. */
  cpus?: number;
  /** Extra files for the guest, at /cowbd/NAME (NAME without slashes), e.g. TLS certificates. */
  files?: { name: string; data: Buffer; mode?: number }[];
}

export interface GuestResult {
  /** The script's exit code, or the init's (240 attach failed, 241 module load, 242
   *  network, 243 disconnect failed); null when the guest never reported one. */
  exitCode: number | null;
  timedOut: boolean;
  /** Console text. */
  log: string;
  /** Host milliseconds from spawning qemu to: its exit (wallMs), the guest init
   *  starting (initMs, i.e. boot time), the exit marker (exitMarkerMs). */
  wallMs: number;
  initMs?: number;
  exitMarkerMs?: number;
  /** Guest uptime in seconds at: init start, exports attached, script finished. */
  uptime: { init?: number; attached?: number; scriptDone?: number };
}

export const GUEST_DIR = join(ROOT, 'scripts', 'guest');
export const GUEST_CACHE = process.env.COWBD_GUEST_CACHE ?? join(homedir(), '.cache', 'cowbd-guest');
const SKIP_EXIT = 77;

let prepared: Promise<{ dir: string } | { skip: string }> | undefined;

/**
 * Prepares the guest (cached across runs). Resolves to a skip reason when this host
 * cannot boot it; throws when preparation itself breaks. COWBD_REQUIRE_GUEST=1
 * turns a skip into a failure, for machines where the suite must really run.
 */
export function prepareGuest(): Promise<{ dir: string } | { skip: string }> {
  prepared ??= new Promise((resolve, reject) => {
    execFile(
      'bash',
      [join(GUEST_DIR, 'prepare.sh')],
      { env: { ...process.env, COWBD_GUEST_CACHE: GUEST_CACHE }, maxBuffer: 16 << 20 },
      (err, stdout, stderr) => {
        const code = err ? (err as { code?: unknown }).code : 0;
        if (code === SKIP_EXIT) {
          const reason = stderr.trim().split('\n').pop() ?? 'guest preparation unavailable';
          if (process.env.COWBD_REQUIRE_GUEST === '1') reject(new Error(`COWBD_REQUIRE_GUEST=1 but ${reason}`));
          else resolve({ skip: reason });
        } else if (err) {
          reject(new Error(`scripts/guest/prepare.sh failed (${code}):\n${stderr}`));
        } else {
          resolve({ dir: stdout.trim().split('\n').pop()! });
        }
      },
    );
  });
  return prepared;
}

/** For `t.test(name, { skip: await guestSkipReason() }, ...)`: false when the guest can run. */
export async function guestSkipReason(): Promise<string | false> {
  const p = await prepareGuest();
  return 'skip' in p ? p.skip : false;
}

const live = new Set<ChildProcess>();

/** Kills every qemu this process started that is still running. Use in t.teardown. */
export function killGuests(): void {
  for (const p of live) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  live.clear();
}
// A test that crashes or is cancelled must not leave a qemu spinning on a core. A
// signal skips 'exit' handlers, so kill the guests and then let the signal do what
// it would have done (once our listener is gone, the default or tap's own).
let hooked = false;
function hookProcessExit(): void {
  if (hooked) return;
  hooked = true;
  process.once('exit', killGuests);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      killGuests();
      process.kill(process.pid, sig);
    });
  }
}

export async function runGuest(opts: GuestOptions): Promise<GuestResult> {
  const p = await prepareGuest();
  if ('skip' in p) throw new Error(`guest unavailable: ${p.skip}`);
  const timeoutMs = opts.timeoutMs ?? 120_000;
  const attachTimeout = opts.attachTimeoutS ?? 30;
  const exportsFile = (opts.exports ?? [])
    .map((e) => {
      if (/\s/.test(e.name ?? '')) throw new Error(`export name with whitespace: ${JSON.stringify(e.name)}`);
      return `${e.port} ${e.device} ${e.name || '-'} ${e.connections ?? 1} ${attachTimeout}\n`;
    })
    .join('');

  const work = await mkdtemp(join(tmpdir(), 'cowbd-guest-run-'));
  try {
    const base = await readFile(join(p.dir, 'initramfs.img'));
    // The kernel unpacks concatenated archives, but an uncompressed one must start
    // 4-byte aligned; the NUL padding in between is skipped.
    const pad = Buffer.alloc((4 - (base.length % 4)) % 4);
    const extra = cpioNewc([
      { name: 'cowbd', mode: 0o40755 },
      { name: 'cowbd/exports', mode: 0o100644, data: Buffer.from(exportsFile) },
      { name: 'cowbd/script.sh', mode: 0o100755, data: Buffer.from(`${opts.script}\n`) },
      ...(opts.files ?? []).map((f) => {
        if (!/^[\w.-]+$/.test(f.name)) throw new Error(`guest file name must be one plain name: ${JSON.stringify(f.name)}`);
        return { name: `cowbd/${f.name}`, mode: 0o100000 | (f.mode ?? 0o644), data: f.data };
      }),
      // The guest powers itself off a little after the host would have killed it, so
      // even a qemu whose runner died cannot outlive the test by much.
      { name: 'cowbd/deadline', mode: 0o100644, data: Buffer.from(`${Math.ceil(timeoutMs / 1000) + 10}\n`) },
    ]);
    const initrd = join(work, 'initrd.img');
    await writeFile(initrd, Buffer.concat([base, pad, extra]));
    return await boot(join(p.dir, 'kernel'), initrd, opts, timeoutMs);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

function boot(kernel: string, initrd: string, opts: GuestOptions, timeoutMs: number): Promise<GuestResult> {
  const args = [
    // KVM cannot boot a stock kernel on this host; TCG can, and behaves the same in CI.
    '-accel',
    'tcg',
    '-cpu',
    'max',
    '-smp',
    String(opts.cpus ?? Number(process.env.COWBD_GUEST_CPUS ?? 1)),
    '-m',
    String(opts.memoryMb ?? 512),
    '-nodefaults',
    '-no-reboot',
    '-display',
    'none',
    '-monitor',
    'none',
    '-serial',
    'stdio',
    '-kernel',
    kernel,
    '-initrd',
    initrd,
    // panic=-1 reboots on a panic, and -no-reboot turns that into qemu exiting.
    '-append',
    ['console=ttyS0 panic=-1 oops=panic rdinit=/init', process.env.COWBD_GUEST_APPEND ?? ''].join(' ').trim(),
    '-netdev',
    'user,id=net0',
    '-device',
    'virtio-net-pci,netdev=net0',
  ];
  const started = Date.now();
  hookProcessExit();
  const proc = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(proc);
  const logFile = opts.log ? createWriteStream(opts.log) : undefined;
  let text = '';
  let exitCode: number | null = null;
  let timedOut = false;
  let graceTimer: NodeJS.Timeout | undefined;
  let initMs: number | undefined;
  let exitMarkerMs: number | undefined;
  const onData = (chunk: Buffer) => {
    logFile?.write(chunk);
    text += chunk.toString('latin1');
    if (initMs === undefined && text.includes('COWBD-INIT')) initMs = Date.now() - started;
    if (exitCode === null) {
      // Only a whole line counts: a read may end in the middle of "COWBD-EXIT=24".
      const m = /COWBD-EXIT=(\d+)\r?\n/.exec(text);
      if (m) {
        exitCode = Number(m[1]);
        exitMarkerMs = Date.now() - started;
        // poweroff -f exits qemu within moments; do not wait on a wedged guest.
        graceTimer = setTimeout(() => proc.kill('SIGKILL'), 15_000);
      }
    }
  };
  proc.stdout!.on('data', onData);
  proc.stderr!.on('data', onData);
  const timer = setTimeout(() => {
    timedOut = exitCode === null;
    proc.kill('SIGKILL');
  }, timeoutMs);

  return new Promise<GuestResult>((resolve, reject) => {
    proc.once('error', (err) => {
      clearTimeout(timer);
      live.delete(proc);
      logFile?.end();
      reject(err);
    });
    proc.once('close', () => {
      clearTimeout(timer);
      clearTimeout(graceTimer);
      live.delete(proc);
      const uptime = (tag: string) => {
        const m = new RegExp(`${tag}.*uptime=([\\d.]+)`).exec(text);
        return m ? Number(m[1]) : undefined;
      };
      const result: GuestResult = {
        exitCode,
        timedOut,
        log: text,
        wallMs: Date.now() - started,
        initMs,
        exitMarkerMs,
        uptime: { init: uptime('COWBD-INIT'), attached: uptime('COWBD-ATTACHED'), scriptDone: uptime('COWBD-SCRIPT-DONE') },
      };
      if (logFile) logFile.end(() => resolve(result));
      else resolve(result);
    });
  });
}

/** Where a test's guest console goes: $COWBD_GUEST_LOGS or $TMPDIR/cowbd-guest-logs. */
export async function guestLogPath(name: string): Promise<string> {
  const dir = process.env.COWBD_GUEST_LOGS ?? join(tmpdir(), 'cowbd-guest-logs');
  await mkdir(dir, { recursive: true });
  return join(dir, `${name}.log`);
}

/** The last lines of a console log from the guest init on (the kernel's boot chatter
 *  before it rarely explains a failure), as an array so tap prints one per line. */
export function tail(log: string, lines = 40): string[] {
  const text = log.replace(/\r/g, '');
  const init = text.indexOf('COWBD-INIT');
  return (init >= 0 ? text.slice(init) : text).split('\n').slice(-lines);
}

interface CpioEntry {
  name: string;
  mode: number;
  data?: Buffer;
}

/** A newc ("070701") cpio archive, the format the kernel's initramfs unpacker reads. */
export function cpioNewc(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let offset = 0;
  const push = (b: Buffer) => {
    parts.push(b);
    offset += b.length;
  };
  const align = () => {
    const n = (4 - (offset % 4)) % 4;
    if (n) push(Buffer.alloc(n));
  };
  const mtime = Math.floor(Date.now() / 1000);
  const all = [...entries, { name: 'TRAILER!!!', mode: 0 }];
  all.forEach((e, i) => {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(`${e.name}\0`);
    const fields = [i + 1, e.mode, 0, 0, e.mode & 0o40000 ? 2 : 1, mtime, data.length, 0, 0, 0, 0, name.length, 0];
    push(Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`, 'ascii'));
    push(name);
    align();
    if (data.length) {
      push(data);
      align();
    }
  });
  return Buffer.concat(parts);
}
