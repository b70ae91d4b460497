// What each CLI command does: through the running daemon's control API, or on
// the data directory directly where that is safe without one (volume create/list).
import { call } from './control-client.js';
import { Errors, isCowbdError } from './errors.js';
import { checkName } from './names.js';
import type { InvalidInfo, InvalidReason, SnapshotUsage } from '../cow/index.js';
import {
  invalidWhy,
  mergeStatus,
  rateText,
  type MergeStatus,
  type MergeView,
  type PendingMerge,
  type SnapshotView,
  type StatusRow,
  type VolumeView,
} from './service.js';
import { formatSize, parseRate, parseSizeNumber } from './sizes.js';
import { table } from './table.js';
import { fillEstimate, timeToFullCell, type FillEstimate, type FillSample } from './fill-rate.js';
import { createVolume, listVolumes } from './volumes.js';

export interface Common {
  dataDir: string;
  json: boolean;
}

export function print(json: boolean, value: unknown, human: () => string): void {
  console.log(json ? JSON.stringify(value, null, 2) : human());
}

async function daemonOrOffline<T>(online: () => Promise<T>, offline: () => Promise<T>): Promise<T> {
  try {
    return await online();
  } catch (err) {
    if (isCowbdError(err, Errors.noDaemon)) return offline();
    throw err;
  }
}

export async function volumeCreate(o: Common & { name: string; size: string; preallocate: boolean }): Promise<void> {
  checkName(o.name);
  const size = parseSizeNumber(o.size, 512);
  const v = await daemonOrOffline<VolumeView>(
    () => call(o.dataDir, 'POST', '/v1/volumes', { name: o.name, size: String(size), preallocate: o.preallocate }),
    async () => {
      const e = await createVolume(o.dataDir, o.name, size, { preallocate: o.preallocate });
      return { name: e.name, size: e.size, snapshots: [] };
    },
  );
  print(o.json, v, () => `created volume ${v.name} (${formatSize(v.size)}${o.preallocate ? ', preallocated' : ''})`);
}

export async function volumeList(o: Common): Promise<void> {
  const vols = await daemonOrOffline<VolumeView[]>(
    () => call(o.dataDir, 'GET', '/v1/volumes'),
    async () => (await listVolumes(o.dataDir)).map((v) => ({ name: v.name, size: v.size, snapshots: [] })),
  );
  print(o.json, vols, () =>
    table(
      ['NAME', 'SIZE', 'SNAPSHOTS'],
      vols.map((v) => [v.name, formatSize(v.size), v.snapshots.join(',') || '-']),
      [1],
    ),
  );
}

export async function volumeRemove(o: Common & { name: string }): Promise<void> {
  checkName(o.name);
  const r = await call(o.dataDir, 'DELETE', `/v1/volumes/${encodeURIComponent(o.name)}`);
  print(o.json, r, () => `removed volume ${o.name}`);
}

/** The STATE cell's word for each invalidation reason. */
const INVALID_LABEL: Record<InvalidReason, string> = {
  unknown: 'unknown',
  full: 'full',
  'disk-full': 'disk full',
  'io-error': 'I/O error',
  removed: 'removed',
};

/** The STATE cell: `merging 34%` as lvs's merge progress, `merge pending (2 clients)`, `invalid (full)`. */
function stateCell(r: {
  state: string;
  invalid: InvalidInfo | null;
  merge: MergeStatus | null;
  mergePending: PendingMerge | null;
}): string {
  if (r.merge) return `merging ${r.merge.percent}%`;
  if (r.mergePending) return `merge pending (${clientsText(r.mergePending.clients)})`;
  return r.invalid ? `${r.state} (${INVALID_LABEL[r.invalid.reason]})` : r.state;
}

function clientsText(n: number): string {
  return `${n} client${n === 1 ? '' : 's'}`;
}

/** Lines after a table: what each pending merge waits for. */
function mergeNotes(list: { name: string; origin: string | null; mergePending: PendingMerge | null }[]): string {
  const lines = list.flatMap((r) =>
    r.mergePending
      ? [`${r.name}: merge pending: ${clientsText(r.mergePending.clients)} on ${r.origin}; it starts when the last disconnects`]
      : [],
  );
  return lines.length ? `\n\n${lines.join('\n')}` : '';
}

function reservedCell(u: { sparse: boolean | null; reservedBytes: number | null }): string {
  if (u.sparse) return 'sparse';
  return u.reservedBytes === null ? '-' : formatSize(u.reservedBytes);
}

/** Lines after a table: why each invalid snapshot is invalid and what it held then. */
function invalidNotes(list: { name: string; capacityChunks: number; invalid: InvalidInfo | null }[]): string {
  const lines = list.flatMap((u) =>
    u.invalid ? [`${u.name}: invalid${u.invalid.reason === 'unknown' ? ': ' : ' since '}${invalidWhy(u.invalid, u.capacityChunks)}`] : [],
  );
  return lines.length ? `\n\n${lines.join('\n')}` : '';
}

function snapshotRows(list: SnapshotView[]): (string | number)[][] {
  return list.map((u) => [
    u.name,
    u.origin,
    formatSize(u.capacityBytes),
    reservedCell(u),
    formatSize(u.chunkSize),
    u.capacityChunks ? ((100 * u.usedChunks) / u.capacityChunks).toFixed(2) : '0.00',
    stateCell({ ...u, merge: u.merge ? mergeStatus(u.merge) : null }),
    u.policy,
    u.transient ? 'transient' : 'persistent',
    new Date(u.createdAt).toISOString(),
  ]);
}

export async function snapshotCreate(
  o: Common & {
    name: string;
    origin: string;
    size: string;
    chunkSize: string;
    policy: string;
    transient: boolean;
    readOnly: boolean;
    sparse: boolean;
  },
): Promise<void> {
  checkName(o.name);
  checkName(o.origin);
  const u = await call<SnapshotUsage>(o.dataDir, 'POST', '/v1/snapshots', {
    name: o.name,
    origin: o.origin,
    size: String(parseSizeNumber(o.size)),
    chunkSize: String(parseSizeNumber(o.chunkSize)),
    policy: o.policy,
    transient: o.transient,
    readOnly: o.readOnly,
    sparse: o.sparse,
  });
  const disk = u.sparse ? 'sparse: nothing reserved on disk' : `${formatSize(u.reservedBytes)} reserved on disk`;
  print(
    o.json,
    u,
    () => `created snapshot ${u.name} of ${u.origin}: ${formatSize(u.capacityBytes)} store (${disk}), ${formatSize(u.chunkSize)} chunks`,
  );
}

export async function snapshotList(o: Common): Promise<void> {
  const list = await call<SnapshotView[]>(o.dataDir, 'GET', '/v1/snapshots');
  print(
    o.json,
    list,
    () =>
      table(
        ['NAME', 'ORIGIN', 'SIZE', 'RESERVED', 'CHUNK', 'DATA%', 'STATE', 'POLICY', 'KIND', 'CREATED'],
        snapshotRows(list),
        [2, 3, 4, 5],
      ) +
      invalidNotes(list) +
      mergeNotes(list),
  );
}

export async function snapshotExtend(o: Common & { name: string; size: string }): Promise<void> {
  checkName(o.name);
  const rel = o.size.startsWith('+');
  const bytes = parseSizeNumber(rel ? o.size.slice(1) : o.size);
  const u = await call<SnapshotUsage>(o.dataDir, 'POST', `/v1/snapshots/${encodeURIComponent(o.name)}/extend`, {
    size: (rel ? '+' : '') + bytes,
  });
  print(o.json, u, () => `snapshot ${u.name} is now ${formatSize(u.capacityBytes)} (${u.usedChunks}/${u.capacityChunks} chunks used)`);
}

export async function snapshotMerge(o: Common & { name: string; now: boolean; rate?: string }): Promise<void> {
  checkName(o.name);
  const body: Record<string, unknown> = { now: o.now };
  if (o.rate !== undefined) body.rate = String(parseRate(o.rate));
  const m = await call<MergeView>(o.dataDir, 'POST', `/v1/snapshots/${encodeURIComponent(o.name)}/merge`, body);
  print(o.json, m, () => {
    if (m.state === 'pending')
      return `merge of snapshot ${m.snapshot} into ${m.origin} pending: ${clientsText(m.clients)} on ${m.origin}; it starts when the last disconnects`;
    const p = mergeStatus(m.progress!);
    return (
      `merging snapshot ${m.snapshot} into ${m.origin} (${rateText(p.rate)}): ${m.origin} reads as ${m.snapshot} now; ` +
      `${p.mergedChunks}/${p.totalChunks} chunks copied back (${p.percent}%), and ${m.snapshot} goes when all are`
    );
  });
}

export async function snapshotRemove(o: Common & { name: string }): Promise<void> {
  checkName(o.name);
  const r = await call(o.dataDir, 'DELETE', `/v1/snapshots/${encodeURIComponent(o.name)}`);
  print(o.json, r, () => `removed snapshot ${o.name}`);
}

const STATUS_HEADERS = ['NAME', 'KIND', 'SIZE', 'ORIGIN', 'CHUNK', 'STORE', 'RESERVED', 'DATA%', 'STATE'];

/** The status table; with `fill`, each snapshot's fill rate and time to full as two more columns. */
function statusTable(rows: StatusRow[], fill?: Map<string, FillEstimate>): string {
  const cells = rows.map((r) => {
    const row = [
      r.name,
      r.kind,
      formatSize(r.size),
      r.origin ?? '',
      r.chunkSize ? formatSize(r.chunkSize) : '',
      r.storeSize ? formatSize(r.storeSize) : '',
      reservedCell(r),
      r.usedPercent === null ? '' : r.usedPercent.toFixed(2),
      stateCell(r),
    ];
    const e = fill?.get(r.name);
    if (fill) row.push(e ? fillRateCell(e) : '', e ? timeToFullCell(e) : '');
    return row;
  });
  return (
    table(fill ? [...STATUS_HEADERS, 'FILL/MIN', 'TO FULL'] : STATUS_HEADERS, cells, fill ? [2, 4, 5, 6, 7, 9, 10] : [2, 4, 5, 6, 7]) +
    invalidNotes(
      rows.map((r) => ({ name: r.name, capacityChunks: r.chunkSize ? (r.storeSize ?? 0) / r.chunkSize : 0, invalid: r.invalid })),
    ) +
    mergeNotes(rows)
  );
}

function fillRateCell(e: FillEstimate): string {
  if (e.bytesPerMinute === null) return '-';
  const pct = e.percentPerMinute === null ? '' : ` (${e.percentPerMinute.toFixed(1)}%)`;
  return `${formatSize(Math.round(e.bytesPerMinute))}${pct}`;
}

export async function status(o: Common): Promise<void> {
  const rows = await call<StatusRow[]>(o.dataDir, 'GET', '/v1/status');
  print(o.json, rows, () => statusTable(rows));
}

/** Bytes a snapshot row's store holds, from its DATA%. */
function fillSample(r: StatusRow, atMs: number): FillSample {
  const capacityBytes = r.storeSize ?? 0;
  return { atMs, capacityBytes, usedBytes: ((r.usedPercent ?? 0) / 100) * capacityBytes, invalid: r.state === 'invalid' };
}

const CLEAR_SCREEN = '\x1b[H\x1b[2J';
const HIDE_CURSOR = '\x1b[?25l';
const SHOW_CURSOR = '\x1b[?25h';

/** Each snapshot's fill estimate since its last sample; `samples` becomes this sample. */
function sampleFill(rows: StatusRow[], samples: Map<string, FillSample>, atMs: number): Map<string, FillEstimate> {
  const fill = new Map<string, FillEstimate>();
  const seen = new Set<string>();
  for (const r of rows) {
    if (r.kind !== 'snapshot') continue;
    const cur = fillSample(r, atMs);
    fill.set(r.name, fillEstimate(samples.get(r.name), cur));
    samples.set(r.name, cur);
    seen.add(r.name);
  }
  for (const name of samples.keys()) if (!seen.has(name)) samples.delete(name);
  return fill;
}

function watchJson(rows: StatusRow[], fill: Map<string, FillEstimate>, atMs: number, intervalMs: number): string {
  return JSON.stringify({
    time: new Date(atMs).toISOString(),
    intervalSeconds: intervalMs / 1000,
    rows: rows.map((r) => {
      const e = fill.get(r.name);
      return {
        ...r,
        fillBytesPerMinute: e?.bytesPerMinute ?? null,
        fillPercentPerMinute: e?.percentPerMinute ?? null,
        secondsToFull: e?.secondsToFull ?? null,
      };
    }),
  });
}

/**
 * `status --watch`, like `watch lvs`: on a terminal the table is redrawn in place; otherwise one
 * table per interval, blank-line separated (or one JSON line each with --json), for logs and tests.
 * Runs until SIGINT or SIGTERM, which end it with status 0.
 */
export async function statusWatch(o: Common & { intervalSeconds: number }): Promise<void> {
  const out = process.stdout;
  const redraw = Boolean(out.isTTY) && !o.json;
  const intervalMs = Math.max(100, o.intervalSeconds * 1000);
  const every = `Every ${Number((intervalMs / 1000).toFixed(1))}s: cowbd status`;
  const stop = () => {
    if (redraw) out.write(SHOW_CURSOR);
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
  const samples = new Map<string, FillSample>();
  for (let frame = 0; ; frame++) {
    const atMs = Date.now();
    let body: string;
    try {
      const rows = await call<StatusRow[]>(o.dataDir, 'GET', '/v1/status');
      const fill = sampleFill(rows, samples, atMs);
      body = o.json ? watchJson(rows, fill, atMs, intervalMs) : statusTable(rows, fill);
    } catch (err) {
      // The first failure ends the command; later ones (a daemon restarting) are shown until it answers again.
      if (frame === 0) throw err;
      samples.clear();
      const message = `cowbd: ${err instanceof Error ? err.message : String(err)}`;
      body = o.json ? JSON.stringify({ time: new Date(atMs).toISOString(), intervalSeconds: intervalMs / 1000, error: message }) : message;
    }
    const time = new Date(atMs).toLocaleTimeString('en-GB', { hour12: false });
    if (o.json) out.write(`${body}\n`);
    else if (redraw) {
      const header = `${every}${' '.repeat(Math.max(2, (out.columns ?? 80) - every.length - time.length))}${time}`;
      out.write(`${frame === 0 ? HIDE_CURSOR : ''}${CLEAR_SCREEN}${header}\n\n${body}\n`);
    } else out.write(`${frame === 0 ? '' : '\n'}${every}  ${time}\n${body}\n`);
    await sleep(intervalMs - (Date.now() - atMs));
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.max(0, ms)));
}

export function requirePositive(n: number, what: string): number {
  if (!Number.isFinite(n) || n < 0) throw Errors.negativeOption(what);
  return n;
}
