// backup/repository.ts: creating and opening repositories, writing and reading blobs, dedup,
// a killed backup's packs reused, manifests, and file modes.
import { randomBytes } from 'node:crypto';
import { promises as fs, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { isBackupError, BackupErrors } from '../../backup/errors.js';
import { PACK_TARGET_BYTES } from '../../backup/pack-format.js';
import { Repository } from '../../backup/repository.js';
import { backupVolume, CHUNK, restore, sampleVolume, sha } from './helpers.js';

t.test('init makes a repository that open reads; init refuses a non-empty directory', async (t) => {
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir);
  t.match(repo.id, /^[0-9a-f]{64}$/);
  t.equal(repo.version, 1);
  t.equal(repo.chunkSize, 65536);
  const config = JSON.parse(await fs.readFile(path.join(dir, 'config'), 'utf8'));
  t.same(config, { format: 'cowbd-backup-repository', version: 1, id: repo.id, chunkSize: 65536, hash: 'sha256', compression: 'zstd' });
  const again = await Repository.open(dir);
  t.equal(again.id, repo.id);
  await t.rejects(Repository.init(dir), { code: BackupErrors.notEmpty.code });
  const empty = path.join(t.testdir(), 'empty');
  await fs.mkdir(empty);
  t.equal((await Repository.init(empty)).version, 1, 'an existing empty directory is fine');
});

t.test('open refuses a missing, foreign, newer or damaged repository', async (t) => {
  const root = t.testdir({ foreign: { 'notes.txt': 'mine' }, other: { config: '{"format":"something-else","version":1}' }, empty: {} });
  await t.rejects(Repository.open(path.join(root, 'nothing')), { code: 'COWBD_BACKUP_NO_REPOSITORY', kind: 'ENOENT' });
  await t.rejects(Repository.open(path.join(root, 'empty')), { code: 'COWBD_BACKUP_NO_REPOSITORY' });
  await t.rejects(Repository.open(path.join(root, 'foreign')), { code: 'COWBD_BACKUP_FOREIGN' });
  await t.rejects(Repository.open(path.join(root, 'other')), { code: 'COWBD_BACKUP_FOREIGN' });
  await t.rejects(Repository.init(path.join(root, 'foreign')), { code: 'COWBD_BACKUP_NOT_EMPTY' });

  const dir = path.join(root, 'repo');
  await Repository.init(dir);
  const file = path.join(dir, 'config');
  const config = JSON.parse(await fs.readFile(file, 'utf8'));
  await fs.writeFile(file, JSON.stringify({ ...config, version: 7 }));
  const e = await Repository.open(dir).catch((x: unknown) => x);
  t.ok(isBackupError(e, BackupErrors.newerVersion));
  t.match((e as Error).message, /version 7.*version 2/, 'names both versions');
  await fs.writeFile(file, '{"format":"cowbd-backup-repo');
  await t.rejects(Repository.open(dir), { code: 'COWBD_BACKUP_DAMAGED_CONFIG' });
});

t.test('1000 random chunks and duplicates: written once, read back after reopening', async (t) => {
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir);
  const chunks = Array.from({ length: 1000 }, (_, i) => (i % 5 === 0 ? Buffer.alloc(CHUNK, i % 251) : randomBytes(CHUNK)));
  const w = repo.newWriter();
  let fresh = 0;
  let stored = 0;
  const adds: Promise<{ fresh: boolean; storedBytes: number }>[] = [];
  const tally = (rs: { fresh: boolean; storedBytes: number }[]) => {
    for (const r of rs) {
      if (r.fresh) fresh++;
      stored += r.storedBytes;
    }
  };
  for (const c of [...chunks, ...chunks.slice(0, 100)]) {
    adds.push(w.add(sha(c), c));
    if (adds.length === 8) tally(await Promise.all(adds.splice(0)));
  }
  tally(await Promise.all(adds));
  const distinct = new Set(chunks.map((c) => sha(c).toString('hex'))).size;
  t.equal(fresh, distinct, 'each distinct chunk stored once');
  const r = await w.finish();
  t.ok(r.packs >= Math.floor((800 * CHUNK) / PACK_TARGET_BYTES), `${r.packs} packs`);
  t.ok(r.storedBytes > stored, 'packs hold the blobs and their trailers');
  t.ok(stored < 801 * CHUNK, 'compressible chunks are stored compressed, random ones raw');

  const again = await Repository.open(dir);
  await again.loadIndex();
  t.equal(again.packs.size, r.packs);
  t.equal(chunks.filter((c) => again.has(sha(c))).length, chunks.length, 'every chunk is in the index');
  let same = 0;
  for (const c of chunks) if ((await again.readBlob(sha(c))).equals(c)) same++;
  t.equal(same, chunks.length, 'every chunk reads back bit-identical');
  t.notOk(again.has(sha(Buffer.from('never written'))));
  await t.rejects(again.readBlob(sha(Buffer.from('never written'))), { code: 'COWBD_BACKUP_MISSING_CHUNK' });
});

t.test('a second writer, and a second process, skip what the first stored', async (t) => {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const vol = sampleVolume(30);
  const a = await backupVolume(repo, 'vm1', vol);
  t.equal(a.stats.dedupBytes, 0);
  const b = await backupVolume(repo, 'vm2', vol);
  t.equal(b.stats.newBytes, 0, 'all known to this process');
  t.equal(b.stats.dedupBytes, a.stats.newBytes);
  const other = await Repository.open(repo.dir);
  await other.loadIndex();
  const c = await backupVolume(other, 'vm3', vol);
  t.equal(c.stats.newBytes, 0, 'all known from the index');
  t.equal(c.stats.zeroChunks, 10);
  t.ok((await restore(other, b.id)).equals(vol));
  t.ok((await restore(other, c.id)).equals(vol));
});

t.test('a backup killed before its index and manifest: not listed, its packs are reused', async (t) => {
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir);
  const w = repo.newWriter();
  const chunks = Array.from({ length: 300 }, () => randomBytes(CHUNK));
  for (const c of chunks) await w.add(sha(c), c);
  // Packs closed so far are saved in the background; the open one is lost, as a kill would lose it. No finish(), no manifest.
  const packs = () => readdirSync(path.join(dir, 'data'), { recursive: true }).filter((n) => /[0-9a-f]{64}$/.test(String(n)));
  for (let i = 0; i < 100 && packs().length === 0; i++) await new Promise((r) => setTimeout(r, 50));
  t.ok(packs().length >= 1, 'a pack was closed while writing');
  t.same(readdirSync(path.join(dir, 'index')), [], 'no index yet');
  await w.abort();
  t.same(
    readdirSync(path.join(dir, 'data')).filter((n) => n.endsWith('.tmp')),
    [],
    'abort removed the open pack',
  );

  const next = await Repository.open(dir);
  t.same((await next.listManifests()).headers, []);
  await next.loadIndex();
  const known = chunks.filter((c) => next.has(sha(c)));
  t.ok(known.length >= PACK_TARGET_BYTES / CHUNK - 1, `${known.length} chunks found from pack trailers`);
  const w2 = next.newWriter();
  let fresh = 0;
  for (const c of chunks) if ((await w2.add(sha(c), c)).fresh) fresh++;
  await w2.finish();
  t.equal(fresh, chunks.length - known.length, 'only the lost chunks are written again');
  for (const c of chunks) if (!(await next.readBlob(sha(c))).equals(c)) t.fail('differs');
});

t.test('manifests: saved, listed, found by prefix, removed', async (t) => {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const vol = sampleVolume(7);
  const m = await backupVolume(repo, 'vm1', vol, { time: '2026-01-02T03:04:05.000Z', group: 'g1' });
  const n = await backupVolume(repo, 'vm1', vol, { time: '2026-01-03T03:04:05.000Z', parent: m.id });
  const { headers, damaged } = await repo.listManifests();
  t.same(damaged, []);
  t.same(
    headers.map((h) => [h.id, h.group, h.parent]),
    [
      [m.id, 'g1', undefined],
      [n.id, undefined, m.id],
    ],
  );
  t.equal(headers[0]!.size, vol.length);
  t.equal(headers[0]!.stats.chunks, 7);
  const back = await repo.loadManifest(m.id.slice(0, 8));
  t.equal(back.chunks.count, 7);
  t.equal(back.chunks.nonZero, m.chunks.nonZero);
  t.same(
    [...back.chunks.entries()].map(([i]) => i),
    [0, 1, 3, 4, 6],
  );
  await t.rejects(repo.loadManifest('ffffffff'), { code: 'COWBD_BACKUP_UNKNOWN' });
  await t.rejects(repo.loadManifest(''), { code: 'COWBD_BACKUP_UNKNOWN' });
  if (m.id[0] === n.id[0]) await t.rejects(repo.loadManifest(m.id[0]!), { code: 'COWBD_BACKUP_AMBIGUOUS_ID' });
  await repo.removeManifest(m.id);
  t.same(
    (await repo.listManifests()).headers.map((h) => h.id),
    [n.id],
  );
  await t.rejects(repo.removeManifest(m.id), { code: 'COWBD_BACKUP_UNKNOWN' });
  await t.rejects(repo.saveManifest({ ...n, size: 1 }), { code: 'COWBD_BACKUP_BAD_MANIFEST' });
});

t.test('directories are 0700 and files 0600 under umask 022', async (t) => {
  const old = process.umask(0o022);
  t.teardown(() => void process.umask(old));
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir);
  await backupVolume(repo, 'vm1', sampleVolume(4));
  const lock = await repo.lock(false, 'test');
  const walk = (d: string): void => {
    t.equal(statSync(d).mode & 0o777, 0o700, `${path.relative(dir, d) || '.'} is 0700`);
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else t.equal(statSync(p).mode & 0o777, 0o600, `${path.relative(dir, p)} is 0600`);
    }
  };
  walk(dir);
  await lock.release();
});
