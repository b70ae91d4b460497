// Hole punching and space reservation through the one long-lived fallocate helper: holes
// land where asked, allocations allocate, every call reuses the helper (the daemon forks
// once, not per TRIM or removal), failures come back per request without killing it, a
// full file system reads as ENOSPC, and a dead helper is replaced.
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { promisify } from 'node:util';
import { mkdtemp, rm, writeFile, readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FallocateHelper, fallocateHelper } from '../../cow/fallocate.js';
import { FileDevice } from '../../cow/device.js';

const MiB = 1 << 20;

async function dataFile(path: string): Promise<void> {
  await writeFile(path, Buffer.alloc(MiB, 0x5a));
}

/** A scratch directory and a helper of the test's own, both gone at its end. */
async function setup(t: Test): Promise<{ dir: string; hp: FallocateHelper }> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-punch-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const hp = new FallocateHelper();
  t.teardown(() => hp.stop());
  return { dir, hp };
}

t.test('punches exactly the ranges asked, with one helper for every punch', async (t) => {
  const { dir, hp } = await setup(t);
  const a = join(dir, ' a file with spaces ');
  const b = join(dir, 'b');
  await dataFile(a);
  await dataFile(b);
  const blocksBefore = (await stat(a)).blocks;
  hp.start();
  const pid = hp.pid;
  t.ok(pid, 'started ahead of the first punch');
  await Promise.all([
    hp.punch(a, [
      [65536, 65536],
      [512 * 1024, 131072],
    ]),
    hp.punch(b, [[0, 4096]]),
  ]);
  await hp.punch(a, [[MiB - 4096, 4096]]);
  t.equal(hp.pid, pid, 'three punches, two files, one helper');
  const got = await readFile(a);
  const want = Buffer.alloc(MiB, 0x5a);
  want.fill(0, 65536, 131072);
  want.fill(0, 512 * 1024, 512 * 1024 + 131072);
  want.fill(0, MiB - 4096);
  t.ok(got.equals(want), 'the punched ranges read as zeros, the rest is untouched');
  t.ok((await stat(a)).blocks < blocksBefore, 'and their blocks are freed');
  t.ok((await readFile(b)).subarray(0, 4096).equals(Buffer.alloc(4096)), 'the other file got its hole too');
  t.equal(got.length, MiB, 'the size is kept');
});

t.test('a failed punch rejects with its message; the helper serves the next one', async (t) => {
  const { dir, hp } = await setup(t);
  const ok = join(dir, 'ok');
  await dataFile(ok);
  await t.rejects(hp.punch(join(dir, 'missing'), [[0, 4096]]), { code: 'EIO', message: /missing.*No such file/ });
  const pid = hp.pid;
  await t.rejects(hp.punch(`${dir}/x\ny`, [[0, 4096]]), { code: 'EINVAL' }, 'a path that would break the line protocol is refused');
  await hp.punch(ok, [[0, 4096]]);
  t.equal(hp.pid, pid, 'same helper after the failures');
  t.ok((await readFile(ok)).subarray(0, 4096).equals(Buffer.alloc(4096)));
  await hp.punch(ok, []);
});

t.test('a helper that dies fails what it had and is replaced', async (t) => {
  const { dir, hp } = await setup(t);
  const f = join(dir, 'f');
  await dataFile(f);
  hp.start();
  const first = hp.pid!;
  process.kill(first, 'SIGKILL');
  // Written before the exit is noticed, or after: either way it fails or is retried, never hangs.
  await hp.punch(f, [[0, 4096]]).catch(() => {});
  await new Promise((r) => setTimeout(r, 50));
  await hp.punch(f, [[4096, 4096]]);
  t.not(hp.pid, first, 'a new helper');
  t.ok((await readFile(f)).subarray(4096, 8192).equals(Buffer.alloc(4096)), 'and it punches');
});

t.test('FileDevice punches through the shared helper', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-punch-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'vol');
  await dataFile(path);
  const dev = await FileDevice.open(path);
  t.teardown(() => dev.close());
  const pid = fallocateHelper.pid;
  t.ok(pid, 'opening a writable device started the helper');
  await dev.punchHoles([
    [0, 65536],
    [131072, 65536],
  ]);
  await dev.punchHole(MiB - 65536, 65536);
  t.equal(fallocateHelper.pid, pid, 'and every punch went through it: no fork per punch');
  const got = await readFile(path);
  t.ok(got.subarray(0, 65536).equals(Buffer.alloc(65536)) && got.subarray(131072, 196608).equals(Buffer.alloc(65536)));
  t.ok(got.subarray(65536, 131072).equals(Buffer.alloc(65536, 0x5a)), 'between the holes the data stays');
  t.ok(got.subarray(MiB - 65536).equals(Buffer.alloc(65536)));
  await t.rejects(FileDevice.open(join(dir, 'nope')), { code: 'ENOENT' });
});

t.test('FileDevice allocates through the shared helper; a full file system is ENOSPC', async (t) => {
  const { dir } = await setup(t);
  const path = join(dir, 'store');
  await writeFile(path, Buffer.alloc(4096, 1));
  const dev = await FileDevice.open(path);
  t.teardown(() => dev.close());
  const pid = fallocateHelper.pid;
  await dev.allocate(0, 8 * MiB);
  t.equal(fallocateHelper.pid, pid, 'no fork of the daemon per allocation');
  const st = await stat(path);
  t.equal(st.size, 8 * MiB, 'the file grows to the end of the range');
  t.equal(dev.size, 8 * MiB, 'and the device knows it');
  t.ok(st.blocks * 512 >= 8 * MiB, `its blocks are allocated (${st.blocks * 512} bytes)`);
  t.ok((await readFile(path)).subarray(0, 4096).equals(Buffer.alloc(4096, 1)), 'data already there is kept');
  t.ok((await dev.freeBytes()) > 0);

  if (process.getuid?.() !== 0) {
    t.pass('ENOSPC not tried: needs root to mount a small tmpfs');
    return;
  }
  const small = join(dir, 'small');
  await mkdir(small);
  await promisify(execFile)('mount', ['-t', 'tmpfs', '-o', 'size=4M', 'tmpfs', small]);
  t.teardown(() => promisify(execFile)('umount', ['-l', small]).catch(() => undefined));
  const f = join(small, 'store');
  await writeFile(f, '');
  const sdev = await FileDevice.open(f);
  t.teardown(() => sdev.close());
  await t.rejects(sdev.allocate(0, 64 * MiB), { code: 'ENOSPC', id: 'COW_ALLOCATE_NO_SPACE', message: /No space left/ });
  await sdev.allocate(0, MiB);
  t.equal((await stat(f)).size, MiB, 'the helper serves the next request');
});

t.test('a helper that cannot be started fails the punch, not the device', async (t) => {
  const { FallocateHelper: Broken } = await t.mockImport<typeof import('../../cow/fallocate.js')>('../../cow/fallocate.js', {
    'node:child_process': {
      spawn: () => {
        throw new Error('spawn ENOMEM');
      },
    },
  });
  const hp = new Broken();
  hp.start();
  t.equal(hp.pid, undefined, 'start does not throw');
  await t.rejects(hp.punch('/nowhere', [[0, 4096]]), { code: 'EIO', message: /cannot start the fallocate helper: spawn ENOMEM/ });
});
