// Starts a real cowbd daemon (the built dist/ binary) for a test, and stops it.
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createInterface } from 'node:readline';

const execFileP = promisify(execFile);
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CLI = join(ROOT, 'dist', 'daemon', 'cli.cjs');

export interface DaemonOptions {
  /** Volumes to create before serving: name and lvcreate-style size ("64M"). */
  volumes?: { name: string; size: string }[];
  dataDir?: string;
  readOnly?: boolean;
  /** Extra `cowbd serve` arguments. */
  args?: string[];
  /** Also serve on a unix socket at this path. */
  socket?: string;
  /** --log-level; default debug. The port is read from an info line, so no higher than info. */
  logLevel?: 'trace' | 'debug' | 'info';
  /** Keep only the log lines this accepts (long runs); default all. */
  keepLog?: (rec: Record<string, unknown>) => boolean;
  /** A command that execs the daemon, as env(1) does: its pid stays the daemon's. */
  launcher?: string[];
}

export interface Daemon {
  host: string;
  port: number;
  /** Where /metrics is served. */
  metricsPort: number;
  dataDir: string;
  proc: ChildProcess;
  /** Every JSON log line the daemon printed so far. */
  logs: Record<string, unknown>[];
  /** `nbd://127.0.0.1:PORT/NAME` */
  uri(name?: string): string;
  /** SIGTERM, wait for exit; returns the exit code. Idempotent. */
  stop(): Promise<number | null>;
}

/**
 * Waits for a log line that matches: lines travel through the daemon's stdout pipe and
 * can trail the reply or hang-up that a test saw first. False after timeoutMs.
 */
export async function waitForLog(d: Daemon, match: (l: Record<string, unknown>) => boolean, timeoutMs = 3000): Promise<boolean> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) {
    if (d.logs.some(match)) return true;
  }
  return d.logs.some(match);
}

export async function cowbd(args: string[], env?: NodeJS.ProcessEnv): Promise<{ stdout: string; stderr: string }> {
  return execFileP(process.execPath, [CLI, ...args], { env: { ...process.env, ...env } });
}

/** Runs the CLI and returns its exit code and output, failing or not. */
export async function cowbdResult(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    return { code: 0, ...(await execFileP(process.execPath, [CLI, ...args])) };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

export async function startDaemon(opts: DaemonOptions = {}): Promise<Daemon> {
  const ownDir = !opts.dataDir;
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), 'cowbd-test-')));
  for (const v of opts.volumes ?? []) {
    await cowbd(['volume', 'create', v.name, '--size', v.size, '--data-dir', dataDir]);
  }
  const args = [
    CLI,
    'serve',
    '--data-dir',
    dataDir,
    '--listen',
    '127.0.0.1:0',
    '--metrics-listen',
    '127.0.0.1:0',
    '--log-level',
    opts.logLevel ?? 'debug',
  ];
  if (opts.readOnly) args.push('--read-only');
  if (opts.socket) args.push('--socket', opts.socket);
  args.push(...(opts.args ?? []));
  const [cmd, ...pre] = [...(opts.launcher ?? []), process.execPath];
  const proc = spawn(cmd!, [...pre, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  const logs: Record<string, unknown>[] = [];
  let metricsPort = 0;
  let nbdPort = 0;
  const port = await new Promise<number>((res, rej) => {
    const rl = createInterface({ input: proc.stdout! });
    rl.on('line', (line) => {
      let rec: Record<string, unknown>;
      try {
        rec = JSON.parse(line);
      } catch {
        return;
      }
      if (!opts.keepLog || opts.keepLog(rec)) logs.push(rec);
      if (rec.msg === 'metrics listening' && typeof rec.port === 'number') metricsPort = rec.port;
      if (rec.msg === 'listening' && typeof rec.port === 'number') nbdPort ||= rec.port;
      // 'serving' comes last, after the metrics listener: both ports are known by then.
      if (rec.msg === 'serving') res(nbdPort);
    });
    proc.once('exit', (code) => rej(new Error(`cowbd exited with ${code} before listening`)));
    proc.once('error', rej);
  });
  let stopped: Promise<number | null> | undefined;
  return {
    host: '127.0.0.1',
    port,
    metricsPort,
    dataDir,
    proc,
    logs,
    uri: (name = '') => `nbd://127.0.0.1:${port}/${name}`,
    stop() {
      stopped ??= new Promise<number | null>((res) => {
        if (proc.exitCode !== null) return res(proc.exitCode);
        const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000);
        proc.once('exit', (code) => {
          clearTimeout(timer);
          res(code);
        });
        proc.kill('SIGTERM');
      }).then(async (code) => {
        if (ownDir) await rm(dataDir, { recursive: true, force: true });
        return code;
      });
      return stopped;
    },
  };
}
