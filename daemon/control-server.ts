// The control API: JSON over HTTP on a unix socket in the data directory,
// mode 0600 so only the daemon's user can drive it. The CLI is its client.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { chmod, unlink } from 'node:fs/promises';
import type { Logger } from 'pino';
import { Errors, isCowbdError } from './errors.js';

export type Handler = (params: Record<string, string>, body: Record<string, unknown>) => Promise<unknown>;

interface Route {
  method: string;
  pattern: RegExp;
  keys: string[];
  handler: Handler;
}

const MAX_BODY = 64 * 1024;

export class ControlServer {
  private readonly routes: Route[] = [];
  private server?: Server;

  constructor(private readonly log: Logger) {}

  route(method: string, path: string, handler: Handler): this {
    const keys: string[] = [];
    const pattern = new RegExp(
      `^${path.replace(/:(\w+)/g, (_m, k: string) => {
        keys.push(k);
        return '([^/]+)';
      })}$`,
    );
    this.routes.push({ method, pattern, keys, handler });
    return this;
  }

  async listen(path: string): Promise<void> {
    await unlink(path).catch(() => undefined);
    const server = createServer((req, res) => void this.handle(req, res));
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, () => resolve());
      });
    } finally {
      process.umask(oldMask);
    }
    await chmod(path, 0o600);
    this.server = server;
  }

  close(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (!s) return Promise.resolve();
    s.closeAllConnections?.();
    return new Promise((r) => s.close(() => r()));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://cowbd');
    try {
      const body = await readBody(req);
      for (const r of this.routes) {
        if (r.method !== req.method) continue;
        const m = r.pattern.exec(url.pathname);
        if (!m) continue;
        const params: Record<string, string> = {};
        r.keys.forEach((k, i) => {
          params[k] = decodeParam(m[i + 1]!);
        });
        const result = await r.handler(params, body);
        send(res, req.method === 'POST' ? 201 : 200, result ?? { ok: true });
        return;
      }
      throw Errors.noRoute(req.method ?? '', url.pathname);
    } catch (err) {
      if (isCowbdError(err)) {
        this.log.info({ code: err.code, method: req.method, path: url.pathname }, err.message);
        send(res, err.statusCode, { error: { code: err.code, message: err.message } });
      } else {
        this.log.error({ err, method: req.method, path: url.pathname }, 'control request failed');
        const e = Errors.internal(err instanceof Error ? err.message : String(err));
        send(res, e.statusCode, { error: { code: e.code, message: e.message } });
      }
    }
  }
}

/** A path segment; names are checked again where they are used, this only refuses bad escapes. */
function decodeParam(raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw Errors.badEscape(raw);
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function readBody(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > MAX_BODY) throw Errors.bodyTooLarge();
    chunks.push(c as Buffer);
  }
  if (n === 0) return {};
  let v: unknown;
  try {
    v = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw Errors.bodyNotObject();
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw Errors.bodyNotObject();
  return v as Record<string, unknown>;
}
