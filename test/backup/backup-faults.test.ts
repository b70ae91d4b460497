// Faults during a backup: each fails clearly, lists nothing half-made, loses nothing
// already backed up, and a rerun succeeds (reusing what the failed run stored).
import t from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import { mkdir, open, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { CLI, startDaemon } from '../helpers/daemon.js';
import { NbdClient } from '../helpers/nbd-client.js';
import { CHUNK, backup, connect, exportHash, fileHash, run, scattered, tempDir, writeChunks } from './backup-helpers.js';

t.setTimeout(300_000);

async function packCount(repo: string): Promise<number> {
  let n = 0;
  for (const sub of await readdir(join(repo, 'data'), { withFileTypes: true }).catch(() => []))
    if (sub.isDirectory()) n += (await readdir(join(repo, 'data', sub.name))).length;
  return n;
}

async function until(cond: () => Promise<boolean>, ms = 30_000): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 20))) if (await cond()) return;
  throw new Error('timed out waiting');
}

t.test('a backup killed part way lists nothing, and the rerun reuses its chunks', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', scattered(2048, 4096, 3));
  const child = spawn(process.execPath, [CLI, 'backup', 'create', 'vol', '--repo', repo, '--data-dir', d.dataDir, '--json'], {
    stdio: 'ignore',
  });
  await until(async () => (await packCount(repo)) >= 2);
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  const list = await run(d, 'backup', 'list', '--repo', repo, '--json');
  t.same(JSON.parse(list.stdout), [], 'the killed backup is not listed');
  // Its snapshot is left behind, as after any kill; the rerun does not depend on it.
  const again = await backup(d, 'vol', repo);
  t.equal(again.code, 0, again.stderr);
  const s = again.summaries[0]!;
  t.ok(s.stats.dedupBytes > 0, `the rerun found chunks the killed run stored (${s.stats.dedupBytes} bytes)`);
  t.equal(s.stats.newBytes + s.stats.dedupBytes, 2048 * CHUNK);
  const v = await run(d, 'backup', 'verify', '--repo', repo, '--read-data');
  t.equal(v.code, 0, v.stdout + v.stderr);
});

t.test('a snapshot store that fills during the backup fails it; the origin is untouched', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', scattered(3000, 4096, 5));
  // A writer that keeps rewriting many chunks of the origin while the backup runs.
  const w = await connect(d, 'vol');
  let stop = false;
  let writes = 0;
  const payload = Buffer.alloc(CHUNK, 0x5a);
  const writer = (async () => {
    for (let i = 0; !stop; i = (i + 1) % 4096, writes++) await w.write(i * CHUNK, payload);
  })();
  await until(async () => writes > 50);
  const r = await backup(d, 'vol', repo, '--snapshot-size', '1M');
  stop = true;
  await writer;
  await w.disconnect();
  t.not(r.code, 0, 'the backup fails');
  t.match(r.stderr, /snapshot.*(invalid|filled)/i, r.stderr);
  const list = await run(d, 'backup', 'list', '--repo', repo, '--json');
  t.same(JSON.parse(list.stdout), [], 'nothing listed');
  const c = await connect(d, 'vol');
  t.same(await c.read(0, CHUNK), payload, 'origin writes all landed');
  await c.disconnect();
  const ok = await backup(d, 'vol', repo, '--snapshot-size', '64M');
  t.equal(ok.code, 0, `a rerun with room succeeds: ${ok.stderr}`);
});

t.test('kill -9 of the daemon during origin writes: the next incremental is exact', async (t) => {
  const dataDir = await tempDir('cowbd-data-');
  let d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '64M' }], logLevel: 'info' });
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', scattered(300, 1024, 11));
  const first = await backup(d, 'vol', repo);
  t.equal(first.code, 0, first.stderr);
  // Writes in flight, many never flushed, when the daemon dies.
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  const pending: Promise<unknown>[] = [];
  for (const i of scattered(200, 1024, 13)) pending.push(c.write(i * CHUNK + 512, Buffer.alloc(4096, i & 0xff)).catch(() => undefined));
  await new Promise((r) => setTimeout(r, 5));
  d.proc.kill('SIGKILL');
  await Promise.allSettled(pending);
  c.destroy();
  await new Promise((r) => d.proc.once('exit', r));
  d = await startDaemon({ dataDir, logLevel: 'info' });
  t.teardown(() => d.stop());
  const inc = await backup(d, 'vol', repo, '--keep-snapshot');
  t.equal(inc.code, 0, inc.stderr);
  const s = inc.summaries[0]!;
  t.equal(s.mode, 'incremental', 'the tracking survived kill -9');
  t.ok(s.stats.bytesRead <= 200 * CHUNK, `read only what may have changed (${s.stats.bytesRead} bytes)`);
  const img = join(await tempDir('cowbd-restore-'), 'img');
  const r = await run(d, 'backup', 'restore', s.id, '--repo', repo, '--to-file', img);
  t.equal(r.code, 0, r.stderr);
  t.equal(await fileHash(img), await exportHash(d, s.snapshot), 'restored equals the snapshot exactly');
});

t.test('a consistency group: several volumes from one instant', async (t) => {
  const d = await startDaemon({
    volumes: [
      { name: 'data', size: '16M' },
      { name: 'log', size: '16M' },
    ],
    logLevel: 'info',
  });
  t.teardown(() => d.stop());
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  // Each step writes n to data, then n to log: at any instant log's n is data's or one less.
  const a = await connect(d, 'data');
  const b = await connect(d, 'log');
  let stop = false;
  const counter = (n: number) => {
    const buf = Buffer.alloc(4096);
    buf.writeUInt32LE(n, 0);
    return buf;
  };
  const loop = (async () => {
    for (let n = 1; !stop; n++) {
      await a.write(0, counter(n));
      await b.write(0, counter(n));
    }
  })();
  await new Promise((r) => setTimeout(r, 200));
  const g = await backup(d, ['data', 'log'], repo);
  stop = true;
  await loop;
  await a.disconnect();
  await b.disconnect();
  t.equal(g.code, 0, g.stderr);
  t.equal(g.summaries.length, 2);
  t.ok(g.summaries[0]!.group && g.summaries[0]!.group === g.summaries[1]!.group, 'one group id');
  const dir = await tempDir('cowbd-restore-');
  const values: Record<string, number> = {};
  for (const s of g.summaries) {
    const img = join(dir, s.volume);
    const r = await run(d, 'backup', 'restore', s.id, '--repo', repo, '--to-file', img);
    t.equal(r.code, 0, r.stderr);
    values[s.volume] = execFileSync('od', ['-An', '-tu4', '-N4', img], { encoding: 'utf8' }).trim() as unknown as number;
  }
  const dv = Number(values.data);
  const lv = Number(values.log);
  t.ok(dv > 0, `data at step ${dv}`);
  t.ok(lv === dv || lv === dv - 1, `log (${lv}) is from the same instant as data (${dv})`);
});

t.test('a full repository disk fails the backup clearly; with room the rerun succeeds', async (t) => {
  const mnt = await tempDir('cowbd-small-');
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m,mode=0700', 'tmpfs', mnt]);
  } catch {
    t.pass('skipped: cannot mount a small tmpfs here (needs root)');
    return;
  }
  t.teardown(() => execFileSync('umount', [mnt]));
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '64M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = join(mnt, 'repo');
  await mkdir(repo, { mode: 0o700 });
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', scattered(400, 1024, 17));
  const r = await backup(d, 'vol', repo);
  t.not(r.code, 0);
  t.match(r.stderr, /disk full|no space|ENOSPC/i, r.stderr);
  t.same(JSON.parse((await run(d, 'backup', 'list', '--repo', repo, '--json')).stdout), []);
  execFileSync('mount', ['-o', 'remount,size=128m', mnt]);
  const ok = await backup(d, 'vol', repo);
  t.equal(ok.code, 0, ok.stderr);
  t.equal((await run(d, 'backup', 'verify', '--repo', repo, '--read-data')).code, 0);
});

t.test('the daemon dies during a backup; prune waits for a running backup', async (t) => {
  const dataDir = await tempDir('cowbd-data-');
  let d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', scattered(2048, 4096, 23));
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const child = spawn(process.execPath, [CLI, 'backup', 'create', 'vol', '--repo', repo, '--data-dir', d.dataDir, '--json']);
  child.stdout.on('data', (b: Buffer) => out.push(b));
  child.stderr.on('data', (b: Buffer) => err.push(b));
  const exited = new Promise<number | null>((r) => child.once('exit', r));
  await until(async () => (await packCount(repo)) >= 1);
  const p = await run(d, 'backup', 'prune', '--repo', repo, '--keep-last', '1');
  t.not(p.code, 0, 'prune refuses while a backup holds the repository');
  t.match(p.stderr, /locked/i, p.stderr);
  d.proc.kill('SIGKILL');
  await new Promise((r) => d.proc.once('exit', r));
  const code = await exited;
  t.not(code, 0, 'the backup fails when the daemon dies');
  t.match(Buffer.concat(err).toString(), /cowbd: .+/, `a clear message: ${Buffer.concat(err).toString().trim()}`);
  t.same(JSON.parse((await run(d, 'backup', 'list', '--repo', repo, '--json')).stdout), [], 'nothing listed');
  d = await startDaemon({ dataDir, logLevel: 'info' });
  t.teardown(() => d.stop());
  const again = await backup(d, 'vol', repo);
  t.equal(again.code, 0, again.stderr);
  t.equal(again.summaries[0]!.stats.newBytes + again.summaries[0]!.stats.dedupBytes, 2048 * CHUNK);
  const pr = await run(d, 'backup', 'prune', '--repo', repo, '--keep-last', '1');
  t.equal(pr.code, 0, `prune runs once no backup holds the lock: ${pr.stderr}`);
});

t.test('a volume written while no daemon tracked it is read whole, and the backup says why', async (t) => {
  const dataDir = await tempDir('cowbd-data-');
  let d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '16M' }], logLevel: 'info' });
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', [1, 2, 3]);
  t.equal((await backup(d, 'vol', repo)).code, 0);
  await d.stop();
  // Behind the daemon's back: the file changes while nothing tracks it.
  const fh = await open(join(dataDir, 'vol.vol'), 'r+');
  await fh.write(Buffer.alloc(4096, 0x77), 0, 4096, 100 * CHUNK);
  await fh.close();
  d = await startDaemon({ dataDir, logLevel: 'info' });
  t.teardown(() => d.stop());
  const r = await run(d, 'backup', 'create', 'vol', '--repo', repo, '--keep-snapshot');
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /change tracking/i, `the backup says it read everything: ${r.stdout.trim()}`);
  const list = JSON.parse((await run(d, 'backup', 'list', '--repo', repo, '--json')).stdout) as Array<{ id: string; snapshot: string }>;
  const last = list.at(-1)!;
  const img = join(await tempDir('cowbd-restore-'), 'img');
  t.equal((await run(d, 'backup', 'restore', last.id, '--repo', repo, '--to-file', img)).code, 0);
  t.equal(await fileHash(img), await exportHash(d, last.snapshot), 'the full read restores exactly, the outside write included');
});
