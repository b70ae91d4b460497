// The servers the fuzzer drives: the real daemon (dist/daemon/cli.cjs) with the
// exports fuzzer.ts names, or an in-process NbdServer over memory backends.
import { NbdServer } from '../../protocol/server.js';
import { silentLogger } from '../../protocol/logger.js';
import { cowbd, startDaemon, type Daemon, type DaemonOptions } from '../helpers/daemon.js';
import { MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';
import { metricValue, scrape } from '../helpers/proc.js';
import { FUZZ_EXPORTS } from './fuzzer.js';
import type { Target } from './driver.js';

export const CANARY_EXPORT = 'canary';
const CANARY_SIZE = 8 * 1024 * 1024;

export interface FuzzTarget extends Target {
  /** The process to measure (the daemon, or this process when in-process). */
  pid: number;
  /** Why the target is unusable (the daemon exited), else undefined. */
  dead(): string | undefined;
  daemon?: Daemon;
  /** Open NBD connections as the server counts them (cowbd_nbd_connections). */
  connections(): Promise<number>;
  stop(): Promise<void>;
}

/** A daemon serving fuzz (default, writable), fuzzsnap (read-only snapshot of fuzz) and canary. */
export async function startFuzzDaemon(opts: Pick<DaemonOptions, 'args' | 'keepLog'> = {}): Promise<FuzzTarget> {
  const mib = (n: number) => `${n / (1024 * 1024)}M`;
  const d = await startDaemon({
    volumes: [
      { name: FUZZ_EXPORTS.main, size: mib(FUZZ_EXPORTS.size) },
      { name: CANARY_EXPORT, size: mib(CANARY_SIZE) },
    ],
    logLevel: 'info',
    args: ['--default-volume', FUZZ_EXPORTS.main, ...(opts.args ?? [])],
    keepLog: opts.keepLog,
  });
  try {
    // A store as large as the origin plus metadata never overflows, so reads never fail.
    await cowbd([
      'snapshot',
      'create',
      FUZZ_EXPORTS.readOnly,
      '--origin',
      FUZZ_EXPORTS.main,
      '--size',
      mib(FUZZ_EXPORTS.size + 8 * 1024 * 1024),
      '--read-only',
      '--data-dir',
      d.dataDir,
    ]);
  } catch (err) {
    await d.stop();
    throw err;
  }
  let exit: string | undefined;
  d.proc.once('exit', (code, signal) => (exit = `the daemon exited (code ${code}, signal ${signal})`));
  return {
    host: d.host,
    port: d.port,
    pid: d.proc.pid!,
    daemon: d,
    dead: () => exit,
    connections: async () => metricValue(await scrape(d.metricsPort), 'cowbd_nbd_connections') ?? NaN,
    async stop() {
      const code = await d.stop();
      if (code !== 0 && !exit) exit = `the daemon exited with ${code} on SIGTERM`;
    },
  };
}

/** The same exports from an NbdServer in this process, over memory. */
export async function startFuzzInProcess(): Promise<FuzzTarget> {
  const registry = new MemoryRegistry([
    new MemoryBackend(FUZZ_EXPORTS.main, FUZZ_EXPORTS.size),
    new MemoryBackend(FUZZ_EXPORTS.readOnly, FUZZ_EXPORTS.roSize, true),
    new MemoryBackend(CANARY_EXPORT, CANARY_SIZE),
  ]);
  const server = new NbdServer(registry, silentLogger);
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  return {
    host: '127.0.0.1',
    port: a.port!,
    pid: process.pid,
    dead: () => undefined,
    connections: async () => server.connectionCount,
    stop: () => server.close(),
  };
}
