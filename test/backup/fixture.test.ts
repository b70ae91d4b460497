// test/fixtures/backup-repo-v1: a repository written by the first version of backup/. Every
// later version must still open it and read both backups back to the same bytes.
import { createHash } from 'node:crypto';
import path from 'node:path';
import t from 'tap';
import { Repository } from '../../backup/repository.js';
import { verifyRepository } from '../../backup/verify.js';
import { restore } from './helpers.js';

const dir = path.join(import.meta.dirname, '..', 'fixtures', 'backup-repo-v1');
const A = 'a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0';
const B = 'b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1';
const volumeSha256: Record<string, string> = {
  [A]: 'ad310da0c530b93089f8a1fb540021a86c11c5c5f3fb46373755c220dc2508b5',
  [B]: '2cd51220276ff65378c93be81406e688c88ab980b519e6e6a1a445ee315eae48',
};

t.test('the version 1 fixture opens, lists and reads back to known hashes', async (t) => {
  const repo = await Repository.open(dir);
  t.equal(repo.version, 1);
  t.equal(repo.id, '10eb8425ed63e799f945954dee10622e58f207381182e32235abf766a9f04d0e');
  await repo.loadIndex();
  const { headers, damaged } = await repo.listManifests();
  t.same(damaged, []);
  t.match(headers, [
    { id: A, volume: 'vm1', size: 1048576, chunkSize: 65536, time: '2026-01-01T00:00:00.000Z', host: 'fixture-host' },
    { id: B, parent: A, group: 'fixture-group', checkpoint: { tracker: 'vm1.cbt', generation: 7 }, stats: { chunks: 16 } },
  ]);
  t.equal((await repo.loadManifest(A)).chunks.nonZero, 10);
  t.equal((await repo.loadManifest('b1')).chunks.nonZero, 10);
  for (const id of [A, B]) {
    t.equal(
      createHash('sha256')
        .update(await restore(repo, id))
        .digest('hex'),
      volumeSha256[id],
      `backup ${id.slice(0, 4)} reads back`,
    );
  }
  t.same(await verifyRepository(repo, { readData: true }), { backups: 2, chunks: 12, damaged: [] });
});
