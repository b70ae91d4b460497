// `cowbd serve`: lock the data directory, export every volume and snapshot,
// run the control API and metrics, and stop cleanly on a signal.
import { chmod, stat } from 'node:fs/promises';
import type { Server } from 'node:http';
import type { Logger } from 'pino';
import { DEFAULT_TOTAL_BYTES_IN_FLIGHT, NbdServer } from '../protocol/server.js';
import { ExportAccess } from './access.js';
import { BackupStatus } from './backup-status.js';
import { privateSocketPath } from './backup-link.js';
import { serveRepository } from './backup-exports.js';
import { ControlServer } from './control-server.js';
import { controlSocketPath } from './control-client.js';
import { Errors } from './errors.js';
import { lockDataDir } from './lock.js';
import { Metrics } from './metrics.js';
import { controlRoutes } from './routes.js';
import { Service, type AutoExtendPolicy } from './service.js';
import type { RepoAccess } from './repo-access.js';
import { notifySystemd } from './systemd.js';
import { loadTls, type TlsSettings } from './tls.js';
import { createVolume, listVolumes, makeDataDir } from './volumes.js';

export interface ServeOptions {
  dataDir: string;
  listen?: string[];
  socket?: string;
  readOnly: boolean;
  defaultVolume: string;
  defaultSize: number;
  maxConnections: number;
  /** NBD connections to one export at once; 0 or absent: no limit. */
  maxConnectionsPerExport?: number;
  /** Bytes held by requests in flight across all connections; 0: no limit. Default 1 GiB. */
  maxTotalBytesInFlight?: number;
  /** Reply batches this big are written from the threadpool; 0: all from the event loop. Default: protocol's. */
  threadpoolSendBytes?: number;
  handshakeTimeoutMs: number;
  /** Close a connection whose read replies have not moved for this long; 0 or absent: never. */
  replyTimeoutMs?: number;
  /** HOST:PORT for /metrics, or undefined for none. */
  metricsListen?: string;
  autoExtend: AutoExtendPolicy;
  /** STARTTLS; default off. */
  tls?: TlsSettings;
  /** Per-export allow-lists and read-only flags; default: every export open to every client. */
  exports?: ExportAccess;
  /** Bytes of origin writes acknowledged per origin while their copies are made; default: cow's. */
  writeBehindBytes?: number;
  /** Backup repositories whose backups are served as read-only exports. */
  repos?: string[];
  /** How to reach them: S3 endpoint options, the key of encrypted ones. */
  repoAccess?: Omit<RepoAccess, 'repo'>;
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
  service: Service;
  addresses: { host?: string; port?: number; path?: string }[];
  metricsPort?: number;
  stop(): Promise<void>;
}

export async function startServe(opts: ServeOptions, log: Logger): Promise<RunningDaemon> {
  await makeDataDir(opts.dataDir);
  // The control socket inside is 0600; a data directory others can enter also
  // exposes the volume files' names and any file left group- or world-readable.
  const dirMode = (await stat(opts.dataDir)).mode & 0o777;
  if (dirMode & 0o077)
    log.warn({ dataDir: opts.dataDir, mode: dirMode.toString(8) }, 'the data directory is accessible to other users; chmod 700 it');
  // Certificates are read before anything is locked or served: a bad path fails fast.
  const tls = await loadTls(opts.tls ?? { mode: 'off', verifyPeer: false }, log);
  const access = opts.exports ?? ExportAccess.open;
  const lock = await lockDataDir(opts.dataDir);
  const cleanups: (() => Promise<void>)[] = [() => lock.release()];
  const cleanup = async () => {
    for (const f of cleanups.reverse()) await f().catch((err: unknown) => log.error({ err }, 'cleanup failed'));
  };
  try {
    if ((await listVolumes(opts.dataDir)).length === 0 && !opts.readOnly) {
      const v = await createVolume(opts.dataDir, opts.defaultVolume, opts.defaultSize);
      log.info({ volume: v.name, size: v.size, path: v.path }, 'no volume found; created the default volume');
    }
    const metrics = new Metrics();
    const service = await Service.open(
      {
        dataDir: opts.dataDir,
        readOnly: opts.readOnly,
        defaultVolume: opts.defaultVolume,
        autoExtend: opts.autoExtend,
        onCommit: (s) => metrics.observeCommit(s),
        exportReadOnly: (name) => access.readOnly(name),
        writeBehindBytes: opts.writeBehindBytes,
      },
      log,
    );
    cleanups.push(() => service.close());
    metrics.watch(service);
    if (!access.empty) service.registry.access = access;
    const server = new NbdServer(
      service.registry,
      log,
      {
        maxConnections: opts.maxConnections,
        handshakeTimeoutMs: opts.handshakeTimeoutMs,
        replyTimeoutMs: opts.replyTimeoutMs ?? 0,
        maxConnectionsPerExport: opts.maxConnectionsPerExport ?? 0,
        maxTotalBytesInFlight: opts.maxTotalBytesInFlight ?? DEFAULT_TOTAL_BYTES_IN_FLIGHT,
        ...(opts.threadpoolSendBytes !== undefined && { threadpoolSendBytes: opts.threadpoolSendBytes }),
      },
      metrics.observer(),
      tls,
    );
    service.onExportRemoved = (name) => metrics.dropExport(name);
    metrics.watchServer(server);
    const backups = await BackupStatus.open(opts.dataDir, log.child({ component: 'backup' }));
    backups.register(metrics.registry);
    const rescans: Array<() => Promise<void>> = [];
    for (const repo of opts.repos ?? []) {
      const repoLog = log.child({ component: 'backup-exports', repository: repo });
      const served = await serveRepository({ ...opts.repoAccess, repo }, service.registry, repoLog);
      cleanups.push(() => served.close());
      rescans.push(() => served.rescan());
    }

    // The backup command's way in: no TLS and no export rules, for the data directory's owner only.
    const own = new NbdServer(
      Object.create(service.registry, { authorize: { value: () => true }, access: { value: undefined } }),
      log.child({ component: 'private-nbd' }),
      { maxConnections: 64, handshakeTimeoutMs: opts.handshakeTimeoutMs, maxConnectionsPerExport: 0, maxTotalBytesInFlight: 0 },
      metrics.observer(),
    );
    const ownPath = privateSocketPath(opts.dataDir);
    await own.listen({ path: ownPath });
    await chmod(ownPath, 0o600);
    cleanups.push(() => own.close());

    const control = new ControlServer(log.child({ component: 'control' }));
    controlRoutes(control, service, {
      record: (r) => {
        backups.record(r);
        for (const f of rescans) void f();
      },
    });
    await control.listen(controlSocketPath(opts.dataDir));
    cleanups.push(() => control.close());

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
    let metricsPort: number | undefined;
    let metricsServer: Server | undefined;
    if (opts.metricsListen) {
      const { host, port } = parseHostPort(opts.metricsListen);
      const m = await metrics.listen(host, port);
      metricsServer = m.server;
      metricsPort = m.port;
      log.info({ address: host, port: m.port }, 'metrics listening');
    }
    log.info(
      {
        dataDir: opts.dataDir,
        exports: service.registry.list().map((e) => e.name),
        default: service.registry.default,
        tls: tls.mode,
        tlsVerifyPeer: opts.tls?.verifyPeer ?? false,
        ...(access.empty ? {} : { access: access.describe() }),
      },
      'serving',
    );
    void notifySystemd('ready', log);
    let stopping: Promise<void> | undefined;
    return {
      server,
      service,
      addresses,
      metricsPort,
      stop() {
        stopping ??= (async () => {
          void notifySystemd('stopping', log);
          await server.close();
          if (!opts.readOnly) await service.flushAll();
          if (metricsServer) {
            metricsServer.closeAllConnections();
            await new Promise<void>((r) => metricsServer!.close(() => r()));
          }
          await cleanup();
        })();
        return stopping;
      },
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}
