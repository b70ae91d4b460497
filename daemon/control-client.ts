// The CLI's side of the control API.
import { request } from 'node:http';
import { join } from 'node:path';
import { Errors } from './errors.js';

export const CONTROL_SOCKET = 'control.sock';

export function controlSocketPath(dataDir: string): string {
  return join(dataDir, CONTROL_SOCKET);
}

export function call<T = unknown>(dataDir: string, method: string, path: string, body?: unknown): Promise<T> {
  const socketPath = controlSocketPath(dataDir);
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request(
      {
        socketPath,
        method,
        path,
        headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {},
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          let parsed: unknown;
          try {
            parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            return reject(Errors.badReply(res.statusCode));
          }
          if ((res.statusCode ?? 500) >= 400) {
            const e = (parsed as { error?: { code?: string; message?: string } }).error;
            return reject(Errors.fromReply(e?.code, e?.message, res.statusCode));
          }
          resolve(parsed as T);
        });
      },
    );
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') reject(Errors.noDaemon(dataDir));
      else reject(err);
    });
    req.end(payload);
  });
}
