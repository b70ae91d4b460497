// backup/verify.ts: a sound repository verifies clean; a damaged pack byte, a truncated pack,
// a missing pack and a damaged manifest are each named, with the backups they hurt.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Repository } from '../../backup/repository.js';
import { verifyRepository } from '../../backup/verify.js';
import { backupVolume, restore, sampleVolume } from './helpers.js';

async function setup(t: Test) {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const a = await backupVolume(repo, 'vm1', sampleVolume(12, 1));
  const b = await backupVolume(repo, 'vm2', sampleVolume(12, 2));
  await repo.loadIndex();
  return { repo, a, b };
}

t.test('a sound repository verifies clean, with and without reading data', async (t) => {
  const { repo } = await setup(t);
  const progress: number[][] = [];
  const quick = await verifyRepository(repo, { readData: false });
  t.same(quick, { backups: 2, chunks: 16, damaged: [] });
  const full = await verifyRepository(repo, { readData: true, onProgress: (d, n) => progress.push([d, n]) });
  t.same(full.damaged, []);
  t.same(progress.at(-1), [4, 4], 'two backups and their two packs');
  const one = await verifyRepository(repo, { id: (await repo.listManifests()).headers[0]!.id.slice(0, 6), readData: true });
  t.equal(one.backups, 1);
  t.equal(one.chunks, 8);
});

t.test('a flipped byte in a pack: verify names the chunk and the backup, readBlob fails', async (t) => {
  const { repo, a, b } = await setup(t);
  const pack = repo.locate(a.chunks.get(4)!)!.pack;
  const info = repo.packs.get(pack)!;
  const victim = info.blobs.find((x) => a.chunks.get(4)?.equals(x.id))!;
  const file = repo.packPath(pack);
  const bytes = await fs.readFile(file);
  bytes[victim.offset + 3]! ^= 0xff;
  await fs.writeFile(file, bytes);
  t.same((await verifyRepository(repo, { readData: false })).damaged, [], 'sizes alone do not see it');
  const r = await verifyRepository(repo, { readData: true });
  const hex = victim.id.toString('hex');
  t.match(r.damaged, [
    { what: 'pack', id: pack, reason: /SHA-256/ },
    { what: 'chunk', id: hex, reason: new RegExp(`used by backups ${a.id}`) },
    { what: 'backup', id: a.id, reason: /1 of its chunks/ },
  ]);
  t.notOk(
    r.damaged.some((d) => d.id === b.id),
    'the other backup is sound',
  );
  await t.rejects(repo.readBlob(victim.id), { code: 'COWBD_BACKUP_DAMAGED_CHUNK', message: new RegExp(`${hex}.*${pack}`) });
  await t.rejects(restore(repo, a.id), { code: 'COWBD_BACKUP_DAMAGED_CHUNK' });
  t.ok((await restore(repo, b.id)).equals(sampleVolume(12, 2)));
});

t.test('a truncated pack, then a missing one', async (t) => {
  const { repo, a, b } = await setup(t);
  const pack = repo.locate(a.chunks.get(0)!)!.pack;
  const file = repo.packPath(pack);
  const size = (await fs.stat(file)).size;
  await fs.truncate(file, Math.floor(size / 2));
  const r = await verifyRepository(repo, { readData: false });
  t.ok(r.damaged.some((d) => d.what === 'backup' && d.id === a.id));
  t.notOk(
    r.damaged.some((d) => d.id === b.id),
    'the other backup has its own pack',
  );
  t.ok(r.damaged.some((d) => d.what === 'chunk' && /is \d+ bytes, the index says/.test(d.reason)));
  const last = [...a.chunks.entries()].at(-1)![1];
  await t.rejects(repo.readBlob(last), { code: 'COWBD_BACKUP_DAMAGED_CHUNK' });

  await fs.rm(file);
  const gone = await verifyRepository(repo, { readData: true });
  t.ok(gone.damaged.some((d) => d.what === 'chunk' && /is missing/.test(d.reason)));
  await t.rejects(repo.readBlob(last), { code: 'COWBD_BACKUP_MISSING_CHUNK', message: new RegExp(pack) });
});

t.test('a damaged manifest: listed as damaged, verify names it, load fails', async (t) => {
  const { repo, a, b } = await setup(t);
  const file = path.join(repo.dir, 'backups', a.id);
  const bytes = await fs.readFile(file);
  bytes[bytes.length - 40]! ^= 0x01;
  await fs.writeFile(file, bytes);
  await t.rejects(repo.loadManifest(a.id), { code: 'COWBD_BACKUP_DAMAGED_MANIFEST', message: /checksum/ });
  const r = await verifyRepository(repo, { readData: false });
  t.same(
    r.damaged.map((d) => [d.what, d.id]),
    [['backup', a.id]],
  );
  t.equal(r.backups, 1);

  const bb = path.join(repo.dir, 'backups', b.id);
  await fs.writeFile(bb, Buffer.from('CBMF\xff\xff\x00\x00{', 'latin1'));
  const list = await repo.listManifests();
  t.same(
    list.damaged.map((d) => d.file),
    [b.id],
    'an unreadable header is listed as damaged',
  );
  t.equal(list.headers.length, 1);
});
