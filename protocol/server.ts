// Accepts NBD clients on TCP and unix sockets and tracks their connections.
import { createServer, type Server, type Socket } from 'node:net';
import { unlink } from 'node:fs/promises';
import type { ExportRegistry } from './backend.js';
import { ByteBudget } from './budget.js';
import { Connection } from './connection.js';
import { DEFAULT_LIMITS, type ConnectionLimits, type RequestObserver } from './connection-options.js';
import type { Logger } from './logger.js';
import type { TlsPolicy } from './tls.js';
import { adoptSocket } from './direct-socket.js';

export interface ServerLimits extends ConnectionLimits {
  /** Connections accepted at once, across all listeners. */
  maxConnections: number;
  /** Connections in transmission on one export at once; 0: no limit. Checked at GO / EXPORT_NAME. */
  maxConnectionsPerExport: number;
  /** Payload and read-buffer bytes held across all connections before they stop reading; 0: no limit. */
  maxTotalBytesInFlight: number;
}

/** Total bytes in flight across connections when not configured. */
export const DEFAULT_TOTAL_BYTES_IN_FLIGHT = 256 * 1024 * 1024;

export interface ListenAddress {
  host?: string;
  port?: number;
  path?: string;
}

export class NbdServer {
  private readonly listeners: Server[] = [];
  private readonly connections = new Set<Connection>();
  private readonly limits: ServerLimits;
  private closing?: Promise<void>;

  /** Accepted sockets read into buffers their connection picks (see direct-socket.ts). */
  private readonly directReads: boolean;
  /**
   * Where direct-read sockets put headers and small payloads, shared by all of
   * them (see Connection.useDirectReads). Node also asks for a buffer before
   * the connection exists, and gets this one.
   */
  private readonly stage = Buffer.allocUnsafeSlow(256 * 1024);

  constructor(
    private readonly registry: ExportRegistry,
    private readonly log: Logger,
    limits: Partial<ServerLimits> = {},
    private readonly observer: RequestObserver = {},
    /** STARTTLS policy for every listener, unix sockets included. */
    private readonly tls: TlsPolicy = { mode: 'off' },
  ) {
    this.directReads = tls.mode === 'off' && process.env.COWBD_DIRECT_READS !== '0';
    this.limits = {
      ...DEFAULT_LIMITS,
      maxConnections: 1024,
      maxConnectionsPerExport: 0,
      maxTotalBytesInFlight: DEFAULT_TOTAL_BYTES_IN_FLIGHT,
      ...limits,
    };
    // Without a limit the budget still counts, for the bytes-in-flight gauge.
    this.limits.budget ??= new ByteBudget(this.limits.maxTotalBytesInFlight > 0 ? this.limits.maxTotalBytesInFlight : Infinity, log);
    if (this.limits.maxConnectionsPerExport > 0) {
      // Connections see the registry plus admit(); everything else is the registry's own.
      const inner = registry;
      this.registry = Object.create(inner, {
        admit: { value: (name: string) => this.admit(name) ?? inner.admit?.(name) },
      }) as ExportRegistry;
    }
  }

  /** Bytes that requests in flight hold across all connections. */
  get bytesInFlight(): number {
    return this.limits.budget?.inUse ?? 0;
  }

  /** The per-export connection limit, checked when a client asks to enter transmission. */
  private admit(exportName: string): string | undefined {
    const max = this.limits.maxConnectionsPerExport;
    const open = this.connectionsFor(exportName).length;
    if (open < max) return undefined;
    this.log.warn({ export: exportName, open, max }, 'per-export connection limit reached; refusing client');
    return `export "${exportName}" already has ${open} connections, its limit`;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Starts a listener; resolves with the bound address (the real port when 0 was asked). */
  async listen(addr: ListenAddress): Promise<{ host?: string; port?: number; path?: string }> {
    // Half-open: a client that shuts down its write side still gets the replies to
    // what it sent (Connection closes once they are out).
    // Paused so that, without TLS, accept() can move the handle to a direct-read socket before any byte is read.
    const server = createServer({ noDelay: true, pauseOnConnect: this.directReads, allowHalfOpen: true }, (s) => this.accept(s));
    server.on('error', (err) => this.log.error({ err }, 'listener error'));
    if (addr.path) {
      await unlink(addr.path).catch(() => undefined);
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      const done = () => {
        server.off('error', reject);
        resolve();
      };
      if (addr.path) server.listen(addr.path, done);
      else server.listen(addr.port ?? 10809, addr.host ?? '127.0.0.1', done);
    });
    this.listeners.push(server);
    const a = server.address();
    if (typeof a === 'string') return { path: a };
    return { host: a?.address, port: a?.port };
  }

  private accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (this.connections.size >= this.limits.maxConnections) {
      this.log.warn({ remote: socket.remoteAddress, max: this.limits.maxConnections }, 'connection limit reached; refusing client');
      socket.destroy();
      return;
    }
    let conn: Connection | undefined;
    // STARTTLS moves the stream onto a TLSSocket, which must own the handle's reads.
    const direct = this.directReads ? adoptSocket(socket, () => conn, this.stage) : undefined;
    if (this.directReads && !direct) socket.resume();
    conn = new Connection(direct ?? socket, this.registry, this.limits, this.log, this.observer, undefined, this.tls);
    if (direct) conn.useDirectReads(this.stage);
    this.connections.add(conn);
    conn.once('close', () => this.connections.delete(conn));
    conn.start();
  }

  /** Connections currently serving the named export. */
  connectionsFor(exportName: string): Connection[] {
    return [...this.connections].filter((c) => c.exportName === exportName);
  }

  /** Stops accepting, lets requests in flight finish, closes every connection. Idempotent. */
  close(graceMs = 10_000): Promise<void> {
    this.closing ??= (async () => {
      // net.Server#close only calls back once every connection has ended, so the
      // listeners stop accepting first and are awaited after the connections close.
      const stopped = this.listeners.map((l) => new Promise<void>((r) => l.close(() => r())));
      const all = [...this.connections].map((c) => c.close());
      const timer = setTimeout(() => {
        for (const c of this.connections) c.destroy();
      }, graceMs);
      await Promise.all(all);
      clearTimeout(timer);
      await Promise.all(stopped);
    })();
    return this.closing;
  }
}
