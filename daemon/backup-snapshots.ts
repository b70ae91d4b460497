// The daemon's side of a backup: read-only snapshots of several volumes taken at one
// instant, each with the change-tracking checkpoint its creation made, which the
// backup command then reads over the private NBD socket.
import { randomBytes } from 'node:crypto';
import type { VolumeSource } from '../backup/volume-backup.js';
import { Errors } from './errors.js';
import { checkName } from './names.js';
import type { Service } from './service.js';
import { toCowbdError } from './service.js';

/** A backup's snapshot holds the origin writes made while it is read: a fifth of the volume by default, at least this. */
const MIN_BACKUP_STORE = 64 * 1024 * 1024;

export function defaultStoreBytes(volumeSize: number): number {
  return Math.max(MIN_BACKUP_STORE, Math.ceil(volumeSize / 5));
}

export function backupSource(svc: Service, name: string): VolumeSource {
  const s = svc.cow.snapshot(name);
  if (!s) throw Errors.unknownSnapshot(name);
  const tracker = svc.cow.tracker(s.origin.name);
  const generation = tracker?.checkpointOf(name);
  return {
    volume: s.origin.name,
    snapshot: name,
    size: s.size,
    // Written through its export, a snapshot no longer reads as the checkpoint's instant.
    ...(tracker && generation !== undefined && s.readOnly ? { checkpoint: { tracker: tracker.id, generation } } : {}),
  };
}

export async function snapshotForBackup(svc: Service, volumes: string[], storeBytes?: number): Promise<VolumeSource[]> {
  if (!volumes.length) throw Errors.missingField('volumes');
  if (new Set(volumes).size !== volumes.length) throw Errors.invalidRequest('a volume is named twice');
  for (const v of volumes) {
    checkName(v);
    if (!svc.cow.origin(v)) throw Errors.unknownVolume(v);
  }
  const tag = randomBytes(4).toString('hex');
  const list = volumes.map((v, i) => ({
    name: volumes.length === 1 ? `backup-${tag}` : `backup-${tag}-${i + 1}`,
    origin: v,
    size: storeBytes ?? defaultStoreBytes(svc.cow.origin(v)!.size),
    readOnly: true,
  }));
  const snaps = await svc.createSnapshots(list);
  return snaps.map((s) => backupSource(svc, s.name));
}

/** The backup has read these ranges: origin writes stop copying them for its snapshot. */
export function releaseForBackup(svc: Service, name: string, ranges: Array<[number, number]>): number {
  try {
    return svc.cow.releaseChunks(name, ranges);
  } catch (err) {
    throw toCowbdError(err, { snapshot: name });
  }
}
