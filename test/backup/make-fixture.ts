// Writes test/fixtures/backup-repo-v1 once (run: node --import @tapjs/typescript/import
// test/backup/make-fixture.ts). The fixture is committed; the test that reads it must keep
// passing with every later version of the code, so it is never regenerated for a format change.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { ChunkTable, type Manifest, Repository } from '../../backup/repository.js';
import { fixtureVolumeA, fixtureVolumeB } from './fixture-volumes.js';
import { CHUNK, sha } from './helpers.js';

const dir = path.join(import.meta.dirname, '..', 'fixtures', 'backup-repo-v1');
await fs.rm(dir, { recursive: true, force: true });
const repo = await Repository.init(dir);
const stats = { bytesRead: 0, newBytes: 0, dedupBytes: 0, storedBytes: 0, zeroChunks: 0, chunks: 16, durationMs: 5 };

async function save(id: string, vol: Buffer, extra: Partial<Manifest>, time: string): Promise<void> {
  const w = repo.newWriter();
  const chunks = new ChunkTable(vol.length / CHUNK);
  for (let i = 0; i < chunks.count; i++) {
    const c = vol.subarray(i * CHUNK, (i + 1) * CHUNK);
    if (c.every((b) => b === 0)) continue;
    chunks.set(i, sha(c));
    await w.add(sha(c), c);
  }
  await w.finish();
  await repo.saveManifest({
    id,
    volume: 'vm1',
    size: vol.length,
    chunkSize: CHUNK,
    time,
    snapshot: `vm1-${id.slice(0, 4)}`,
    host: 'fixture-host',
    stats,
    chunks,
    ...extra,
  });
}

await save('a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0', fixtureVolumeA(), {}, '2026-01-01T00:00:00.000Z');
await save(
  'b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1',
  fixtureVolumeB(),
  { parent: 'a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0', group: 'fixture-group', checkpoint: { tracker: 'vm1.cbt', generation: 7 } },
  '2026-01-02T00:00:00.000Z',
);
await fs.rm(path.join(dir, 'locks'), { recursive: true, force: true });
