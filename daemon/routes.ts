// The control API's routes: a thin JSON face over the Service.
import type { ControlServer } from './control-server.js';
import { Errors } from './errors.js';
import type { BackupReport } from '../backup/create.js';
import { backupSource, releaseForBackup, snapshotForBackup } from './backup-snapshots.js';
import type { Service } from './service.js';
import { parseRate, parseSizeNumber } from './sizes.js';

function str(body: Record<string, unknown>, key: string, required = true): string | undefined {
  const v = body[key];
  if (v === undefined || v === null) {
    if (required) throw Errors.missingField(key);
    return undefined;
  }
  if (typeof v !== 'string' && typeof v !== 'number') throw Errors.notString(key);
  return String(v);
}

function bool(body: Record<string, unknown>, key: string): boolean {
  const v = body[key];
  if (v === undefined) return false;
  if (typeof v !== 'boolean') throw Errors.notBoolean(key);
  return v;
}

function strings(body: Record<string, unknown>, key: string): string[] {
  const v = body[key];
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw Errors.notStrings(key);
  return v as string[];
}

export function controlRoutes(c: ControlServer, svc: Service, backups?: { record(r: BackupReport): void }): void {
  c.route('GET', '/v1/volumes', async () => svc.volumes());
  c.route('POST', '/v1/volumes', async (_p, b) =>
    svc.createVolume(str(b, 'name')!, parseSizeNumber(str(b, 'size')!, 512), { preallocate: bool(b, 'preallocate') }),
  );
  c.route('DELETE', '/v1/volumes/:name', async (p) => {
    await svc.removeVolume(p.name!);
    return { removed: p.name };
  });
  c.route('GET', '/v1/snapshots', async () => svc.snapshots());
  c.route('GET', '/v1/snapshots/:name', async (p) => svc.snapshot(p.name!));
  c.route('POST', '/v1/snapshots', async (_p, b) => {
    const policy = str(b, 'policy', false) ?? 'invalidate';
    if (policy !== 'invalidate' && policy !== 'overflow') throw Errors.badPolicy(policy);
    const chunk = str(b, 'chunkSize', false);
    return svc.createSnapshot({
      name: str(b, 'name')!,
      origin: str(b, 'origin')!,
      size: parseSizeNumber(str(b, 'size')!),
      chunkSize: chunk === undefined ? undefined : parseSizeNumber(chunk),
      policy,
      transient: bool(b, 'transient'),
      readOnly: bool(b, 'readOnly'),
      sparse: bool(b, 'sparse'),
    });
  });
  c.route('POST', '/v1/snapshots/:name/extend', async (p, b) => {
    const text = str(b, 'size')!;
    const relative = text.startsWith('+');
    return svc.extendSnapshot(p.name!, parseSizeNumber(relative ? text.slice(1) : text), relative);
  });
  c.route('POST', '/v1/snapshots/:name/merge', async (p, b) => {
    const rate = str(b, 'rate', false);
    return svc.mergeSnapshot(p.name!, { now: bool(b, 'now'), rate: rate === undefined ? undefined : parseRate(rate) });
  });
  c.route('DELETE', '/v1/snapshots/:name', async (p) => {
    await svc.removeSnapshot(p.name!);
    return { removed: p.name };
  });
  c.route('GET', '/v1/status', async () => svc.status());
  c.route('POST', '/v1/backup-snapshots', async (_p, b) => {
    const size = str(b, 'size', false);
    return snapshotForBackup(svc, strings(b, 'volumes'), size === undefined ? undefined : parseSizeNumber(size));
  });
  c.route('GET', '/v1/backup-snapshots/:name', async (p) => backupSource(svc, p.name!));
  c.route('POST', '/v1/backup-snapshots/:name/release', async (p, b) => {
    const ranges = b.ranges;
    const ok = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
    if (!Array.isArray(ranges) || !ranges.every((r) => Array.isArray(r) && r.length === 2 && ok(r[0]) && ok(r[1])))
      throw Errors.badRanges();
    return { released: releaseForBackup(svc, p.name!, ranges as Array<[number, number]>) };
  });
  c.route('POST', '/v1/backup-reports', async (_p, b) => {
    str(b, 'volume');
    str(b, 'repository');
    backups?.record(b as unknown as BackupReport);
    return { recorded: true };
  });
}
