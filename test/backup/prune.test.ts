// backup/prune.ts and keep-policy.ts: which backups a policy keeps (per volume, groups together),
// then freeing space: unused packs deleted, mostly unused packs rewritten, kept backups intact.
import { readdirSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { keptByPolicy, weekKey } from '../../backup/keep-policy.js';
import type { ManifestHeader } from '../../backup/manifest.js';
import { prune, selectForgotten } from '../../backup/prune.js';
import { Repository } from '../../backup/repository.js';
import { verifyRepository } from '../../backup/verify.js';
import { backupVolume, restore, sampleVolume } from './helpers.js';

const stats = { bytesRead: 0, newBytes: 0, dedupBytes: 0, storedBytes: 0, zeroChunks: 0, chunks: 0, durationMs: 0 };
const h = (id: string, volume: string, time: string, group?: string): ManifestHeader => ({
  id,
  volume,
  time: `${time}:00.000Z`,
  size: 0,
  chunkSize: 65536,
  snapshot: 's',
  host: 'h',
  stats,
  ...(group ? { group } : {}),
});
const vm1 = [
  h('a1', 'vm1', '2026-03-02T10:00'),
  h('a2', 'vm1', '2026-03-02T18:00', 'g'),
  h('a3', 'vm1', '2026-03-03T10:00'),
  h('a4', 'vm1', '2026-03-05T10:00'),
  h('a5', 'vm1', '2026-03-09T10:00'),
  h('a6', 'vm1', '2026-03-10T10:00'),
  h('a7', 'vm1', '2026-03-10T20:00'),
];
const sorted = (s: Iterable<string>) => [...s].sort();

t.test('keep rules over fixed dates', async (t) => {
  t.equal(weekKey(new Date('2026-03-02T10:00:00Z')), '2026-W10');
  t.equal(weekKey(new Date('2026-03-08T23:00:00Z')), '2026-W10', 'Sunday ends the ISO week');
  t.equal(weekKey(new Date('2027-01-01T00:00:00Z')), '2026-W53');
  t.same(sorted(keptByPolicy(vm1, { last: 2 })), ['a6', 'a7']);
  t.same(sorted(keptByPolicy(vm1, { daily: 3 })), ['a4', 'a5', 'a7'], 'the newest of each of the last three days with a backup');
  t.same(sorted(keptByPolicy(vm1, { weekly: 2 })), ['a4', 'a7']);
  t.same(sorted(keptByPolicy(vm1, { monthly: 5 })), ['a7']);
  t.same(sorted(keptByPolicy(vm1, { last: 1, daily: 2, weekly: 2 })), ['a4', 'a5', 'a7'], 'rules add up');
  t.same(sorted(keptByPolicy(vm1, { last: 0 })), ['a7'], 'a keep option always keeps the newest');
  t.same(sorted(keptByPolicy(vm1, {})), sorted(vm1.map((b) => b.id)), 'no keep option keeps everything');
});

t.test('policies apply per volume; a consistency group is kept or forgotten whole', async (t) => {
  const b1 = h('b1', 'vm2', '2026-03-02T18:00', 'g');
  t.same(sorted(selectForgotten([...vm1, b1], { last: 1 })), ['a1', 'a3', 'a4', 'a5', 'a6'], 'a2 kept with b1, the only vm2 backup');
  t.same(sorted(selectForgotten([...vm1, b1], { last: 1 }, 'vm1')), ['a1', 'a3', 'a4', 'a5', 'a6']);
  const b2 = h('b2', 'vm2', '2026-03-11T18:00');
  t.same(sorted(selectForgotten([...vm1, b1, b2], { last: 1 })), ['a1', 'a2', 'a3', 'a4', 'a5', 'a6', 'b1'], 'group forgotten whole');
  t.same(sorted(selectForgotten([...vm1, b1, b2], { last: 1 }, 'vm2')), [], 'b1 stays with a2, untouched as vm1 is not pruned');
});

t.test('prune deletes unused packs, rewrites mostly unused ones, and kept backups read back', async (t) => {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const v1 = sampleVolume(30, 1);
  const v2 = Buffer.from(v1);
  sampleVolume(30, 7).copy(v2, 0, 0, 65536 * 7); // chunks 0..6 change, 7.. stay
  const other = sampleVolume(30, 9);
  const b0 = await backupVolume(repo, 'vm1', other, { time: '2026-03-01T00:00:00.000Z' });
  const b1 = await backupVolume(repo, 'vm1', v1, { time: '2026-03-02T00:00:00.000Z' });
  const b2 = await backupVolume(repo, 'vm1', v2, { time: '2026-03-03T00:00:00.000Z' });
  const keep = await backupVolume(repo, 'vm2', v1, { time: '2026-03-01T00:00:00.000Z' });
  t.equal(repo.packs.size, 3, 'one pack per backup, vm2 stored nothing new');

  const dry = await prune(repo, { keep: { last: 1 }, dryRun: true });
  t.same(sorted(dry.forgotten), sorted([b0.id, b1.id]));
  t.same(sorted(dry.kept), sorted([b2.id, keep.id]));
  t.same([dry.packsDeleted, dry.packsRewritten], [1, 0], "b0's pack goes; b1's is still used by vm2");
  t.equal((await repo.listManifests()).headers.length, 4, 'a dry run changes nothing');

  await repo.removeManifest(keep.id);
  const oldPacks = [b0, b1].map((b) => repo.locate(b.chunks.get(0)!)!.pack);
  const r = await prune(repo, { keep: { last: 1 } });
  t.same(r.kept, [b2.id]);
  t.equal(r.packsDeleted, 1, "b0's pack");
  t.equal(r.packsRewritten, 1, "b1's pack: its chunks 0..6 are used by no one");
  t.ok(r.bytesFreed > 65536, `${r.bytesFreed} bytes freed`);
  const files = readdirSync(path.join(repo.dir, 'data'), { recursive: true }).map(String);
  for (const p of oldPacks)
    t.notOk(
      files.some((f) => f.endsWith(p)),
      `old pack ${p.slice(0, 8)} deleted`,
    );
  t.equal(readdirSync(path.join(repo.dir, 'index')).length, 1, 'one index names what is left');

  const fresh = await Repository.open(repo.dir);
  await fresh.loadIndex();
  t.ok((await restore(fresh, b2.id)).equals(v2), 'the kept backup reads back bit-identical');
  t.same((await verifyRepository(fresh, { readData: true })).damaged, []);
  t.same(readdirSync(path.join(repo.dir, 'locks')), [], 'the exclusive lock is released');

  const again = await prune(fresh, { keep: { last: 1 } });
  t.same([again.forgotten, again.packsDeleted, again.packsRewritten], [[], 0, 0], 'nothing left to do');
});

t.test('prune refuses while a backup holds the lock', async (t) => {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const l = await repo.lock(false, 'backup vm1');
  await t.rejects(prune(repo, { keep: { last: 1 } }), { code: 'COWBD_BACKUP_LOCKED' });
  await l.release();
  t.same((await prune(repo, { keep: { last: 1 } })).kept, []);
});
