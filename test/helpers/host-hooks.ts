// Lets a guest script call back into the test while it runs: a tiny HTTP server on
// the host's 127.0.0.1, which the guest reaches as 10.0.2.2 with busybox wget. The
// guest blocks until the host has answered, so "take the snapshot now, with the file
// system still mounted" is one line of guest script:
//
//   wget -q -O /root/reply --post-file=/root/sums http://10.0.2.2:$PORT/snapshot
//
// A handler's return value is the response body; a handler that throws answers 500,
// which makes wget (and so the `sh -e` guest script) fail; an unknown path answers 404.
import { createServer } from 'node:http';

export type HookHandler = (body: string) => Promise<string> | string;

export interface HostCall {
  path: string;
  body: string;
  /** Milliseconds the handler took, and its error if it threw. */
  ms: number;
  error?: string;
}

export interface HostHooks {
  port: number;
  /** Every call so far, in order. */
  calls: HostCall[];
  /** `http://10.0.2.2:PORT/PATH`, the URL the guest uses. */
  url(path: string): string;
  close(): Promise<void>;
}

export async function startHostHooks(handlers: Record<string, HookHandler>): Promise<HostHooks> {
  const calls: HostCall[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const path = (req.url ?? '/').replace(/^\/+/, '').split('?')[0]!;
      const body = Buffer.concat(chunks).toString('utf8');
      const handler = handlers[path];
      const started = Date.now();
      if (!handler) {
        calls.push({ path, body, ms: 0, error: 'no such hook' });
        res.writeHead(404, { 'content-type': 'text/plain' }).end(`no hook ${path}\n`);
        return;
      }
      Promise.resolve()
        .then(() => handler(body))
        .then(
          (reply) => {
            calls.push({ path, body, ms: Date.now() - started });
            res.writeHead(200, { 'content-type': 'text/plain' }).end(reply.endsWith('\n') ? reply : `${reply}\n`);
          },
          (err: unknown) => {
            const error = err instanceof Error ? err.message : String(err);
            calls.push({ path, body, ms: Date.now() - started, error });
            res.writeHead(500, { 'content-type': 'text/plain' }).end(`${error}\n`);
          },
        );
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const a = server.address();
  const port = typeof a === 'object' && a ? a.port : 0;
  return {
    port,
    calls,
    url: (path) => `http://10.0.2.2:${port}/${path.replace(/^\/+/, '')}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
