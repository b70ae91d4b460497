// --freeze: the file system is frozen while the snapshot is taken and always thawed:
// at once after, when the backup command is killed, and when the time bound passes.
import t, { type Test } from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { freeze } from '../../backup/freeze.js';
import { startDaemon } from '../helpers/daemon.js';
import { backup, run, tempDir, writeChunks } from './backup-helpers.js';

t.setTimeout(120_000);

async function loopMount(t: Test): Promise<string | undefined> {
  const dir = await tempDir('cowbd-freeze-');
  const img = join(dir, 'fs.img');
  const mnt = join(dir, 'mnt');
  try {
    execFileSync('truncate', ['-s', '64M', img]);
    execFileSync('mkfs.ext4', ['-q', img]);
    execFileSync('mkdir', [mnt]);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
  } catch {
    return undefined;
  }
  t.teardown(() => {
    try {
      execFileSync('fsfreeze', ['-u', mnt], { stdio: 'ignore' });
    } catch {}
    execFileSync('umount', [mnt]);
  });
  return mnt;
}

/** True when a write to the file system completes within ms (it blocks while frozen). */
async function writable(mnt: string, ms: number): Promise<boolean> {
  return Promise.race([
    writeFile(join(mnt, `probe-${Date.now()}`), 'x').then(() => true),
    new Promise<boolean>((r) => setTimeout(() => r(false), ms)),
  ]);
}

t.test('freeze, thaw and the guarantees around them', async (t) => {
  const mnt = await loopMount(t);
  if (!mnt) {
    t.pass('skipped: no loop mount here (needs root and loop devices)');
    return;
  }
  const f = await freeze(mnt, 5000);
  t.notOk(await writable(mnt, 300), 'writers are held while frozen');
  await f.thaw();
  t.ok(await writable(mnt, 2000), 'thawed');

  const bounded = await freeze(mnt, 300);
  await new Promise((r) => setTimeout(r, 800));
  t.ok(await writable(mnt, 2000), 'the bound thaws it without being asked');
  await t.rejects(bounded.thaw(), /timed out|bound/i, 'and the caller learns the snapshot may not be consistent');

  // The backup command killed while the file system is frozen: the guard thaws it.
  const script = `import('${join(process.cwd(), 'dist', 'backup', 'freeze.js')}').then(async (m) => { await m.freeze(${JSON.stringify(mnt)}, 60000); console.log('frozen'); setInterval(() => {}, 1000); });`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((r) => child.stdout!.once('data', () => r()));
  t.notOk(await writable(mnt, 300), 'frozen by the child');
  child.kill('SIGKILL');
  t.ok(await writable(mnt, 3000), 'thawed once the child died');

  const bad = freeze(join(mnt, 'not-a-mountpoint'), 1000);
  await t.rejects(bad, /freeze/i, 'a path that cannot be frozen is a clear error');
});

t.test('backup create --freeze', async (t) => {
  const mnt = await loopMount(t);
  if (!mnt) {
    t.pass('skipped: no loop mount here (needs root and loop devices)');
    return;
  }
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '16M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', [0, 5, 9]);
  const r = await backup(d, 'vol', repo, '--freeze', mnt);
  t.equal(r.code, 0, r.stderr);
  t.ok(await writable(mnt, 2000), 'thawed after the backup');
  const bad = await backup(d, 'vol', repo, '--freeze', join(mnt, 'nope'));
  t.not(bad.code, 0);
  t.match(bad.stderr, /freeze/i);
  t.same(JSON.parse((await run(d, 'snapshot', 'list', '--json')).stdout), [], 'no snapshot taken when the freeze fails');
});
