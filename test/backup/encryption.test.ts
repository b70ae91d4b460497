// Encrypted repositories (docs/backup-repository.md, "Encryption"): nothing the storage holds
// shows a chunk's bytes or its plain hash; a missing or wrong key is refused before anything is
// read or written; damage to a sealed object is found.
import { promises as fs, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { prune } from '../../backup/prune.js';
import { Repository } from '../../backup/repository.js';
import { verifyRepository } from '../../backup/verify.js';
import { backupVolume, CHUNK, restore, sampleVolume, sha } from './helpers.js';

const secret = Buffer.from('correct horse battery staple');
// The lowest scrypt cost a key file may name: the suite stays fast, the format is the same.
const scryptN = 2 ** 10;

/** Every file under `dir`, by path. */
function allFiles(dir: string): string[] {
  return readdirSync(dir, { recursive: true })
    .map((f) => path.join(dir, String(f)))
    .filter((f) => statSync(f).isFile());
}

t.test('an encrypted repository round-trips and stores nothing in the clear', async (t) => {
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir, { secret, scryptN });
  t.ok(repo.encrypted);
  const config = JSON.parse(readFileSync(path.join(dir, 'config'), 'utf8'));
  t.match(config, { version: 2, encryption: 'aes-256-gcm', hash: 'hmac-sha256' });
  t.equal(readdirSync(path.join(dir, 'keys')).length, 1, 'one key file');

  const vol = sampleVolume(40, 3);
  const m = await backupVolume(repo, 'vm1', vol);
  const again = await Repository.open(dir, { secret });
  await again.loadIndex();
  t.ok((await restore(again, m.id)).equals(vol), 'restores exactly');
  t.same(
    (await again.listManifests()).headers.map((h) => h.id),
    [m.id],
  );

  const stored = Buffer.concat(allFiles(dir).map((f) => readFileSync(f)));
  const firstChunk = vol.subarray(0, CHUNK);
  t.equal(stored.indexOf(firstChunk.subarray(0, 64)), -1, 'no chunk bytes in the clear');
  t.equal(stored.indexOf(sha(firstChunk)), -1, "no chunk's SHA-256");
  t.equal(stored.indexOf(Buffer.from(sha(firstChunk).toString('hex'))), -1, 'nor its SHA-256 in hex');
  t.equal(stored.indexOf(Buffer.from('vm1')), -1, 'nor the volume name');
  t.notOk(again.has(sha(firstChunk)), 'chunk ids are keyed, not plain hashes');
  t.ok(again.has(again.chunkId(firstChunk)));

  const v = await verifyRepository(again, { readData: true });
  t.same(v.damaged, [], 'verify --read-data finds nothing wrong');
  const r = await prune(again, { keep: { last: 1 } });
  t.same(r.kept, [m.id]);
});

t.test('a missing, wrong or unexpected key is refused before anything is read or written', async (t) => {
  const root = t.testdir();
  const dir = path.join(root, 'repo');
  const repo = await Repository.init(dir, { secret, scryptN });
  await backupVolume(repo, 'vm1', sampleVolume(4, 5));
  const before = allFiles(dir).sort();
  await t.rejects(Repository.open(dir), { code: 'COWBD_BACKUP_KEY_REQUIRED', message: /encrypted.*--encryption/ });
  const wrong = await Repository.open(dir, { secret: Buffer.from('Tr0ub4dor&3') }).catch((e) => e);
  t.match(wrong, { code: 'COWBD_BACKUP_WRONG_KEY', message: /wrong key or passphrase/ });
  t.notMatch(wrong.message, /Tr0ub4dor/, 'the secret is not in the message');
  t.same(allFiles(dir).sort(), before, 'no file was added, removed or left behind (no lock either)');

  const plain = await Repository.init(path.join(root, 'plain'));
  await t.rejects(Repository.open(plain.dir, { secret }), { code: 'COWBD_BACKUP_NOT_ENCRYPTED' });
  t.equal(plain.version, 1, 'a plain repository is still written as version 1');
});

t.test('a flipped bit in a sealed chunk, trailer or manifest is found', async (t) => {
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir, { secret, scryptN });
  const vol = sampleVolume(6, 9);
  const m = await backupVolume(repo, 'vm1', vol);
  await repo.loadIndex();
  const [pack] = [...repo.packs.keys()];
  const file = repo.packPath(pack!);
  const bytes = readFileSync(file);
  bytes[10]! ^= 1;
  await fs.writeFile(file, bytes);
  const fresh = await Repository.open(dir, { secret });
  await fresh.loadIndex();
  const v = await verifyRepository(fresh, { readData: true });
  t.ok(
    v.damaged.some((d) => d.what === 'chunk' && /authenticate/.test(d.reason)),
    'verify names the chunk that no longer authenticates',
  );
  await t.rejects(restore(fresh, m.id), { code: 'COWBD_BACKUP_DAMAGED_CHUNK' });

  const mf = path.join(dir, 'backups', m.id);
  const mb = readFileSync(mf);
  mb[mb.length - 1]! ^= 1;
  await fs.writeFile(mf, mb);
  t.match((await fresh.listManifests()).damaged, [{ file: m.id }], 'the manifest is listed as damaged');
  await t.rejects(fresh.loadManifest(m.id), { code: 'COWBD_BACKUP_DAMAGED_MANIFEST' });
});
