// `cowbd backup` end to end against the real daemon: a full backup reads only what was
// written, an incremental only what changed since, and every restore (to a file, to a
// volume, served over NBD) equals the snapshot it came from, byte for byte.
import t from 'tap';
import { execFile } from 'node:child_process';
import { stat, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { startDaemon, waitForLog } from '../helpers/daemon.js';
import { sample, scrape } from '../helpers/snapshot-checks.js';
import { CHUNK, backup, connect, exportHash, fileHash, run, scattered, tempDir, writeChunks } from './backup-helpers.js';

const execFileP = promisify(execFile);
t.setTimeout(300_000);

const SIZE = 64 << 20;
const COUNT = SIZE / CHUNK;

t.test('full, incremental, restore, verify, prune', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '64M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  let r = await run(d, 'backup', 'init', '--repo', repo);
  t.equal(r.code, 0, r.stderr);
  t.equal((await stat(repo)).mode & 0o777, 0o700, 'the repository is private to its owner');

  // mkfs discards a new device first: that costs the backup nothing.
  const c0 = await connect(d, 'vol');
  await c0.trim(0, SIZE);
  await c0.disconnect();
  const written = scattered(200, COUNT, 7);
  await writeChunks(d, 'vol', written);
  const full = await backup(d, 'vol', repo, '--keep-snapshot');
  t.equal(full.code, 0, full.stderr);
  const s1 = full.summaries[0]!;
  t.equal(s1.mode, 'allocated', 'a new volume is tracked from its creation: only written chunks are read');
  t.equal(s1.stats.bytesRead, written.length * CHUNK, 'read exactly the written chunks');
  t.equal(s1.stats.zeroChunks, COUNT - written.length);

  const img1 = join(await tempDir('cowbd-restore-'), 'img1');
  r = await run(d, 'backup', 'restore', s1.id.slice(0, 8), '--repo', repo, '--to-file', img1);
  t.equal(r.code, 0, r.stderr);
  t.equal(await fileHash(img1), await exportHash(d, s1.snapshot), 'the restored file equals the snapshot');
  t.ok((await stat(img1)).blocks * 512 < SIZE / 2, 'zero chunks are left sparse');

  // 1% of the chunks rewritten, some of them partly: the incremental reads just those.
  const changed = scattered(Math.ceil(COUNT / 100), COUNT, 99);
  await writeChunks(d, 'vol', changed, true);
  const inc = await backup(d, 'vol', repo, '--keep-snapshot');
  t.equal(inc.code, 0, inc.stderr);
  const s2 = inc.summaries[0]!;
  t.equal(s2.mode, 'incremental');
  t.equal(s2.parent, s1.id);
  t.equal(s2.stats.bytesRead, changed.length * CHUNK, 'read exactly the changed chunks');
  const img2 = join(await tempDir('cowbd-restore-'), 'img2');
  r = await run(d, 'backup', 'restore', s2.id, '--repo', repo, '--to-file', img2);
  t.equal(r.code, 0, r.stderr);
  t.equal(await fileHash(img2), await exportHash(d, s2.snapshot), 'the incremental restores to its snapshot exactly');

  r = await run(d, 'backup', 'restore', s2.id, '--repo', repo, '--to-volume', 'back', '--verify');
  t.equal(r.code, 0, r.stderr);
  t.equal(await exportHash(d, 'back'), await exportHash(d, s2.snapshot), 'restored to a new volume');
  r = await run(d, 'backup', 'restore', s2.id, '--repo', repo, '--to-file', img2);
  t.not(r.code, 0, 'an existing file is not overwritten without --force');
  t.match(r.stderr, /exist/i);

  // The change map over NBD, for third-party copiers.
  const map = await execFileP('nbdinfo', [`--map=cowbd:changed-since:${s1.checkpoint!.generation}`, d.uri(s2.snapshot)]);
  // Rows are: offset length type; type 1 marks changed chunks.
  const marked = map.stdout
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number))
    .filter((c) => c[2] === 1)
    .reduce((n, c) => n + c[1]!, 0);
  t.equal(marked, changed.length * CHUNK, 'nbdinfo --map shows the changed chunks');

  const list = await run(d, 'backup', 'list', '--repo', repo, '--json');
  const rows = JSON.parse(list.stdout) as Array<{ id: string; parent?: string }>;
  t.same(
    rows.map((x) => x.id),
    [s1.id, s2.id],
  );
  r = await run(d, 'backup', 'verify', '--repo', repo, '--read-data');
  t.equal(r.code, 0, r.stdout + r.stderr);

  // Watched like any backup: metrics by volume and repository, and a log event with the figures.
  const labels = { volume: 'vol', repository: repo };
  const metrics = await scrape(d);
  t.ok((sample(metrics, 'cowbd_backup_last_success_timestamp_seconds', labels) ?? 0) > Date.now() / 1000 - 600, 'last success time');
  t.equal(sample(metrics, 'cowbd_backups_total', labels), 2);
  t.equal(sample(metrics, 'cowbd_backup_read_bytes_total', labels), s1.stats.bytesRead + s2.stats.bytesRead);
  t.ok(await waitForLog(d, (l) => l.backup === s2.id && l.bytesRead === s2.stats.bytesRead), 'the backup is a log event with its figures');
  const bad = await backup(d, 'nosuch', repo);
  t.not(bad.code, 0);
  t.equal(sample(await scrape(d), 'cowbd_backup_failures_total', { volume: 'nosuch', repository: repo }), 1, 'failures are counted');

  r = await run(d, 'backup', 'prune', '--repo', repo, '--keep-last', '1', '--json');
  t.equal(r.code, 0, r.stderr);
  t.same(JSON.parse(r.stdout).forgotten, [s1.id]);
  r = await run(d, 'backup', 'prune', '--repo', repo, '--keep-last', '1', '--json');
  t.match(JSON.parse(r.stdout), { forgotten: [], packsDeleted: 0, packsRewritten: 0 }, 'a second prune has nothing to do');
  const img3 = join(await tempDir('cowbd-restore-'), 'img3');
  r = await run(d, 'backup', 'restore', s2.id, '--repo', repo, '--to-file', img3);
  t.equal(r.code, 0, r.stderr);
  t.equal(await fileHash(img3), await exportHash(d, s2.snapshot), 'the kept backup still restores after prune');

  // A damaged pack: verify names it, restore refuses.
  const packs: string[] = [];
  for (const sub of await readdir(join(repo, 'data'), { withFileTypes: true }))
    if (sub.isDirectory()) for (const f of await readdir(join(repo, 'data', sub.name))) packs.push(join(repo, 'data', sub.name, f));
  const victim = packs[0]!;
  const bytes = await readFile(victim);
  bytes[100] = (bytes[100] ?? 0) ^ 0xff;
  await writeFile(victim, bytes);
  r = await run(d, 'backup', 'verify', '--repo', repo, '--read-data');
  t.equal(r.code, 3, 'verify fails on damage');
  t.match(r.stdout, /damaged/);
  r = await run(d, 'backup', 'restore', s2.id, '--repo', repo, '--to-file', join(await tempDir('cowbd-restore-'), 'bad'));
  t.not(r.code, 0);
  t.match(r.stderr, /damaged|mismatch|hash/i);
});

t.test('bad input: missing and foreign repositories, unknown volume', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '16M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const dir = await tempDir('cowbd-repo-');
  let r = await backup(d, 'vol', join(dir, 'missing'));
  t.not(r.code, 0);
  t.match(r.stderr, /no (backup )?repository|init/i);
  await writeFile(join(dir, 'notes.txt'), 'mine');
  r = await backup(d, 'vol', dir);
  t.not(r.code, 0);
  t.match(r.stderr, /not a cowbd|foreign/i);
  t.equal(await readFile(join(dir, 'notes.txt'), 'utf8'), 'mine', 'nothing of the foreign directory is touched');
  const repo = join(dir, 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  r = await backup(d, 'nosuch', repo);
  t.not(r.code, 0);
  t.match(r.stderr, /no volume named "nosuch"/);
  const list = await run(d, 'backup', 'list', '--repo', repo, '--json');
  t.same(JSON.parse(list.stdout), [], 'no half backup listed');
  const snaps = await run(d, 'snapshot', 'list', '--json');
  t.same(JSON.parse(snaps.stdout), [], 'no snapshot left behind');
});
