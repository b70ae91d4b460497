// lvcreate-style sizes: a number with an optional K/M/G/T/P/E suffix, 1024-based.
import { Errors } from './errors.js';

const UNITS = 'bkmgtpe';

/** Parses "16m", "1G", "512" (bytes), "4KiB". Returns bytes as a bigint. */
export function parseSize(text: string): bigint {
  const m = /^\s*(\d+)\s*([bkmgtpe]?)(i?b)?\s*$/i.exec(text);
  if (!m) throw Errors.invalidSize(text, 'expected a number with an optional K, M, G or T suffix');
  const exp = m[2] ? UNITS.indexOf(m[2].toLowerCase()) : 0;
  return BigInt(m[1]!) * (1n << (10n * BigInt(exp)));
}

/** parseSize, checked to fit a safe integer and to be positive. */
export function parseSizeNumber(text: string, multipleOf = 1): number {
  const v = parseSize(text);
  if (v <= 0n) throw Errors.invalidSize(text, 'must be greater than zero');
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw Errors.invalidSize(text, 'too large');
  const n = Number(v);
  if (n % multipleOf !== 0) throw Errors.invalidSize(text, `must be a multiple of ${multipleOf} bytes`);
  return n;
}

/** A bound in bytes a second: a size ("64M"), or 0 for none. */
export function parseRate(text: string): number {
  return parseSize(text) === 0n ? 0 : parseSizeNumber(text);
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(2)}${units[i]}`;
}

const DURATION_UNITS_MS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "90", "30s", "15m", "1h", "2d" → milliseconds; `flag` names the option in the error. */
export function parseDuration(text: string, flag: string): number {
  const m = /^(\d+(?:\.\d+)?)([smhd]?)$/.exec(text.trim());
  if (!m) throw Errors.invalidDuration(flag, text);
  return Math.round(Number(m[1]) * DURATION_UNITS_MS[m[2] || 's']!);
}
