// The backup command's link to the running daemon: snapshots and reports through the
// control API, data through the daemon's private NBD socket (no TLS, no export rules:
// it sits in the data directory beside the control socket, 0600, for its owner only).
import { join } from 'node:path';
import type { BackupReport, DaemonLink } from '../backup/create.js';
import type { VolumeSource } from '../backup/volume-backup.js';
import { NbdClient } from '../protocol/client.js';
import type { SnapshotUsage } from '../cow/index.js';
import { call } from './control-client.js';

export const PRIVATE_NBD_SOCKET = 'nbd.sock';
/** [offset, length] pairs per release call: well under the control API's 64 KiB body. */
const RELEASE_BATCH = 2000;

export function privateSocketPath(dataDir: string): string {
  return join(dataDir, PRIVATE_NBD_SOCKET);
}

export function daemonLink(dataDir: string): DaemonLink {
  return {
    snapshotVolumes: (volumes, storeBytes) =>
      call<VolumeSource[]>(dataDir, 'POST', '/v1/backup-snapshots', {
        volumes,
        ...(storeBytes === undefined ? {} : { size: String(storeBytes) }),
      }),
    snapshotSource: (name) => call<VolumeSource>(dataDir, 'GET', `/v1/backup-snapshots/${encodeURIComponent(name)}`),
    release: async (name, ranges) => {
      // Batched under the control API's body limit.
      for (let i = 0; i < ranges.length; i += RELEASE_BATCH)
        await call(dataDir, 'POST', `/v1/backup-snapshots/${encodeURIComponent(name)}/release`, {
          ranges: ranges.slice(i, i + RELEASE_BATCH),
        });
    },
    removeSnapshot: async (name) => {
      await call(dataDir, 'DELETE', `/v1/snapshots/${encodeURIComponent(name)}`);
    },
    open: (exportName, contexts) => NbdClient.connect({ path: privateSocketPath(dataDir), exportName, metaContexts: contexts }),
    invalidReason: async (name) => {
      const u = await call<SnapshotUsage>(dataDir, 'GET', `/v1/snapshots/${encodeURIComponent(name)}`);
      return u.state === 'invalid' ? 'its exception store filled (or failed) while the backup read it' : undefined;
    },
    report: async (r: BackupReport) => {
      await call(dataDir, 'POST', '/v1/backup-reports', r);
    },
  };
}
