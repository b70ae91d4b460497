// What each `cowbd backup` command does. create and restore --to-volume need the
// running daemon; the rest work on the repository alone.
import { open, unlink } from 'node:fs/promises';
import { setPriority } from 'node:os';
import { createBackup } from '../backup/create.js';
import { prune, type KeepPolicy } from '../backup/prune.js';
import { progress } from '../backup/progress.js';
import type { ManifestHeader } from '../backup/repository.js';
import { restoreImage, type RestoreTarget } from '../backup/restore.js';
import { verifyRepository } from '../backup/verify.js';
import { NbdClient } from '../protocol/client.js';
import { daemonLink, privateSocketPath } from './backup-link.js';
import { call } from './control-client.js';
import { checkName } from './names.js';
import { formatSize, parseDuration, parseSizeNumber } from './sizes.js';
import { table } from './table.js';
import { type Common, print } from './commands.js';
import { type RepoAccess, repoName } from './repo-access.js';
import { initRepository, openRepository } from './repo-open.js';

type RepoArg = Common & RepoAccess;

function progressMode(o: { json: boolean; progress: boolean }): 'bar' | 'json' | 'none' {
  if (o.json) return 'json';
  return o.progress && process.stderr.isTTY ? 'bar' : 'none';
}

export async function backupInit(o: RepoArg): Promise<void> {
  const repo = await initRepository(o);
  await repo.close();
  print(
    o.json,
    { repository: repoName(o.repo), id: repo.id, version: repo.version, encrypted: repo.encrypted },
    () => `created ${repo.encrypted ? 'encrypted ' : ''}backup repository ${repo.id} at ${o.repo}`,
  );
}

export async function backupCreate(
  o: RepoArg & {
    volumes: string[];
    fromSnapshot?: string;
    keepSnapshot: boolean;
    snapshotSize?: string;
    freeze?: string;
    freezeTimeout: number;
    progress: boolean;
    nice: number;
  },
): Promise<void> {
  for (const v of o.volumes) checkName(v);
  // Hashing and compressing take a core: the volume's own users should get theirs first.
  if (o.nice) setPriority(0, Math.max(-20, Math.min(19, o.nice)));
  const repo = await openRepository(o);
  const made = await createBackup(daemonLink(o.dataDir), {
    repo,
    repoName: repoName(o.repo),
    volumes: o.volumes,
    fromSnapshot: o.fromSnapshot,
    keepSnapshot: o.keepSnapshot,
    storeBytes: o.snapshotSize === undefined ? undefined : parseSizeNumber(o.snapshotSize),
    freeze: o.freeze ? { mountpoint: o.freeze, timeoutMs: o.freezeTimeout * 1000 } : undefined,
    progress: progress(progressMode(o), 'backup'),
  });
  if (o.json) {
    for (const m of made) console.log(JSON.stringify({ type: 'summary', mode: m.mode, ...m.header }));
    return;
  }
  for (const { header: h, mode } of made) {
    const s = h.stats;
    if (mode === 'full')
      console.log(
        `${h.volume}: the change tracking cannot vouch for this volume (written while no daemon tracked it, or tracked since too short a time): every chunk was read`,
      );
    console.log(
      `backup ${h.id} of ${h.volume} (${mode}${h.parent ? `, parent ${h.parent.slice(0, 8)}` : ''}): ` +
        `${formatSize(h.size)} volume, read ${formatSize(s.bytesRead)}, new ${formatSize(s.newBytes)} ` +
        `(stored ${formatSize(s.storedBytes)}), deduplicated ${formatSize(s.dedupBytes)}, in ${(s.durationMs / 1000).toFixed(1)} s`,
    );
  }
}

export async function backupList(o: RepoArg & { volume?: string }): Promise<void> {
  const repo = await openRepository(o);
  const { headers, damaged } = await repo.listManifests();
  const list = headers.filter((h) => !o.volume || h.volume === o.volume).sort((a, b) => a.time.localeCompare(b.time));
  for (const d of damaged) process.stderr.write(`cowbd: damaged manifest ${d.file}: ${d.reason}\n`);
  print(o.json, list, () =>
    table(
      ['ID', 'TIME', 'VOLUME', 'SIZE', 'READ', 'NEW', 'PARENT', 'GROUP'],
      list.map((h: ManifestHeader) => [
        h.id.slice(0, 8),
        h.time.replace(/\.\d+Z$/, 'Z'),
        h.volume,
        formatSize(h.size),
        formatSize(h.stats.bytesRead),
        formatSize(h.stats.newBytes),
        h.parent?.slice(0, 8) ?? '-',
        h.group?.slice(0, 8) ?? '-',
      ]),
      [3, 4, 5],
    ),
  );
}

export async function backupVerify(o: RepoArg & { id?: string; readData: boolean }): Promise<void> {
  const repo = await openRepository(o);
  const r = await verifyRepository(repo, { id: o.id, readData: o.readData });
  print(o.json, r, () =>
    [
      `checked ${r.backups} backup(s), ${r.chunks} chunk(s)${o.readData ? ', every chunk read and hashed' : ''}`,
      ...r.damaged.map((d) => `damaged ${d.what} ${d.id}: ${d.reason}`),
      r.damaged.length ? `${r.damaged.length} problem(s) found` : 'no problems found',
    ].join('\n'),
  );
  if (r.damaged.length) process.exitCode = 3;
}

async function fileTarget(path: string, size: number, force: boolean) {
  const fh = await open(path, force ? 'w+' : 'wx+', 0o600);
  await fh.truncate(size);
  const target: RestoreTarget = {
    write: async (buf, offset) => {
      await fh.write(buf, 0, buf.length, offset);
    },
    read: async (buf, offset) => {
      await fh.read(buf, 0, buf.length, offset);
    },
    flush: () => fh.sync(),
  };
  return { target, close: () => fh.close() };
}

export async function backupRestore(
  o: RepoArg & { id: string; toVolume?: string; toFile?: string; force: boolean; progress: boolean; verify: boolean },
): Promise<void> {
  const repo = await openRepository(o);
  await repo.loadIndex();
  const m = await repo.loadManifest(o.id);
  const bar = progress(progressMode(o), 'restore');
  let stats: Awaited<ReturnType<typeof restoreImage>>;
  if (o.toFile) {
    const { target, close } = await fileTarget(o.toFile, m.size, o.force);
    try {
      stats = await restoreImage(repo, m, target, bar, o.verify);
    } catch (err) {
      await close();
      await unlink(o.toFile).catch(() => undefined);
      throw err;
    }
    await close();
  } else {
    const name = checkName(o.toVolume!);
    await call(o.dataDir, 'POST', '/v1/volumes', { name, size: String(m.size) });
    try {
      const nbd = await NbdClient.connect({ path: privateSocketPath(o.dataDir), exportName: name });
      try {
        stats = await restoreImage(repo, m, nbd, bar, o.verify);
      } finally {
        await nbd.close().catch(() => undefined);
      }
    } catch (err) {
      await call(o.dataDir, 'DELETE', `/v1/volumes/${encodeURIComponent(name)}`).catch(() => undefined);
      throw err;
    }
  }
  const where = o.toFile ? `file ${o.toFile}` : `volume ${o.toVolume}`;
  print(
    o.json,
    { backup: m.id, to: where, ...stats },
    () =>
      `restored backup ${m.id} of ${m.volume} (${formatSize(m.size)}) to ${where}: wrote ${formatSize(stats.bytesWritten)}, ` +
      `${stats.zeroChunks} zero chunk(s) left sparse, ${o.verify ? 'verified, ' : ''}in ${(stats.durationMs / 1000).toFixed(1)} s`,
  );
}

export async function backupPrune(o: RepoArg & { keep: KeepPolicy; volume?: string; dryRun: boolean; grace: string }): Promise<void> {
  const graceMs = parseDuration(o.grace, '--grace');
  const repo = await openRepository(o);
  const r = await prune(repo, { keep: o.keep, volume: o.volume, dryRun: o.dryRun, graceMs });
  print(o.json, r, () =>
    [
      `${o.dryRun ? 'would keep' : 'kept'} ${r.kept.length} backup(s), ${o.dryRun ? 'would forget' : 'forgot'} ${r.forgotten.length}` +
        (r.forgotten.length ? `: ${r.forgotten.map((id) => id.slice(0, 8)).join(' ')}` : ''),
      `${r.packsDeleted} pack(s) deleted, ${r.packsRewritten} rewritten, ${formatSize(r.bytesFreed)} freed` +
        (r.packsInGrace ? `; ${r.packsInGrace} pack(s) of no backup left for the grace period (${o.grace})` : ''),
    ].join('\n'),
  );
}
