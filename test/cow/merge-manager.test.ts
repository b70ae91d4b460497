// Merges through the manager on real files: what is refused and why, a merge a stop cut
// short resumes at the next attach, and the merged snapshot's store goes away.
import t from 'tap';
import { mkdtemp, readdir, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CowManager, type MergeEvent } from '../../cow/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function dataDir(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-merge-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'vol.vol'), '');
  await truncate(join(dir, 'vol.vol'), 8 * MiB);
  return dir;
}

const fill = (n: number, v: number) => Buffer.alloc(n, v);
/** A CowError's stable id (and message), as tap's rejects wants it. */
const id = (want: string, message?: RegExp) => ({ id: want, ...(message ? { message } : {}) }) as unknown as Error;
const until = (cow: CowManager, phase: MergeEvent['phase']) =>
  new Promise<MergeEvent>((res) => cow.on('merge', (e) => e.phase === phase && res(e)));

t.test('refusals, and a merge a stop cut short resumes at the next attach', async (t) => {
  const dir = await dataDir(t);
  let cow = await CowManager.open(dir);
  let origin = await cow.attachOrigin('vol');
  await origin.write(fill(4 * MiB, 1), 0, false);
  await cow.createSnapshot({ name: 's', origin: 'vol', size: 8 * MiB });
  await cow.createSnapshot({ name: 'tr', origin: 'vol', size: MiB, transient: true });
  await origin.write(fill(4 * MiB, 2), 0, false);
  await origin.flush();
  await t.rejects(cow.mergeSnapshot('nope'), id('COW_UNKNOWN_SNAPSHOT'));
  await t.rejects(cow.mergeSnapshot('tr'), id('COW_MERGE_TRANSIENT', /would not survive a crash/));
  await cow.removeSnapshot('tr');

  // 64 KiB a second: 4 MiB takes about a minute, so the stop finds it running.
  const p = await cow.mergeSnapshot('s', { rate: 64 * KiB });
  t.equal(p.totalChunks, 64, 'every chunk the origin rewrote is to be copied back');
  const head = Buffer.alloc(4 * MiB);
  await origin.read(head, 0);
  t.ok(head.equals(fill(4 * MiB, 1)), 'the origin reads as the snapshot at once');
  t.equal(cow.snapshot('s')?.usage().state, 'merging');
  await t.rejects(cow.snapshot('s')!.read(Buffer.alloc(4096), 0), id('COW_SNAPSHOT_MERGING'), 'the snapshot itself is no longer served');
  await t.rejects(cow.mergeSnapshot('s'), id('COW_MERGE_BUSY'), 'one merge at a time per origin');
  await t.rejects(cow.removeSnapshot('s'), id('COW_REMOVE_MERGING'));
  await t.rejects(cow.createSnapshot({ name: 'x', origin: 'vol', size: MiB }), id('COW_ORIGIN_MERGING'));
  await origin.write(fill(64 * KiB, 3), MiB, false);
  await origin.flush();
  await cow.close();

  cow = await CowManager.open(dir);
  const resumed = until(cow, 'resumed');
  const done = until(cow, 'done');
  origin = await cow.attachOrigin('vol');
  const r = await resumed;
  t.ok(r.totalChunks < 64, `it resumes with what is left (${r.totalChunks} chunks)`);
  cow.setMergeRate('s', 0);
  const d = await done;
  t.equal(d.mergedChunks, d.totalChunks);
  t.equal(cow.snapshot('s'), undefined, 'the merged snapshot is gone');
  t.same(
    (await readdir(join(dir, 'cow'))).filter((f) => !f.endsWith('.cbt')),
    [],
    'and so is its store',
  );
  const all = Buffer.alloc(8 * MiB);
  await origin.read(all, 0);
  const want = Buffer.concat([fill(MiB, 1), fill(64 * KiB, 3), fill(3 * MiB - 64 * KiB, 1), fill(4 * MiB, 0)]);
  t.ok(all.equals(want), 'the origin holds the snapshot plus the write made during the merge');
  await cow.close();
});

t.test('an invalid snapshot cannot be merged', async (t) => {
  const dir = await dataDir(t);
  const cow = await CowManager.open(dir);
  t.teardown(() => cow.close());
  const origin = await cow.attachOrigin('vol');
  await origin.write(fill(MiB, 1), 0, false);
  await cow.createSnapshot({ name: 'small', origin: 'vol', size: 256 * KiB });
  await origin.write(fill(MiB, 2), 0, false);
  await origin.flush();
  t.equal(cow.snapshot('small')?.state, 'invalid');
  await t.rejects(cow.mergeSnapshot('small'), id('COW_MERGE_INVALID'));
});
