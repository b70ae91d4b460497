// Prometheus metrics (prom-client). NBD request metrics are fed by the protocol
// layer's observer; storage gauges are read from their sources at scrape time.
import { statfs } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import client from 'prom-client';
import type { RequestObserver } from '../protocol/connection-options.js';
import type { Service } from './service.js';

const STATES = ['valid', 'invalid', 'overflow', 'merging'] as const;
const COMMANDS = ['read', 'write', 'disc', 'flush', 'trim', 'cache', 'write_zeroes', 'block_status', 'unknown'];
const RESULTS = ['ok', 'EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN'];

/**
 * One export's labelled series, looked up once: prom-client hashes the label object on
 * every inc/observe, a cost small reads feel (docs/tuning.md, ExportSeries).
 */
interface ExportSeries {
  inFlight: { inc(): void; dec(): void };
  /** By `${command} ${result}`. */
  requests: Map<string, { inc(): void }>;
  latency: Map<string, { observe(v: number): void }>;
  bytes: Map<string, { inc(v: number): void }>;
}

function cached<T>(m: Map<string, T>, key: string, make: () => T): T {
  let v = m.get(key);
  if (v === undefined) {
    v = make();
    m.set(key, v);
  }
  return v;
}

export class Metrics {
  readonly registry = new client.Registry();
  private readonly series = new Map<string, ExportSeries>();
  private readonly requests: client.Counter<'export' | 'command' | 'result'>;
  private readonly bytes: client.Counter<'export' | 'direction'>;
  private readonly latency: client.Histogram<'export' | 'command'>;
  private readonly inFlight: client.Gauge<'export'>;
  private readonly connections: client.Gauge;
  private readonly commitLatency: client.Histogram;

  constructor() {
    client.collectDefaultMetrics({ register: this.registry, prefix: 'cowbd_' });
    const registers = [this.registry];
    dropMisnamedDefaults(this.registry);
    this.requests = new client.Counter({
      name: 'cowbd_nbd_requests_total',
      help: 'NBD requests served, by export, command and result (ok or the NBD error)',
      labelNames: ['export', 'command', 'result'],
      registers,
    });
    this.bytes = new client.Counter({
      name: 'cowbd_nbd_bytes_total',
      help: 'Bytes read and written through NBD, by export',
      labelNames: ['export', 'direction'],
      registers,
    });
    this.latency = new client.Histogram({
      name: 'cowbd_nbd_request_duration_seconds',
      help: 'NBD request latency from header parsed to reply queued',
      labelNames: ['export', 'command'],
      registers,
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    });
    this.inFlight = new client.Gauge({
      name: 'cowbd_nbd_requests_in_flight',
      help: 'NBD requests being served, by export',
      labelNames: ['export'],
      registers,
    });
    this.connections = new client.Gauge({ name: 'cowbd_nbd_connections', help: 'Open NBD connections', registers });
    this.commitLatency = new client.Histogram({
      name: 'cowbd_cow_commit_duration_seconds',
      help: 'Exception store group commits: metadata write and fdatasync',
      registers,
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
    });
  }

  observeCommit(seconds: number): void {
    this.commitLatency.observe(seconds);
  }

  /** Storage gauges and totals, computed from the service at scrape time. */
  watch(svc: Service): void {
    const registers = [this.registry];
    /** One series per snapshot; none for a snapshot pick gives undefined. */
    const perSnapshot = (name: string, help: string, pick: (u: ReturnType<Service['snapshots']>[number]) => number | undefined) =>
      new client.Gauge({
        name,
        help,
        labelNames: ['snapshot', 'origin'],
        registers,
        collect() {
          this.reset();
          for (const u of svc.snapshots()) {
            const v = pick(u);
            if (v !== undefined) this.set({ snapshot: u.name, origin: u.origin }, v);
          }
        },
      });
    perSnapshot('cowbd_snapshot_chunks_used', 'Chunks charged to the snapshot, data and metadata', (u) => u.usedChunks);
    perSnapshot('cowbd_snapshot_chunks_capacity', 'Chunks the snapshot may use (its --size)', (u) => u.capacityChunks);
    perSnapshot('cowbd_snapshot_used_bytes', 'Bytes charged to the snapshot, data and metadata', (u) => u.usedBytes);
    perSnapshot('cowbd_snapshot_capacity_bytes', 'Bytes the snapshot may use (its --size)', (u) => u.capacityBytes);
    perSnapshot('cowbd_snapshot_used_ratio', 'Used over capacity, 0 to 1', (u) => (u.capacityChunks ? u.usedChunks / u.capacityChunks : 0));
    perSnapshot('cowbd_snapshot_exceptions', 'Chunks of the snapshot that no longer read from the origin', (u) => u.exceptions);
    perSnapshot('cowbd_snapshot_created_timestamp_seconds', 'When the snapshot was taken', (u) => u.createdAt.getTime() / 1000);
    perSnapshot('cowbd_snapshot_reserved_bytes', 'Bytes kept allocated on disk for the snapshot (0 when sparse)', (u) => u.reservedBytes);
    perSnapshot('cowbd_snapshot_sparse', '1 when the snapshot reserves nothing on disk (--sparse), else 0', (u) => (u.sparse ? 1 : 0));
    const perMerge = (name: string, help: string, pick: (m: NonNullable<ReturnType<Service['snapshots']>[number]['merge']>) => number) =>
      perSnapshot(name, help, (u) => (u.merge ? pick(u.merge) : undefined));
    perMerge(
      'cowbd_snapshot_merge_total_chunks',
      'Chunks a merging snapshot copies back into its origin; no series unless merging',
      (m) => m.totalChunks,
    );
    perMerge(
      'cowbd_snapshot_merge_merged_chunks',
      'Chunks a merging snapshot has copied back so far; no series unless merging',
      (m) => m.mergedChunks,
    );
    perMerge(
      'cowbd_snapshot_merge_rate_bytes',
      "Bound on a merge's background copy, bytes a second (0: none); no series unless merging",
      (m) => m.rate,
    );
    perSnapshot(
      'cowbd_snapshot_merge_pending',
      "1 while the snapshot's merge waits for its origin's NBD clients to disconnect, else 0",
      (u) => (u.mergePending ? 1 : 0),
    );
    new client.Gauge({
      name: 'cowbd_snapshot_invalid_reason',
      help: 'Why an invalid snapshot was invalidated: 1 for its reason (full, disk-full, io-error, unknown); no series while valid',
      labelNames: ['snapshot', 'origin', 'reason'],
      registers,
      collect() {
        this.reset();
        for (const u of svc.snapshots()) if (u.invalid) this.set({ snapshot: u.name, origin: u.origin, reason: u.invalid.reason }, 1);
      },
    });
    new client.Gauge({
      name: 'cowbd_snapshot_invalidated_used_bytes',
      help: 'Bytes an invalid snapshot held when it was invalidated; no series while valid',
      labelNames: ['snapshot', 'origin'],
      registers,
      collect() {
        this.reset();
        for (const u of svc.snapshots()) if (u.invalid) this.set({ snapshot: u.name, origin: u.origin }, u.invalid.usedBytes);
      },
    });
    new client.Gauge({
      name: 'cowbd_snapshot_state',
      help: 'Snapshot state: 1 for the current one of valid, invalid, overflow, merging',
      labelNames: ['snapshot', 'origin', 'state'],
      registers,
      collect() {
        this.reset();
        for (const u of svc.snapshots()) {
          for (const st of STATES) this.set({ snapshot: u.name, origin: u.origin, state: st }, u.state === st ? 1 : 0);
        }
      },
    });
    const perStore = (name: string, help: string, pick: (st: ReturnType<Service['cow']['stores']>[number]) => number) =>
      new client.Gauge({
        name,
        help,
        labelNames: ['origin', 'chunk_size', 'sparse', 'transient'],
        registers,
        collect() {
          this.reset();
          // Summed: two store files may share these labels.
          for (const st of svc.cow.stores()) {
            const labels = { origin: st.origin, chunk_size: st.chunkSize, sparse: String(st.sparse), transient: String(st.transient) };
            this.inc(labels, pick(st));
          }
        },
      });
    perStore(
      'cowbd_store_needed_bytes',
      'Bytes the store file must keep allocated for its snapshots (0 when sparse)',
      (st) => st.neededBytes,
    );
    perStore(
      'cowbd_store_reserved_bytes',
      'Bytes known allocated for its snapshots; below needed only when a restart could not reserve it all',
      (st) => st.reservedBytes,
    );
    perStore('cowbd_store_used_bytes', 'Bytes of the store file holding data or metadata', (st) => st.usedBytes);
    perStore('cowbd_store_file_bytes', 'Length of the store file', (st) => st.fileBytes);
    const dataDirFs = (name: string, help: string, pick: (fs: { bsize: number; blocks: number; bavail: number }) => number) =>
      new client.Gauge({
        name,
        help,
        registers,
        async collect() {
          // A file system that cannot be asked leaves no sample rather than failing the scrape.
          const fs = await statfs(svc.dataDir).catch(() => undefined);
          if (fs) this.set(pick({ bsize: Number(fs.bsize), blocks: Number(fs.blocks), bavail: Number(fs.bavail) }));
          else this.reset();
        },
      });
    dataDirFs('cowbd_datadir_fs_size_bytes', "Size of the data directory's file system", (fs) => fs.blocks * fs.bsize);
    dataDirFs(
      'cowbd_datadir_fs_free_bytes',
      "Free bytes of the data directory's file system, as unprivileged users see it",
      (fs) => fs.bavail * fs.bsize,
    );
    new client.Gauge({
      name: 'cowbd_datadir_reserved_bytes',
      help: 'Bytes allocated for snapshots to grow into and not yet holding data, summed over store files',
      registers,
      collect() {
        let sum = 0;
        for (const st of svc.cow.stores()) sum += Math.max(0, st.reservedBytes - st.usedBytes);
        this.set(sum);
      },
    });
    new client.Gauge({
      name: 'cowbd_volume_size_bytes',
      help: 'Size of each origin volume',
      labelNames: ['volume'],
      registers,
      collect() {
        this.reset();
        for (const v of svc.volumes()) this.set({ volume: v.name }, v.size);
      },
    });
    const total = (name: string, help: string, pick: (st: ReturnType<Service['cow']['stats']>) => number) =>
      new client.Counter({
        name,
        help,
        registers,
        collect() {
          this.reset();
          this.inc(pick(svc.cow.stats()));
        },
      });
    total('cowbd_cow_copies_total', 'Chunks copied from an origin into an exception store', (st) => st.copies);
    total('cowbd_cow_copied_bytes_total', 'Bytes copied from origins into exception stores', (st) => st.bytesCopied);
    total('cowbd_cow_exceptions_committed_total', 'Exceptions made durable', (st) => st.exceptionsCommitted);
    total('cowbd_cow_commits_total', 'Group commits (one fdatasync each)', (st) => st.commits);
    new client.Gauge({
      name: 'cowbd_cow_exception_map_bytes',
      help: 'Memory held by exception maps',
      registers,
      collect() {
        this.set(svc.cow.stats().memoryBytes);
      },
    });
    new client.Gauge({
      name: 'cowbd_cow_write_behind_bytes',
      help: 'Origin writes acknowledged and held in memory until their chunks are copied',
      registers,
      collect() {
        this.set(svc.cow.stats().writeBehindBytes);
      },
    });
  }

  /** NBD server figures, read at scrape time. */
  watchServer(server: { bytesInFlight: number }): void {
    new client.Gauge({
      name: 'cowbd_nbd_bytes_in_flight',
      help: 'Write payloads and read buffers held by NBD requests in flight, summed over connections (capped by --max-bytes-in-flight)',
      registers: [this.registry],
      collect() {
        this.set(server.bytesInFlight);
      },
    });
  }

  /** The observer the NBD server reports to. */
  observer(): RequestObserver {
    return {
      connectionOpened: () => this.connections.inc(),
      connectionClosed: () => this.connections.dec(),
      requestStarted: (exp) => this.exportSeries(exp).inFlight.inc(),
      requestDone: (exp, command, result, bytes, seconds) => {
        const s = this.exportSeries(exp);
        s.inFlight.dec();
        cached(s.requests, `${command} ${result}`, () => this.requests.labels({ export: exp, command, result })).inc();
        cached(s.latency, command, () => this.latency.labels({ export: exp, command })).observe(seconds);
        if (bytes > 0 && (command === 'read' || command === 'write')) {
          cached(s.bytes, command, () => this.bytes.labels({ export: exp, direction: command })).inc(bytes);
        }
      },
    };
  }

  private exportSeries(exp: string): ExportSeries {
    return cached(this.series, exp, () => ({
      inFlight: this.inFlight.labels({ export: exp }),
      requests: new Map(),
      latency: new Map(),
      bytes: new Map(),
    }));
  }

  /** Forgets the labelled series of an export that went away. */
  dropExport(exp: string): void {
    this.series.delete(exp);
    this.inFlight.remove({ export: exp });
    for (const direction of ['read', 'write']) this.bytes.remove({ export: exp, direction });
    for (const command of COMMANDS) {
      this.latency.remove({ export: exp, command });
      for (const result of RESULTS) this.requests.remove({ export: exp, command, result });
    }
  }

  async listen(host: string, port: number): Promise<{ server: Server; port: number }> {
    const server = createServer((req, res) => {
      if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
        this.registry.metrics().then(
          (text) => {
            res.writeHead(200, { 'content-type': this.registry.contentType });
            res.end(text);
          },
          (err: unknown) => {
            res.writeHead(500, { 'content-type': 'text/plain' });
            res.end(String(err));
          },
        );
        return;
      }
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found: try /metrics\n');
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    const a = server.address();
    return { server, port: typeof a === 'object' && a ? a.port : port };
  }
}

/**
 * prom-client names three gauges of its defaults with a counter's `_total` suffix, which
 * promtool flags, and has no option to rename them. They are dropped: the gauges by type
 * it also publishes (cowbd_nodejs_active_handles{type=...} and the like) sum to them.
 */
function dropMisnamedDefaults(registry: client.Registry): void {
  for (const name of ['active_handles', 'active_requests', 'active_resources']) registry.removeSingleMetric(`cowbd_nodejs_${name}_total`);
}
