// `serve --repo DIR|s3://...`: every backup in the repository as a read-only export named
// VOLUME@ID (the first 8 hex digits of its id), kept in step as backups come and go.
import type { Logger } from 'pino';
import { BackupBackend, ChunkCache } from './backup-backend.js';
import type { Registry } from './registry.js';
import type { RepoAccess } from './repo-access.js';
import { openRepository } from './repo-open.js';

/** 64 MiB of 64 KiB chunks across all served backups. */
const CACHE_CHUNKS = 1024;
const RESCAN_MS = 60_000;

export function exportName(volume: string, id: string): string {
  return `${volume}@${id.slice(0, 8)}`;
}

export async function serveRepository(
  access: RepoAccess,
  registry: Registry,
  log: Logger,
): Promise<{ rescan(): Promise<void>; close(): Promise<void> }> {
  const repo = await openRepository(access, (msg) => log.warn(msg));
  const cache = new ChunkCache(CACHE_CHUNKS);
  const served = new Map<string, string>();
  let scanning: Promise<void> | undefined;
  const scan = async () => {
    await repo.loadIndex();
    const { headers, damaged } = await repo.listManifests();
    for (const d of damaged) log.warn({ file: d.file, reason: d.reason }, 'damaged backup manifest not served');
    const seen = new Set<string>();
    for (const h of headers) {
      const name = exportName(h.volume, h.id);
      seen.add(name);
      if (served.has(name) || registry.info(name)) continue;
      const m = await repo.loadManifest(h.id);
      registry.add(new BackupBackend(name, repo, m, cache));
      served.set(name, h.id);
      log.info({ export: name, backup: h.id, volume: h.volume, time: h.time }, 'serving backup');
    }
    for (const name of [...served.keys()])
      if (!seen.has(name)) {
        served.delete(name);
        await registry.remove(name);
      }
  };
  const rescan = () => {
    scanning ??= scan()
      .catch((err: unknown) => log.error({ err }, 'reading the repository failed'))
      .finally(() => (scanning = undefined));
    return scanning;
  };
  await scan();
  const timer = setInterval(() => void rescan(), RESCAN_MS);
  timer.unref();
  return {
    rescan,
    async close() {
      clearInterval(timer);
      await scanning;
      await repo.close();
    },
  };
}
