// Backup repositories in a real S3 bucket (a one-node Ceph RADOS Gateway the test starts):
// the whole backup cycle, an encrypted repository, a gateway killed mid-backup, prune beside a
// running backup, a second daemon restoring and serving what the first backed up.
import { execFile, spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { GetObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import t from 'tap';
import { prune } from '../../backup/prune.js';
import { Repository } from '../../backup/repository.js';
import { type CephS3, cephAvailable, s3Client, s3Env, startCeph } from '../helpers/ceph.js';
import { CLI, startDaemon } from '../helpers/daemon.js';
import { backup, CHUNK, exportHash, fileHash, run, scattered, tempDir, writeChunks } from './backup-helpers.js';
import { sampleVolume } from './helpers.js';

const execFileP = promisify(execFile);
t.setTimeout(600_000);

const skip = cephAvailable();
let s3: CephS3;

/** Every key under `prefix` in `bucket`. */
async function keys(bucket: string, prefix = ''): Promise<string[]> {
  const c = s3Client(s3);
  const out: string[] = [];
  let token: string | undefined;
  do {
    const r = await c.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }));
    for (const o of r.Contents ?? []) out.push(o.Key!);
    token = r.NextContinuationToken;
  } while (token);
  c.destroy();
  return out.sort();
}

/** Copies every object under s3://bucket/prefix into `dir`, keeping the key's path. */
async function download(bucket: string, prefix: string, dir: string): Promise<void> {
  const c = s3Client(s3);
  for (const key of await keys(bucket, prefix)) {
    const r = await c.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
    const file = join(dir, key.slice(prefix.length));
    await mkdir(dirname(file), { recursive: true });
    await writeFile(file, await r.Body!.transformToByteArray());
  }
  c.destroy();
}

t.before(async () => {
  if (skip) return;
  s3 = await startCeph();
  // The CLI and the daemons this test starts inherit the endpoint and credentials, as they would from a shell.
  Object.assign(process.env, s3Env(s3));
});
t.teardown(async () => {
  await s3?.stop();
});

t.test('backup, incremental, list, verify and restore with the repository in a bucket', { skip }, async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '64M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = 's3://cycle/nightly/vols';
  let r = await run(d, 'backup', 'init', '--repo', repo);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /created backup repository [0-9a-f]{64} at s3:\/\/cycle\/nightly\/vols/);
  t.notMatch(r.stdout + r.stderr, new RegExp(s3.secretAccessKey), 'no credential is printed');

  await writeChunks(d, 'vol', scattered(300, 1024, 3));
  const full = await backup(d, 'vol', repo, '--keep-snapshot');
  t.equal(full.code, 0, full.stderr);
  const s1 = full.summaries[0]!;
  t.equal(s1.stats.bytesRead, 300 * CHUNK);
  const changed = scattered(11, 1024, 77);
  await writeChunks(d, 'vol', changed, true);
  const inc = await backup(d, 'vol', repo, '--keep-snapshot');
  t.equal(inc.code, 0, inc.stderr);
  const s2 = inc.summaries[0]!;
  t.equal(s2.mode, 'incremental');
  t.equal(s2.stats.bytesRead, changed.length * CHUNK, 'the incremental read only the changed chunks');
  t.ok(s2.stats.storedBytes < changed.length * CHUNK + 4096, `and uploaded little (${s2.stats.storedBytes} bytes)`);

  const objects = await keys('cycle', 'nightly/vols/');
  t.ok(objects.includes('nightly/vols/config'), 'the layout of a directory repository, under the prefix');
  t.ok(
    objects.some((k) => /^nightly\/vols\/data\/([0-9a-f]{2})\/\1[0-9a-f]{62}$/.test(k)),
    'packs under data/XX/',
  );
  t.equal(objects.filter((k) => k.startsWith('nightly/vols/backups/')).length, 2, 'one manifest per backup');
  t.same(
    objects.filter((k) => k.startsWith('nightly/vols/locks/')),
    [],
    'no lock left behind',
  );

  r = await run(d, 'backup', 'list', '--repo', repo, '--json');
  t.same(
    JSON.parse(r.stdout).map((h: { id: string }) => h.id),
    [s1.id, s2.id],
  );
  r = await run(d, 'backup', 'verify', '--repo', repo, '--read-data');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /checked 2 backup\(s\).*every chunk read and hashed\nno problems found/s);
  for (const s of [s1, s2]) {
    const img = join(await tempDir('cowbd-restore-'), 'img');
    r = await run(d, 'backup', 'restore', s.id, '--repo', repo, '--to-file', img);
    t.equal(r.code, 0, r.stderr);
    t.equal(await fileHash(img), await exportHash(d, s.snapshot), `backup ${s.id.slice(0, 8)} restores from the bucket exactly`);
  }

  // The same format: the bucket's objects copied to a directory are a repository that verifies.
  const copy = join(await tempDir('cowbd-copy-'), 'repo');
  await download('cycle', 'nightly/vols/', copy);
  r = await run(d, 'backup', 'verify', '--repo', copy, '--read-data');
  t.equal(r.code, 0, `a copy in a directory verifies: ${r.stderr}`);

  // A second daemon with a data directory of its own restores the incremental and serves both.
  const d2 = await startDaemon({ logLevel: 'info', args: ['--repo', repo] });
  t.teardown(() => d2.stop());
  r = await run(d2, 'backup', 'restore', s2.id.slice(0, 8), '--repo', repo, '--to-volume', 'back', '--verify');
  t.equal(r.code, 0, r.stderr);
  t.equal(await exportHash(d2, 'back'), await exportHash(d, s2.snapshot), 'the second host restored it exactly');
  const served = `vol@${s2.id.slice(0, 8)}`;
  t.equal(await exportHash(d2, served), await exportHash(d, s2.snapshot), `${served} is served from the bucket`);
  const at = changed[0]! * CHUNK + 8192;
  const expect = (await execFileP('qemu-io', ['-f', 'raw', '-r', '-c', `read -v ${at} 16`, d.uri(s2.snapshot)])).stdout;
  const got = await execFileP('qemu-io', ['-f', 'raw', '-r', '-c', `read -v ${at} 16`, d2.uri(served)]);
  t.equal(got.stdout.split('\n')[0], expect.split('\n')[0], 'qemu-io reads the same bytes from the bucket as from the snapshot');
});

t.test('an encrypted repository in a bucket; a wrong key changes nothing', { skip }, async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '16M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const dir = await tempDir('cowbd-keys-');
  const key = join(dir, 'key');
  const wrong = join(dir, 'wrong');
  await writeFile(key, 'the right passphrase\n', { mode: 0o600 });
  await writeFile(wrong, 'not it\n', { mode: 0o600 });
  const repo = 's3://secret/repo';
  let r = await run(d, 'backup', 'init', '--repo', repo, '--encryption', key);
  t.equal(r.code, 0, r.stderr);
  await writeChunks(d, 'vol', scattered(40, 256, 5));
  const b = await backup(d, 'vol', repo, '--keep-snapshot', '--encryption', key);
  t.equal(b.code, 0, b.stderr);
  const before = await keys('secret');
  t.ok(
    before.some((k) => k.startsWith('repo/keys/')),
    'a key file in the bucket',
  );

  for (const args of [['list'], ['verify'], ['create', 'vol'], ['prune', '--keep-last', '1']]) {
    r = await run(d, 'backup', ...args, '--repo', repo, '--encryption', wrong);
    t.not(r.code, 0, `${args[0]} with a wrong key fails`);
    t.match(r.stderr, /the key does not open repository s3:\/\/secret\/repo: wrong key or passphrase/);
  }
  r = await run(d, 'backup', 'list', '--repo', repo);
  t.match(r.stderr, /is encrypted; give its key/);
  t.same(await keys('secret'), before, 'nothing was written, not even a lock');

  const img = join(dir, 'img');
  r = await run(d, 'backup', 'restore', b.summaries[0]!.id, '--repo', repo, '--encryption', key, '--to-file', img);
  t.equal(r.code, 0, r.stderr);
  t.equal(await fileHash(img), await exportHash(d, b.summaries[0]!.snapshot), 'restores exactly with the right key');
});

t.test('the gateway killed during a backup: a clear error, nothing listed, the rerun completes', { skip }, async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = 's3://killed/r';
  t.equal((await run(d, 'backup', 'init', '--repo', repo)).code, 0);
  await writeChunks(d, 'vol', scattered(3000, 4096, 11));
  const err: Buffer[] = [];
  const child = spawn(process.execPath, [CLI, 'backup', 'create', 'vol', '--repo', repo, '--data-dir', d.dataDir, '--json'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.stderr.on('data', (b: Buffer) => err.push(b));
  const exited = new Promise<number | null>((r) => child.once('exit', r));
  for (let i = 0; i < 600 && !(await keys('killed', 'r/data/')).length; i++) await new Promise((r) => setTimeout(r, 100));
  t.ok((await keys('killed', 'r/data/')).length > 0, 'packs were being uploaded');
  await s3.killGateway();
  const code = await exited;
  const message = Buffer.concat(err).toString().trim();
  t.not(code, 0, 'the backup fails');
  t.match(message, /cowbd: repository s3:\/\/killed\/r: PUT r\/.+ failed: .+after \d+ attempts/, `a clear message: ${message}`);
  await s3.restartGateway();
  t.same(JSON.parse((await run(d, 'backup', 'list', '--repo', repo, '--json')).stdout), [], 'no backup is listed');
  const again = await backup(d, 'vol', repo);
  t.equal(again.code, 0, again.stderr);
  const s = again.summaries[0]!;
  t.ok(s.stats.dedupBytes > 0, `the rerun reused what was uploaded (${s.stats.dedupBytes} bytes)`);
  t.equal(s.stats.newBytes + s.stats.dedupBytes, 3000 * CHUNK, 'and the backup is whole');
  const v = await run(d, 'backup', 'verify', '--repo', repo, '--read-data');
  t.equal(v.code, 0, v.stdout + v.stderr);
});

t.test('prune beside a backup: the lock keeps it out; packs of no backup wait for the grace period', { skip }, async (t) => {
  const repo = await Repository.init('s3://prune/r');
  const writeBackup = async (seed: number) => {
    const vol = sampleVolume(40, seed);
    const w = repo.newWriter();
    const ids: Buffer[] = [];
    for (let i = 0; i < 40; i++) {
      const c = vol.subarray(i * CHUNK, (i + 1) * CHUNK);
      ids.push(repo.chunkId(c));
      await w.add(ids[i]!, c);
    }
    await w.finish();
    return ids;
  };
  // A backup on "another host": its lock is held, so prune waits.
  const lock = await repo.lock(false, 'backup of vol on host-b');
  await t.rejects(prune(repo, { keep: { last: 1 } }), { code: 'COWBD_BACKUP_LOCKED', message: /backup of vol on host-b/ });
  // Its packs, written before its manifest, outlive a prune that does not see its lock (an expired one).
  await writeBackup(21);
  await lock.release();
  const packsBefore = (await keys('prune', 'r/data/')).length;
  t.ok(packsBefore > 0);
  const r = await prune(repo, { keep: { last: 1 } });
  t.ok(r.packsInGrace > 0, `${r.packsInGrace} pack(s) left for the grace period`);
  t.equal((await keys('prune', 'r/data/')).length, packsBefore, 'nothing deleted');
  const r2 = await prune(repo, { keep: { last: 1 }, graceMs: 0 });
  t.equal(r2.packsDeleted, packsBefore, 'after the grace period they go');
  t.same(await keys('prune', 'r/data/'), []);

  // A holder whose lock object vanished (a prune elsewhere judged it stale) commits nothing.
  const mine = await repo.lock(false, 'backup');
  const [lockKey] = await keys('prune', 'r/locks/');
  const c = s3Client(s3);
  const { DeleteObjectCommand } = await import('@aws-sdk/client-s3');
  await c.send(new DeleteObjectCommand({ Bucket: 'prune', Key: lockKey! }));
  c.destroy();
  await t.rejects(mine.check(), { code: 'COWBD_BACKUP_LOCK_LOST' });
  await mine.release();
  await repo.close();
});
