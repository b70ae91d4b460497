// A read-only daemon: the kernel marks the device read-only, a ro mount reads the
// filesystem a writable daemon left behind, and writes fail without touching the data.
import t from 'tap';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon, type Daemon } from '../helpers/daemon.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

async function hashTree(dir: string): Promise<string> {
  const h = createHash('sha256');
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  for (const e of entries
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name))
    .sort()) {
    h.update(e);
    for await (const chunk of createReadStream(e)) h.update(chunk as Buffer);
  }
  return h.digest('hex');
}

t.test('read-only daemon', { skip: await guestSkipReason() }, async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-kernel-ro-'));
  const daemons: Daemon[] = [];
  t.teardown(async () => {
    killGuests();
    for (const d of daemons) await d.stop();
    await rm(dataDir, { recursive: true, force: true });
  });

  const rw = await startDaemon({ dataDir, volumes: [{ name: 'vol0', size: '128M' }] });
  daemons.push(rw);
  const format = await runGuest({
    exports: [{ port: rw.port, name: 'vol0', device: '/dev/nbd0' }],
    log: await guestLogPath('read-only-format'),
    timeoutMs: 120_000,
    script: `
      test "$(cat /sys/block/nbd0/ro)" = 0
      mkfs.ext4 -q /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      head -c $((2 << 20)) /dev/urandom > /mnt/random.bin
      echo kept > /mnt/kept.txt
      (cd /mnt && sha256sum random.bin kept.txt > sums)
      umount /mnt
    `,
  });
  t.equal(format.exitCode, 0, 'formatted through a writable daemon', { log: tail(format.log, 60) });
  await rw.stop();
  const before = await hashTree(dataDir);

  const ro = await startDaemon({ dataDir, readOnly: true });
  daemons.push(ro);
  const log = await guestLogPath('read-only');
  t.comment(`guest console: ${log}`);
  const r = await runGuest({
    exports: [{ port: ro.port, name: 'vol0', device: '/dev/nbd0' }],
    log,
    timeoutMs: 120_000,
    script: `
      test "$(blockdev --getro /dev/nbd0)" = 1
      test "$(cat /sys/block/nbd0/ro)" = 1
      mount -t ext4 -o ro /dev/nbd0 /mnt
      (cd /mnt && sha256sum -c sums)
      if echo x > /mnt/new.txt; then echo "COWBD-FAIL: wrote to a read-only mount"; exit 1; fi
      umount /mnt
      if dd if=/dev/zero of=/dev/nbd0 bs=4096 count=1 oflag=direct; then echo "COWBD-FAIL: wrote to a read-only device"; exit 1; fi
      e2fsck -fn /dev/nbd0
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 60) });
  t.match(r.log, /random\.bin: OK/, 'data written before is readable');
  t.same(
    ro.logs.filter((l) => Number(l.level) >= 40),
    [],
    'the daemon logged no warnings or errors',
  );
  await ro.stop();
  t.equal(await hashTree(dataDir), before, 'the data directory is unchanged');
  t.comment(
    `guest wall ${r.wallMs} ms, uptime at init ${r.uptime.init}s, attached ${r.uptime.attached}s, script done ${r.uptime.scriptDone}s`,
  );
});
