// Prometheus metrics (prom-client). NBD request metrics are fed by the protocol
// layer's observer; storage gauges are read from their sources at scrape time.
import { createServer, type Server } from 'node:http';
import client from 'prom-client';
import type { RequestObserver } from '../protocol/connection.js';

export class Metrics {
  readonly registry = new client.Registry();
  private readonly requests: client.Counter<'export' | 'command' | 'result'>;
  private readonly bytes: client.Counter<'export' | 'direction'>;
  private readonly latency: client.Histogram<'export' | 'command'>;
  private readonly inFlight: client.Gauge<'export'>;
  private readonly connections: client.Gauge;

  constructor() {
    client.collectDefaultMetrics({ register: this.registry, prefix: 'cowbd_' });
    const registers = [this.registry];
    this.requests = new client.Counter({
      name: 'cowbd_nbd_requests_total', help: 'NBD requests served, by export, command and result (ok or the NBD error)',
      labelNames: ['export', 'command', 'result'], registers,
    });
    this.bytes = new client.Counter({
      name: 'cowbd_nbd_bytes_total', help: 'Bytes read and written through NBD, by export',
      labelNames: ['export', 'direction'], registers,
    });
    this.latency = new client.Histogram({
      name: 'cowbd_nbd_request_duration_seconds', help: 'NBD request latency from header parsed to reply queued',
      labelNames: ['export', 'command'], registers,
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    });
    this.inFlight = new client.Gauge({
      name: 'cowbd_nbd_requests_in_flight', help: 'NBD requests being served, by export', labelNames: ['export'], registers,
    });
    this.connections = new client.Gauge({ name: 'cowbd_nbd_connections', help: 'Open NBD connections', registers });
  }

  /** The observer the NBD server reports to. */
  observer(): RequestObserver {
    return {
      connectionOpened: () => this.connections.inc(),
      connectionClosed: () => this.connections.dec(),
      requestStarted: (exp) => this.inFlight.inc({ export: exp }),
      requestDone: (exp, command, result, bytes, seconds) => {
        this.inFlight.dec({ export: exp });
        this.requests.inc({ export: exp, command, result });
        this.latency.observe({ export: exp, command }, seconds);
        if (bytes > 0 && (command === 'read' || command === 'write')) {
          this.bytes.inc({ export: exp, direction: command }, bytes);
        }
      },
    };
  }

  /** Forgets the labelled series of an export that went away. */
  dropExport(exp: string): void {
    for (const m of [this.requests, this.bytes, this.latency, this.inFlight] as const) {
      (m as { remove(labels: Record<string, string>): void }).remove({ export: exp });
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
