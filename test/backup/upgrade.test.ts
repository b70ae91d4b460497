// A data directory written before change tracking existed (test/fixtures/datadir-v0):
// the new daemon serves it as it was, says its volume's history is unknown, backs it up
// whole the first time and incrementally after, and backs up its old snapshot exactly.
import t from 'tap';
import { cp } from 'node:fs/promises';
import { join } from 'node:path';
import { ROOT, startDaemon } from '../helpers/daemon.js';
import { CHUNK, backup, connect, fileHash, run, tempDir } from './backup-helpers.js';
import { createHash } from 'node:crypto';

t.setTimeout(120_000);
const SIZE = 2 << 20;

function image(fills: Array<[number, number, number]>): Buffer {
  const b = Buffer.alloc(SIZE);
  for (const [at, len, v] of fills) b.fill(v, at, at + len);
  return b;
}
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

t.test('an old data directory: served as it was, backed up whole once, then incrementally', async (t) => {
  const dataDir = await tempDir('cowbd-upgrade-');
  await cp(join(ROOT, 'test', 'fixtures', 'datadir-v0'), dataDir, { recursive: true, filter: (src) => !src.endsWith('README.md') });
  const d = await startDaemon({ dataDir, logLevel: 'info' });
  t.teardown(() => d.stop());
  const origin = image([
    [0, 128 << 10, 0x33],
    [128 << 10, 128 << 10, 0x11],
    [1 << 20, 64 << 10, 0x22],
    [1536 << 10, 64 << 10, 0x44],
  ]);
  const snap = image([
    [0, 256 << 10, 0x11],
    [1 << 20, 64 << 10, 0x22],
  ]);
  for (const [name, want] of [
    ['old', origin],
    ['oldsnap', snap],
  ] as const) {
    const c = await connect(d, name);
    t.ok((await c.read(0, SIZE)).equals(want), `${name} reads as the old daemon left it`);
    await c.disconnect();
  }
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  const first = await backup(d, 'old', repo);
  t.equal(first.code, 0, first.stderr);
  t.equal(first.summaries[0]!.mode, 'full', 'data from before tracking: everything is read');
  const fromOld = await backup(d, 'old', repo, '--from-snapshot', 'oldsnap');
  t.equal(fromOld.code, 0, fromOld.stderr);
  const wrong = await backup(d, 'other', repo, '--from-snapshot', 'oldsnap');
  t.not(wrong.code, 0);
  t.match(wrong.stderr, /snapshot oldsnap is of volume old, not of other/);
  const dir = await tempDir('cowbd-restore-');
  for (const [s, want] of [
    [first.summaries[0]!, origin],
    [fromOld.summaries[0]!, snap],
  ] as const) {
    const img = join(dir, s.id);
    t.equal((await run(d, 'backup', 'restore', s.id, '--repo', repo, '--to-file', img)).code, 0);
    t.equal(await fileHash(img), sha(want), `backup of ${s.snapshot} restores exactly`);
  }
  const c = await connect(d, 'old');
  await c.write(5 * CHUNK, Buffer.alloc(CHUNK, 0x55));
  await c.disconnect();
  const next = await backup(d, 'old', repo);
  t.equal(next.code, 0, next.stderr);
  t.equal(next.summaries[0]!.mode, 'incremental', 'tracked from the first backup on');
  t.equal(next.summaries[0]!.stats.bytesRead, CHUNK, 'only the chunk written since');
});
