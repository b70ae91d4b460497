// pino JSON lines for machines (journald, log shippers) and short human lines on a terminal.
// Our own synchronous printer rather than pino-pretty: pino's transports run in a worker thread,
// which a daemon would have to flush and shut down, and this is all the formatting we need.
import { pino, type Logger, type DestinationStream } from 'pino';

export type LogFormat = 'auto' | 'json' | 'pretty';

/** `auto` is pretty on a terminal and JSON lines anywhere else (a pipe, a file, journald). */
export function resolveLogFormat(format: LogFormat, isTTY: boolean | undefined): 'json' | 'pretty' {
  if (format === 'auto') return isTTY ? 'pretty' : 'json';
  return format;
}

/** Color as https://no-color.org and FORCE_COLOR ask, else only on a terminal that has colors. */
export function useColor(env: NodeJS.ProcessEnv, isTTY: boolean | undefined, hasColors: boolean): boolean {
  if (env.NO_COLOR) return false;
  const force = env.FORCE_COLOR;
  if (force !== undefined) return force !== '0' && force !== 'false';
  return Boolean(isTTY) && hasColors;
}

const LEVELS: Record<number, [name: string, color: string]> = {
  10: ['TRACE', '90'],
  20: ['DEBUG', '36'],
  30: ['INFO', '32'],
  40: ['WARN', '33'],
  50: ['ERROR', '31'],
  60: ['FATAL', '1;31'],
};
const SKIP = new Set(['level', 'time', 'msg', 'pid', 'hostname']);
const INDENT = '    ';

const two = (n: number) => String(n).padStart(2, '0');

function localTime(ms: number): string {
  const d = new Date(ms);
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

/** A serialized error (pino's err serializer): it has a stack or a type and a message. */
function isError(v: unknown): v is { message?: string; stack?: string } {
  return typeof v === 'object' && v !== null && (typeof (v as { stack?: unknown }).stack === 'string' || 'type' in v) && 'message' in v;
}

function fieldValue(v: unknown): string {
  if (typeof v === 'string') return v === '' || /[\s"=]/.test(v) ? JSON.stringify(v) : v;
  return typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v);
}

/**
 * One pino record as `HH:MM:SS.mmm LEVEL message key=value ...`; each error field shows its
 * message as `key=message` and its stack indented on the lines after.
 */
export function formatPretty(rec: Record<string, unknown>, color: boolean): string {
  const [name, code] = LEVELS[Number(rec.level)] ?? [String(rec.level), '0'];
  const level = color ? `\x1b[${code}m${name.padEnd(5)}\x1b[0m` : name.padEnd(5);
  const fields: string[] = [];
  const stacks: string[] = [];
  for (const [k, v] of Object.entries(rec)) {
    if (SKIP.has(k) || v === undefined) continue;
    if (isError(v)) {
      fields.push(`${k}=${fieldValue(v.message ?? '')}`);
      const lines = (v.stack ?? '').split('\n').filter((l) => l.trim() !== '');
      for (const l of lines) stacks.push(INDENT + l.trim());
      continue;
    }
    fields.push(`${k}=${fieldValue(v)}`);
  }
  const key = (s: string) => (color ? s.replace(/^([^=]+)=/, '\x1b[2m$1=\x1b[0m') : s);
  const head = [localTime(Number(rec.time)), level, String(rec.msg ?? ''), ...fields.map(key)].filter((s) => s !== '').join(' ');
  return stacks.length ? `${head}\n${stacks.join('\n')}\n` : `${head}\n`;
}

function prettyStream(out: NodeJS.WritableStream, color: boolean): DestinationStream {
  return {
    write(line: string) {
      let rec: Record<string, unknown>;
      try {
        rec = JSON.parse(line);
      } catch {
        out.write(line);
        return;
      }
      out.write(formatPretty(rec, color));
    },
  };
}

/** Logs to stdout; `out` stands in for it in tests. */
export function createLogger(level: string, format: LogFormat = 'auto', out: NodeJS.WriteStream = process.stdout): Logger {
  const opts = { level, base: { pid: process.pid } };
  if (resolveLogFormat(format, out.isTTY) === 'json') {
    return pino(opts, out === process.stdout ? pino.destination({ fd: 1, sync: false }) : out);
  }
  return pino(opts, prettyStream(out, useColor(process.env, out.isTTY, out.isTTY ? out.hasColors() : false)));
}
