// The real Linux NBD client formats, mounts and checks an ext4 filesystem on the
// default export, then reconnects and finds every byte again.
import t from 'tap';
import { startDaemon } from '../helpers/daemon.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

t.test('ext4 on the default export', { skip: await guestSkipReason() }, async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '256M' }] });
  t.teardown(async () => {
    killGuests();
    await d.stop();
  });
  const log = await guestLogPath('ext4');
  t.comment(`guest console: ${log}`);

  const r = await runGuest({
    // No name: the empty export name, which the daemon maps to its default volume.
    exports: [{ port: d.port, device: '/dev/nbd0' }],
    log,
    timeoutMs: 150_000,
    script: `
      test "$(cat /sys/block/nbd0/size)" = $((256 * 2048))
      mkfs.ext4 -q -L cowbd /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      mkdir /mnt/dir
      echo hello > /mnt/hello.txt
      seq 1 20000 > /mnt/dir/seq.txt
      head -c $((8 << 20)) /dev/urandom > /mnt/random.bin
      (cd /mnt && sha256sum hello.txt dir/seq.txt random.bin) > /root/sums
      sync
      umount /mnt
      e2fsck -fn /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      (cd /mnt && sha256sum -c /root/sums)
      umount /mnt
      # Remounting may be answered by the guest's page cache; a fresh connection
      # can only be answered by the daemon.
      nbd-client -d /dev/nbd0
      cowbd-attach /dev/nbd0
      echo 3 > /proc/sys/vm/drop_caches
      e2fsck -fn /dev/nbd0
      test "$(e2label /dev/nbd0)" = cowbd
      mount -t ext4 /dev/nbd0 /mnt
      (cd /mnt && sha256sum -c /root/sums)
      umount /mnt
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 60) });
  t.match(r.log, /EXT4-fs \(nbd0\): mounted filesystem/, 'the kernel mounted ext4 from nbd0');
  t.match(r.log, /random\.bin: OK/, 'checksums verified after reconnecting');
  const sessions = d.logs.filter((l) => l.msg === 'transmission started');
  t.ok(sessions.length >= 2, `the daemon served both connections (${sessions.length})`);
  t.same(
    d.logs.filter((l) => Number(l.level) >= 40),
    [],
    'the daemon logged no warnings or errors',
  );
  t.comment(
    `guest wall ${r.wallMs} ms, uptime at init ${r.uptime.init}s, attached ${r.uptime.attached}s, script done ${r.uptime.scriptDone}s`,
  );
});
