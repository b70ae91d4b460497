// backup/lock.ts: shared and exclusive locks, conflicts naming the holder, stale locks removed.
import { promises as fs, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { Repository } from '../../backup/repository.js';

t.test('shared locks coexist; exclusive conflicts both ways and names the holder', async (t) => {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const a = await repo.lock(false, 'backup vm1');
  const b = await repo.lock(false, 'backup vm2');
  const e = await repo.lock(true, 'prune').catch((x: unknown) => x);
  t.match(e, { code: 'COWBD_BACKUP_LOCKED', kind: 'EBUSY' });
  t.match((e as Error).message, new RegExp(`"backup vm[12]" on ${os.hostname()}, pid ${process.pid}, since \\d{4}-`));
  await a.release();
  await b.release();
  await a.release();
  t.same(readdirSync(path.join(repo.dir, 'locks')), [], 'released locks are gone');
  const x = await repo.lock(true, 'prune');
  await t.rejects(repo.lock(false, 'backup vm1'), { code: 'COWBD_BACKUP_LOCKED', message: /exclusive.*"prune"/ });
  await t.rejects(repo.lock(true, 'prune'), { code: 'COWBD_BACKUP_LOCKED' });
  await x.release();
  await (await repo.lock(true, 'prune again')).release();
});

t.test('a lock of a dead process or not refreshed for 30 minutes is stale and removed', async (t) => {
  const repo = await Repository.init(path.join(t.testdir(), 'repo'));
  const locks = path.join(repo.dir, 'locks');
  const now = new Date().toISOString();
  const old = new Date(Date.now() - 31 * 60 * 1000).toISOString();
  // A pid past the kernel's pid_max cannot be running.
  await fs.writeFile(
    path.join(locks, 'dead'),
    JSON.stringify({ exclusive: true, host: os.hostname(), pid: 2 ** 30, time: now, purpose: 'prune' }),
  );
  await fs.writeFile(path.join(locks, 'old'), JSON.stringify({ exclusive: true, host: 'elsewhere', pid: 1, time: old, purpose: 'prune' }));
  await fs.writeFile(path.join(locks, 'torn'), '{"exclus');
  const l = await repo.lock(true, 'prune');
  t.same(readdirSync(locks).sort(), [...readdirSync(locks).filter((n) => /^[0-9a-f]{32}$/.test(n)), 'torn'].sort(), 'stale ones removed');
  await l.release();

  await fs.writeFile(
    path.join(locks, 'live'),
    JSON.stringify({ exclusive: false, host: 'elsewhere', pid: 1, time: now, purpose: 'backup vm9' }),
  );
  await t.rejects(repo.lock(true, 'prune'), { message: /"backup vm9" on elsewhere, pid 1/ }, 'a fresh lock of another host is respected');
});
