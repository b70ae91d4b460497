// backup/blob-writer.ts: a disk full while writing a pack fails the writer with a clear error,
// removes the partial pack and keeps the packs already closed.
import { randomBytes } from 'node:crypto';
import { promises as fs, readdirSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { Repository } from '../../backup/repository.js';
import { PACK_TARGET_BYTES } from '../../backup/pack-format.js';
import { CHUNK, sha } from './helpers.js';

t.test('ENOSPC on the second pack: DISK_FULL, first pack kept, no temp file left', async (t) => {
  // Every file is written whole by FileHandle.writeFile: failing it past one and a half packs'
  // worth of bytes fills the disk in the middle of the second pack.
  const probe = await fs.open(process.execPath, 'r');
  const proto = Object.getPrototypeOf(probe) as { writeFile: (...a: unknown[]) => Promise<unknown> };
  await probe.close();
  const writeFile = proto.writeFile;
  let written = 0;
  proto.writeFile = async function (this: FileHandle, ...a: unknown[]) {
    written += (a[0] as Buffer).length;
    if (written > PACK_TARGET_BYTES * 1.5) throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' });
    return writeFile.apply(this, a);
  };
  t.teardown(() => {
    proto.writeFile = writeFile;
  });
  const dir = path.join(t.testdir(), 'repo');
  const repo = await Repository.init(dir);
  const w = repo.newWriter();
  const chunks = Array.from({ length: 600 }, () => randomBytes(CHUNK));
  let error: unknown;
  for (const c of chunks) {
    try {
      await w.add(sha(c), c);
    } catch (e) {
      error = e;
      break;
    }
  }
  t.match(error, { code: 'COWBD_BACKUP_DISK_FULL', kind: 'ENOSPC', message: /disk full/ });
  await t.rejects(w.add(sha(chunks[599]!), chunks[599]!), { code: 'COWBD_BACKUP_DISK_FULL' }, 'the writer stays failed');
  await t.rejects(w.finish(), { code: 'COWBD_BACKUP_DISK_FULL' });
  await w.abort();
  const data = readdirSync(path.join(dir, 'data'), { recursive: true }).map(String);
  t.same(
    data.filter((n) => n.endsWith('.tmp')),
    [],
    'the partial pack is removed',
  );
  t.equal(data.filter((n) => /\/[0-9a-f]{64}$/.test(n)).length, 1, 'the closed pack is kept');
  const again = await Repository.open(dir);
  await again.loadIndex();
  t.ok(again.has(sha(chunks[0]!)), 'and its blobs are found by the next backup');
  t.ok((await again.readBlob(sha(chunks[0]!))).equals(chunks[0]!));
});
