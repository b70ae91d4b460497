// pino JSON lines on stdout by default; `--log-format pretty` gives short human lines.
import { pino, type Logger, type DestinationStream } from 'pino';

export type LogFormat = 'json' | 'pretty';

const LEVELS: Record<number, string> = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
const SKIP = new Set(['level', 'time', 'msg', 'pid', 'hostname']);

function prettyStream(): DestinationStream {
  return {
    write(line: string) {
      let rec: Record<string, unknown>;
      try {
        rec = JSON.parse(line);
      } catch {
        process.stdout.write(line);
        return;
      }
      const time = new Date(Number(rec.time)).toISOString().slice(11, 23);
      const fields = Object.entries(rec)
        .filter(([k]) => !SKIP.has(k))
        .map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : String(v)}`)
        .join(' ');
      process.stdout.write(`${time} ${LEVELS[Number(rec.level)] ?? rec.level} ${String(rec.msg ?? '')}${fields ? ` ${fields}` : ''}\n`);
    },
  };
}

export function createLogger(level: string, format: LogFormat = 'json'): Logger {
  const opts = { level, base: { pid: process.pid } };
  return format === 'pretty' ? pino(opts, prettyStream()) : pino(opts, pino.destination({ fd: 1, sync: false }));
}
