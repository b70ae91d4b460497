// `cowbd serve`: open the data directory, export every volume, run until a signal.
import { mkdir } from 'node:fs/promises';
import type { Logger } from 'pino';
import { NbdServer } from '../protocol/server.js';
import { Errors } from './errors.js';
import { FileVolume } from './file-volume.js';
import { Registry } from './registry.js';
import { formatSize } from './sizes.js';
import { createVolume, listVolumes } from './volumes.js';
import { lockDataDir } from './lock.js';

export interface ServeOptions {
  dataDir: string;
  listen?: string[];
  socket?: string;
  readOnly: boolean;
  defaultVolume: string;
  defaultSize: number;
  maxConnections: number;
  handshakeTimeoutMs: number;
}

export function parseHostPort(text: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text);
  if (!m) throw Errors.badAddress(text);
  const port = Number(m[3]);
  if (port > 65535) throw Errors.badAddress(text);
  return { host: m[1] ?? (m[2] || '127.0.0.1'), port };
}

export interface RunningDaemon {
  server: NbdServer;
  registry: Registry;
  addresses: { host?: string; port?: number; path?: string }[];
  stop(): Promise<void>;
}

export async function startServe(opts: ServeOptions, log: Logger): Promise<RunningDaemon> {
  await mkdir(opts.dataDir, { recursive: true, mode: 0o700 });
  const lock = await lockDataDir(opts.dataDir);
  let vols = await listVolumes(opts.dataDir);
  if (vols.length === 0 && !opts.readOnly) {
    const v = await createVolume(opts.dataDir, opts.defaultVolume, opts.defaultSize);
    log.info({ volume: v.name, size: v.size, path: v.path }, 'no volume found; created the default volume');
    vols = [v];
  }
  const registry = new Registry(vols.some((v) => v.name === opts.defaultVolume) ? opts.defaultVolume : undefined);
  const opened: FileVolume[] = [];
  for (const v of vols) {
    const fv = await FileVolume.open(v.path, {
      name: v.name,
      description: `volume ${v.name}, ${formatSize(v.size)}${opts.readOnly ? ', read-only' : ''}`,
      readOnly: opts.readOnly,
    });
    opened.push(fv);
    registry.add(fv);
  }
  const server = new NbdServer(registry, log, {
    maxConnections: opts.maxConnections,
    handshakeTimeoutMs: opts.handshakeTimeoutMs,
  });
  const addresses = [];
  const listen = opts.listen ?? (opts.socket ? [] : ['127.0.0.1:10809']);
  for (const l of listen) {
    const a = await server.listen(parseHostPort(l));
    addresses.push(a);
    log.info({ address: a.host, port: a.port }, 'listening');
  }
  if (opts.socket) {
    const a = await server.listen({ path: opts.socket });
    addresses.push(a);
    log.info({ path: a.path }, 'listening');
  }
  log.info({ dataDir: opts.dataDir, exports: registry.list().map((e) => e.name), default: registry.default }, 'serving');
  let stopping: Promise<void> | undefined;
  return {
    server,
    registry,
    addresses,
    stop() {
      stopping ??= (async () => {
        await server.close();
        for (const v of opened) {
          if (!v.info.readOnly) await v.flush().catch((err) => log.error({ err, volume: v.info.name }, 'final flush failed'));
          await v.close();
        }
        await lock.release();
      })();
      return stopping;
    },
  };
}
