// How fast a snapshot's exception store fills and when it will be full, from two samples of
// its usage: what `cowbd status --watch` shows next to each snapshot.

export interface FillSample {
  /** When the sample was taken, ms since the epoch. */
  atMs: number;
  usedBytes: number;
  capacityBytes: number;
  invalid: boolean;
}

export interface FillEstimate {
  /** Bytes the store gains per minute; null until there are two samples. */
  bytesPerMinute: number | null;
  /** The same as a percent of the store's capacity. */
  percentPerMinute: number | null;
  /** Seconds until full at that rate; null when it is not filling. */
  secondsToFull: number | null;
  /** 'full' or 'invalid' say why there is no time to full; else 'filling' or 'steady'. */
  state: 'filling' | 'steady' | 'full' | 'invalid';
}

/**
 * The estimate from the previous sample (undefined for the first) to the current one. A store
 * that shrank was replaced (removed, created again under its name): no rate until the next sample.
 */
export function fillEstimate(prev: FillSample | undefined, cur: FillSample): FillEstimate {
  const full = cur.capacityBytes > 0 && cur.usedBytes >= cur.capacityBytes;
  const dtMs = prev ? cur.atMs - prev.atMs : 0;
  const grew = prev ? cur.usedBytes - prev.usedBytes : -1;
  const rate = prev && dtMs > 0 && grew >= 0 && !prev.invalid ? (grew * 60_000) / dtMs : null;
  const percent = rate === null || cur.capacityBytes === 0 ? null : (100 * rate) / cur.capacityBytes;
  if (cur.invalid) return { bytesPerMinute: rate, percentPerMinute: percent, secondsToFull: null, state: 'invalid' };
  if (full) return { bytesPerMinute: rate, percentPerMinute: percent, secondsToFull: null, state: 'full' };
  if (!rate) return { bytesPerMinute: rate, percentPerMinute: percent, secondsToFull: null, state: 'steady' };
  return {
    bytesPerMinute: rate,
    percentPerMinute: percent,
    secondsToFull: ((cur.capacityBytes - cur.usedBytes) / rate) * 60,
    state: 'filling',
  };
}

/** A short duration for a table cell: 42s, 3m20s, 2h05m, 3d04h. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const two = (n: number) => String(n).padStart(2, '0');
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${two(s % 60)}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h${two(Math.floor(s / 60) % 60)}m`;
  return `${Math.floor(s / 86_400)}d${two(Math.floor(s / 3600) % 24)}h`;
}

/** The TO FULL cell: a duration, `full`, `invalid`, or `-` when it is not filling. */
export function timeToFullCell(e: FillEstimate): string {
  if (e.state === 'invalid' || e.state === 'full') return e.state;
  return e.secondsToFull === null ? '-' : formatDuration(e.secondsToFull);
}
