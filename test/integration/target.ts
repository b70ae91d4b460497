// The server under test for the integration suite. By default that is cowbd
// (through the shared fixture); COWBD_IT_TARGET=nbdkit runs the same tests
// against nbdkit's file plugin, which is how these tests were proven before
// cowbd existed and how a failure is told apart from a test bug.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { createServer, connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI, cowbd, startDaemon, type Daemon } from '../helpers/daemon.js';

export type TargetKind = 'cowbd' | 'nbdkit';
export const TARGET: TargetKind = process.env.COWBD_IT_TARGET === 'nbdkit' ? 'nbdkit' : 'cowbd';

export interface Target {
  kind: TargetKind;
  port: number;
  dataDir: string;
  uri(name: string): string;
  stop(): Promise<unknown>;
  /** cowbd's JSON log lines; empty for nbdkit. */
  logs: Record<string, unknown>[];
}

export interface TargetOptions {
  volumes: { name: string; size: string }[];
  readOnly?: boolean;
}

export async function startTarget(opts: TargetOptions): Promise<Target> {
  if (TARGET === 'nbdkit') return startNbdkit(opts);
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run npm run build`);
  // The fixture creates volumes one node process at a time, about a second each
  // under tap; creating them side by side here keeps multi-volume tests quick.
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-it-'));
  let d: Daemon;
  try {
    await Promise.all(opts.volumes.map((v) => cowbd(['volume', 'create', v.name, '--size', v.size, '--data-dir', dataDir])));
    d = await startDaemon({ dataDir, readOnly: opts.readOnly });
  } catch (e) {
    await rm(dataDir, { recursive: true, force: true });
    throw e;
  }
  let stopped: Promise<unknown> | undefined;
  return {
    kind: 'cowbd',
    port: d.port,
    dataDir,
    uri: (n) => d.uri(n),
    logs: d.logs,
    stop() {
      stopped ??= d.stop().then(() => rm(dataDir, { recursive: true, force: true }));
      return stopped;
    },
  };
}

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

export function sizeBytes(size: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(size);
  if (!m) throw new Error(`bad size ${size}`);
  return Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
}

export async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => res(port));
    });
  });
}

async function waitForPort(port: number, proc: ChildProcess, deadlineMs = 10_000): Promise<void> {
  const until = Date.now() + deadlineMs;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`server exited with ${proc.exitCode} before listening`);
    const ok = await new Promise<boolean>((res) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        res(true);
      });
      s.once('error', () => res(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`nothing listening on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function startNbdkit(opts: TargetOptions): Promise<Target> {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-it-nbdkit-'));
  for (const v of opts.volumes) {
    const f = join(dataDir, v.name);
    await writeFile(f, '');
    await truncate(f, sizeBytes(v.size));
  }
  const port = await freePort();
  const args = ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port)];
  if (opts.readOnly) args.push('-r');
  args.push('file', `dir=${dataDir}`);
  const proc = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'inherit'] });
  await waitForPort(port, proc);
  let stopped: Promise<unknown> | undefined;
  return {
    kind: 'nbdkit',
    port,
    dataDir,
    logs: [],
    uri: (n) => `nbd://127.0.0.1:${port}/${n}`,
    stop() {
      stopped ??= new Promise<void>((res) => {
        if (proc.exitCode !== null) return res();
        proc.once('exit', () => res());
        proc.kill('SIGTERM');
      }).then(() => rm(dataDir, { recursive: true, force: true }));
      return stopped;
    },
  };
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a client program to completion; never throws on a non-zero exit. */
export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((res, rej) => {
    execFile(cmd, args, { maxBuffer: 64 << 20, timeout: timeoutMs }, (err, stdout, stderr) => {
      if (err && typeof err.code !== 'number') return rej(err);
      res({ code: err ? Number(err.code) : 0, stdout, stderr });
    });
  });
}
