// The manager over real files: attach, create, list, extend, remove (space back to the
// file system), restart, transient snapshots, names, events.
import t from 'tap';
import { mkdtemp, readdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CowManager,
  FileDevice,
  syncDirectory,
  syncMadeDirectories,
  validName,
  type InvalidatedEvent,
  type UsageEvent,
} from '../../cow/index.js';

const MiB = 1 << 20;

async function dataDir(t: { teardown(fn: () => unknown): void }): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cow-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function volume(dir: string, name: string, size: number): Promise<void> {
  await writeFile(join(dir, `${name}.vol`), '');
  await truncate(join(dir, `${name}.vol`), size);
}

const fill = (n: number, byte: number): Buffer => Buffer.alloc(n, byte);

t.test('create, write, restart, list, extend, remove', async (t) => {
  const dir = await dataDir(t);
  await volume(dir, 'vol', 16 * MiB);
  const commits: number[] = [];
  let m = await CowManager.open(dir, { onCommit: (s) => commits.push(s) });
  const origin = await m.attachOrigin('vol');
  await origin.write(fill(MiB, 1), 0, true);
  const s = await m.createSnapshot({ name: 'snap', origin: 'vol', size: 4 * MiB });
  t.equal(s.size, 16 * MiB);
  await origin.write(fill(MiB, 2), 0, false);
  await s.write(fill(65536, 3), 2 * MiB, true);
  await origin.settle();
  const u = m.list()[0]!;
  t.match(u, { name: 'snap', origin: 'vol', state: 'valid', usedChunks: 16 + 1 + 2, capacityChunks: 64, chunkSize: 65536 });
  t.ok(commits.length > 0, 'commit latency reported');
  t.match(m.stats(), { copies: 16, bytesCopied: MiB, snapshots: 1 });
  await m.close();
  await m.close();

  m = await CowManager.open(dir);
  const o2 = await m.attachOrigin('vol');
  const s2 = m.snapshot('snap')!;
  t.ok(s2, 'snapshot back after restart');
  const b = Buffer.alloc(MiB);
  await s2.read(b, 0);
  t.ok(b.equals(fill(MiB, 1)), 'snapshot reads the old data');
  await o2.read(b, 0);
  t.ok(b.equals(fill(MiB, 2)), 'origin reads the new data');
  const c = Buffer.alloc(65536);
  await s2.read(c, 2 * MiB);
  t.ok(c.equals(fill(65536, 3)), 'snapshot write persisted');
  t.equal(m.list()[0]!.usedChunks, 19);
  const ext = await m.extendSnapshot('snap', 8 * MiB);
  t.equal(ext.capacityChunks, 128);
  const storeFile = join(dir, 'cow', 'vol.64k.cows');
  t.ok((await stat(storeFile)).size > 0);
  await m.removeSnapshot('snap');
  await t.rejects(stat(storeFile), 'store file deleted with its last snapshot');
  t.same(m.list(), []);
  await m.close();
});

t.test('remove punches holes while other snapshots remain', async (t) => {
  const dir = await dataDir(t);
  await volume(dir, 'v', 32 * MiB);
  const m = await CowManager.open(dir);
  t.teardown(() => m.close());
  const o = await m.attachOrigin('v');
  await m.createSnapshot({ name: 'keep', origin: 'v', size: 16 * MiB, chunkSize: 65536 });
  await o.write(fill(4 * MiB, 5), 0, false); // shared by nothing else yet: keep's chunks
  const gone = await m.createSnapshot({ name: 'gone', origin: 'v', size: 16 * MiB, chunkSize: 65536 });
  await gone.write(fill(8 * MiB, 6), 8 * MiB, false); // gone's private chunks
  await o.write(fill(MiB, 7), 24 * MiB, false); // shared chunk run at the end of the file
  const file = join(dir, 'cow', 'v.64k.cows');
  const before = (await stat(file)).blocks;
  await m.removeSnapshot('gone');
  const after = (await stat(file)).blocks;
  t.ok(after < before - 8 * 2048 * 0.9, `blocks ${before} -> ${after}: gone's 8 MiB returned to the file system`);
  const b = Buffer.alloc(MiB);
  await m.snapshot('keep')!.read(b, 0);
  t.ok(b.equals(Buffer.alloc(MiB)), 'keep unaffected');
});

t.test('transient snapshots vanish on restart; persistent stay', async (t) => {
  const dir = await dataDir(t);
  await volume(dir, 'v', 4 * MiB);
  let m = await CowManager.open(dir);
  const o = await m.attachOrigin('v');
  const tr = await m.createSnapshot({ name: 'tr', origin: 'v', size: MiB, transient: true });
  await m.createSnapshot({ name: 'pe', origin: 'v', size: MiB, chunkSize: 4096 });
  await o.write(fill(65536, 9), 0, false);
  const b = Buffer.alloc(65536);
  await tr.read(b, 0);
  t.ok(b.equals(Buffer.alloc(65536)), 'transient snapshot serves old data');
  t.same(
    m
      .list()
      .map((u) => [u.name, u.transient, u.chunkSize])
      .sort(),
    [
      ['pe', false, 4096],
      ['tr', true, 65536],
    ],
  );
  // No close: a crash leaves the transient file behind.
  m = await CowManager.open(dir);
  t.same((await readdir(join(dir, 'cow'))).sort(), ['v.4k.cows']);
  await m.attachOrigin('v');
  t.same(
    m.list().map((u) => u.name),
    ['pe'],
  );
  await m.close();
});

t.test('names, errors and events', async (t) => {
  t.ok(validName('a-b_c.d+1'));
  t.notOk(validName('../x') || validName('a/b') || validName('') || validName('.hidden') || validName('a..b'));
  const dir = await dataDir(t);
  await volume(dir, 'v', 4 * MiB);
  const m = await CowManager.open(dir, { usageThresholds: [50] });
  t.teardown(() => m.close());
  await t.rejects(m.attachOrigin('../etc'), { code: 'EINVAL' });
  await t.rejects(m.createSnapshot({ name: 's', origin: 'nope', size: MiB }), { code: 'ENOENT' });
  const o = await m.attachOrigin('v');
  await t.rejects(m.createSnapshot({ name: 'x/y', origin: 'v', size: MiB }), { code: 'EINVAL' });
  await t.rejects(m.createSnapshot({ name: 's', origin: 'v', size: MiB, chunkSize: 3000 }), { code: 'EINVAL' });
  await t.rejects(m.createSnapshot({ name: 's', origin: 'v', size: 65536 }), { code: 'EINVAL' }, 'too small for its metadata');
  const invalid: InvalidatedEvent[] = [];
  const usage: UsageEvent[] = [];
  m.on('invalidated', (e) => invalid.push(e));
  m.on('usage', (e) => usage.push(e));
  await o.write(fill(4 * 65536, 7), 0, false); // data, not holes: holes become zero exceptions
  const s = await m.createSnapshot({ name: 's', origin: 'v', size: 4 * 65536 });
  await t.rejects(m.createSnapshot({ name: 's', origin: 'v', size: MiB }), { code: 'EEXIST' });
  await o.write(fill(65536, 1), 0, false);
  await o.settle();
  t.equal(usage.length, 1, 'crossed 50%');
  t.match(usage[0], { name: 's', usedChunks: 3, capacityChunks: 4 });
  await o.write(fill(3 * 65536, 1), 65536, false);
  await o.settle();
  t.equal(s.state, 'invalid');
  t.match(invalid, [{ name: 's', origin: 'v', capacityChunks: 4 }]);
  await t.rejects(m.removeSnapshot('nope'), { code: 'ENOENT' });
});

t.test('FileDevice: zero fill past EOF, punch, truncate', async (t) => {
  const dir = await dataDir(t);
  const d = await FileDevice.open(join(dir, 'f'), { create: true });
  await d.write(fill(8192, 7), 0);
  const b = Buffer.alloc(4096, 1);
  await d.read(b, 6144);
  t.equal(b[0], 7);
  t.equal(b[4000], 0, 'past EOF reads zeros');
  await d.punchHole(0, 4096);
  await d.read(b, 0);
  t.ok(b.equals(Buffer.alloc(4096)));
  await d.truncate(4096);
  t.equal(d.size, 4096);
  await d.sync();
  await d.close();
  await d.close();
});

t.test('new names are made durable: the cow directory, and a store before its first snapshot is acknowledged', async (t) => {
  const dir = await dataDir(t);
  await volume(dir, 'vol', 16 * MiB);
  const log: string[] = [];
  const syncDirectory = async (d: string) => {
    log.push(`dir ${d}`);
  };
  const m = await CowManager.open(dir, {
    syncDirectory,
    wrapDevice: (dev) => {
      const sync = dev.sync.bind(dev);
      dev.sync = async () => {
        log.push(`sync ${dev.path}`);
        await sync();
      };
      return dev;
    },
  });
  t.teardown(() => m.close());
  t.same(log, [`dir ${dir}`], 'the data directory, which holds the new cow directory');
  await m.attachOrigin('vol');
  log.length = 0;
  const store = join(dir, 'cow', 'vol.64k.cows');
  const created = m.createSnapshot({ name: 'a', origin: 'vol', size: 4 * MiB }).then(() => log.push('acknowledged'));
  await created;
  t.same(
    log,
    [`dir ${join(dir, 'cow')}`, `sync ${store}`, 'acknowledged'],
    "the store's name, its one sync (header and first slot), then the reply",
  );
  log.length = 0;
  await m.createSnapshot({ name: 'b', origin: 'vol', size: 4 * MiB });
  t.notOk(
    log.some((l) => l.startsWith('dir')),
    'a second snapshot in the same store makes no new name',
  );
  const again = await CowManager.open(dir, { syncDirectory });
  t.teardown(() => again.close());
  t.same(
    log.filter((l) => l.startsWith('dir')),
    [],
    'an existing cow directory is not synced again',
  );
});

t.test('a failed directory sync fails the creation and leaves no store behind', async (t) => {
  const dir = await dataDir(t);
  await volume(dir, 'vol', 16 * MiB);
  let fail = false;
  const m = await CowManager.open(dir, {
    syncDirectory: async () => {
      if (fail) throw Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' });
    },
  });
  t.teardown(() => m.close());
  await m.attachOrigin('vol');
  fail = true;
  await t.rejects(m.createSnapshot({ name: 'a', origin: 'vol', size: 4 * MiB }), { code: 'EIO' });
  t.same(await readdir(join(dir, 'cow')), [], 'the store file is removed');
  t.same(m.list(), []);
  fail = false;
  await m.createSnapshot({ name: 'a', origin: 'vol', size: 4 * MiB });
  t.equal(m.list().length, 1, 'the next creation works');
});

t.test('syncDirectory and syncMadeDirectories on real directories', async (t) => {
  const dir = await dataDir(t);
  await syncDirectory(dir);
  await t.rejects(syncDirectory(join(dir, 'missing')), { code: 'ENOENT' });
  const synced: string[] = [];
  const rec = async (d: string) => {
    synced.push(d);
  };
  await syncMadeDirectories(undefined, join(dir, 'a', 'b'), rec);
  t.same(synced, [], 'nothing made, nothing synced');
  await syncMadeDirectories(join(dir, 'a'), join(dir, 'a', 'b'), rec);
  t.same(synced, [join(dir, 'a'), dir], 'the parent of every new directory, deepest first');
});
