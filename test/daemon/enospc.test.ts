// Full file systems under the real daemon, made with small tmpfs mounts (root only).
// The daemon keeps snapshot stores in DATA/cow/ and follows whatever is mounted there,
// so the stores can fill up while the origin's file system has room, and vice versa.
//  - Store file system full under a sparse snapshot (one that reserves nothing): the
//    snapshot is invalidated (durably, reason disk-full), every origin write succeeds
//    and reads back; removing the snapshot frees the space; a reserved snapshot whose
//    store cannot even be created fails cleanly and leaves nothing behind.
//    (Reserved snapshots on a full disk: reserve-space.test.ts.)
//  - Origin file system full: writes that need new blocks get NBD_ENOSPC, logged at
//    warn with the export's name; reads, overwrites of allocated blocks, FLUSH, the
//    control API and the other connections keep working; TRIM gives space back.
import t from 'tap';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as C from '../../protocol/constants.js';
import { call } from '../../daemon/control-client.js';
import { startDaemon, waitForLog as logged, type Daemon } from '../helpers/daemon.js';
import { NbdClient, fill, nbdErrno } from '../helpers/nbd-client.js';
import { tmpfsMounts } from '../helpers/tmpfs.js';

const execFileP = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;

const top = await mkdtemp(join(tmpdir(), 'cowbd-enospc-'));
const mounts = tmpfsMounts();
t.teardown(async () => {
  await mounts.unmountAll();
  await rm(top, { recursive: true, force: true });
});
const tmpfs = (dir: string, size: string) => mounts.mount(dir, size);

/** The stores in a cow directory: the origins' change trackers (NAME.cbt) live beside them. */
const stores = async (dir: string) => (await readdir(dir)).filter((f) => !f.endsWith('.cbt'));

interface Usage {
  state: string;
  invalid: { reason: string; usedChunks: number; usedBytes: number } | null;
}
const usage = (d: Daemon, name: string) => call<Usage>(d.dataDir, 'GET', `/v1/snapshots/${name}`);
const state = async (d: Daemon, name: string) => (await usage(d, name)).state;

async function usedKiB(dir: string): Promise<number> {
  const { stdout } = await execFileP('df', ['-k', '--output=used', dir]);
  return Number(stdout.trim().split('\n').pop());
}

const SIZE = 16 * MiB;
const dirA = join(top, 'a');
const dirB = join(top, 'b');
// A: only DATA/cow is small: a store's header (128 KiB) and a few 64 KiB chunks fit, a 16 MiB volume's worth does not.
const skipA = await tmpfs(join(dirA, 'cow'), '1m');
// B: the whole data directory is small.
const skipB = skipA ?? (await tmpfs(dirB, '4m'));

t.test('the file system holding the snapshot stores fills up', { skip: skipA ?? false }, async (t) => {
  const dataDir = dirA;
  const cowDir = join(dataDir, 'cow');
  let d = await startDaemon({ dataDir, volumes: [{ name: 'vol0', size: '16M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await c.write(0, fill(SIZE, 1), true); // data everywhere: zero chunks would cost the store nothing
  // Sparse: a 20M snapshot overcommits a 1M file system, as a thin pool does.
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'snap', origin: 'vol0', size: '20M', sparse: true });
  t.same(await stores(cowDir), ['vol0.64k.sparse.cows'], 'the store lives on the small file system');

  let failures = 0;
  for (let off = 0; off < SIZE; off += MiB) failures += (await nbdErrno(c.write(off, fill(MiB, 2 + off / MiB)))) ? 1 : 0;
  t.equal(failures, 0, 'every origin write succeeded although the store ran out of space');
  await c.flush();
  let same = true;
  for (let off = 0; off < SIZE; off += MiB) same &&= (await c.read(off, MiB)).equals(fill(MiB, 2 + off / MiB));
  t.ok(same, 'and every one reads back');
  const u = await usage(d, 'snap');
  t.equal(u.state, 'invalid', 'the snapshot was invalidated');
  t.equal(u.invalid?.reason, 'disk-full', 'because the file system was full');
  t.ok((u.invalid?.usedBytes ?? 0) > 0, `holding what it had copied then (${u.invalid?.usedBytes} bytes)`);
  t.ok(
    await logged(d, (l) => l.snapshot === 'snap' && l.level === 50 && /invalidated/.test(String(l.msg)) && l.reason === 'disk-full'),
    'the invalidation is logged at error with disk-full as the reason',
  );
  const s = await NbdClient.connect({ port: d.port, exportName: 'snap' });
  t.equal(await nbdErrno(s.read(0, 4 * KiB)), C.NBD_EIO, 'its reads fail with EIO');
  await s.disconnect();
  await c.disconnect();

  t.equal(await d.stop(), 0, 'the daemon stayed up and stops cleanly');
  t.notOk(
    d.logs.some((l) => l.msg === 'flush failed'),
    'without trying to flush the invalid snapshot',
  );
  d = await startDaemon({ dataDir, logLevel: 'info' });
  t.match(await usage(d, 'snap'), { state: 'invalid', invalid: { reason: 'disk-full' } }, 'still invalid, and why, after a restart');

  await call(d.dataDir, 'DELETE', '/v1/snapshots/snap');
  t.same(await stores(cowDir), [], 'removing it deletes the store');
  t.ok((await usedKiB(cowDir)) < 64, 'and frees the space');
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'small', origin: 'vol0', size: '512K' });
  const c2 = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  await c2.write(0, fill(128 * KiB, 40));
  t.equal(await state(d, 'small'), 'valid', 'a snapshot that fits works again');
  const sm = await NbdClient.connect({ port: d.port, exportName: 'small' });
  t.same(await sm.read(0, 128 * KiB), fill(MiB, 2).subarray(0, 128 * KiB), 'and reads its point in time');
  await sm.disconnect();
  await call(d.dataDir, 'DELETE', '/v1/snapshots/small');

  // No room even for a store's header: creation fails, leaves no file, and the next one works.
  const filler = join(cowDir, 'filler');
  await execFileP('dd', ['if=/dev/zero', `of=${filler}`, 'bs=64k', 'count=64']).catch(() => undefined); // fills it: dd stops at ENOSPC
  const refused = await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'nospace', origin: 'vol0', size: '4M' }).then(
    () => 'created',
    (e: { code?: string; statusCode?: number; message: string }) => `${e.statusCode} ${e.code}: ${e.message}`,
  );
  t.match(refused, /ENOSPC|no space|needs .* free/i, 'creating a snapshot on a full file system fails with ENOSPC');
  t.match(refused, /^507 COWBD_NO_SPACE: snapshot nospace needs 4\.1 MiB reserved on disk/, 'as COWBD_NO_SPACE, naming what it needs');
  t.same(
    (await stores(cowDir)).filter((f) => f !== 'filler'),
    [],
    'and leaves no half-made store behind',
  );
  await unlink(filler);
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'later', origin: 'vol0', size: '512K' });
  t.equal(await state(d, 'later'), 'valid', 'once there is room, the same creation succeeds');
  await c2.disconnect();
  t.equal(d.proc.exitCode, null, 'the daemon is still up');
});

t.test("the origin's file system fills up", { skip: skipB ?? false }, async (t) => {
  const dataDir = dirB;
  const d = await startDaemon({
    dataDir,
    volumes: [
      { name: 'vol0', size: '16M' },
      { name: 'vol1', size: '1M' },
    ],
    logLevel: 'info',
  });
  t.teardown(() => d.stop());
  const c = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  const other = await NbdClient.connect({ port: d.port, exportName: 'vol1' });
  await other.write(0, fill(64 * KiB, 99), true);

  const ok: number[] = [];
  const enospc: number[] = [];
  for (let off = 0; off < SIZE; off += 512 * KiB) {
    const e = await nbdErrno(c.write(off, fill(512 * KiB, off / KiB)));
    if (e === 0) ok.push(off);
    else if (e === C.NBD_ENOSPC) enospc.push(off);
    else t.fail(`write at ${off}: NBD error ${e}`);
  }
  t.comment(`${ok.length} writes of 512 KiB fit, ${enospc.length} got ENOSPC`);
  t.ok(ok.length > 0 && enospc.length > 0, 'writes succeed until the file system is full, then get NBD_ENOSPC');
  t.ok(
    await logged(
      d,
      (l) => l.msg === 'request failed' && l.export === 'vol0' && l.level === 40 && (l.err as { code?: string })?.code === 'ENOSPC',
    ),
    'each is logged at warn with the export name and the real error',
  );

  let intact = true;
  for (const off of ok) intact &&= (await c.read(off, 512 * KiB)).equals(fill(512 * KiB, off / KiB));
  t.ok(intact, 'what was acknowledged reads back');
  await c.write(ok[0]!, fill(512 * KiB, 7777));
  t.same(await c.read(ok[0]!, 512 * KiB), fill(512 * KiB, 7777), 'overwriting allocated blocks still works');
  await c.flush();
  t.pass('FLUSH works');
  t.same(await other.read(0, 64 * KiB), fill(64 * KiB, 99), 'the other export, on its own connection, is unaffected');
  t.ok((await call<unknown[]>(d.dataDir, 'GET', '/v1/status')).length >= 2, 'the control API answers');

  // TRIM punches holes: the space comes back and the write that failed now lands.
  const first = enospc[0]!;
  await c.trim(ok[0]!, 2 * MiB);
  t.equal(await nbdErrno(c.write(first, fill(512 * KiB, first / KiB))), 0, 'after a TRIM frees blocks, the failed write succeeds');
  t.same(await c.read(first, 512 * KiB), fill(512 * KiB, first / KiB));
  await c.disconnect();
  await other.disconnect();
  t.equal(d.proc.exitCode, null, 'the daemon stayed up');
});
