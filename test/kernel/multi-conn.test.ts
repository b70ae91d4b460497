// nbd-client -C 2: the kernel spreads requests over two connections to one export,
// which is only safe because the daemon advertises CAN_MULTI_CONN and makes a flush
// on one connection cover writes completed on the other.
import t from 'tap';
import { startDaemon } from '../helpers/daemon.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

t.test('two connections to one export', { skip: await guestSkipReason() }, async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '256M' }] });
  t.teardown(async () => {
    killGuests();
    await d.stop();
  });
  const log = await guestLogPath('multi-conn');
  t.comment(`guest console: ${log}`);

  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol0', device: '/dev/nbd0', connections: 2 }],
    log,
    timeoutMs: 150_000,
    script: `
      mkfs.ext4 -q /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      # Parallel writers, so both connections carry requests at once.
      for i in 1 2 3 4; do head -c $((3 << 20)) /dev/urandom > /mnt/f$i & done
      wait
      (cd /mnt && sha256sum f1 f2 f3 f4) > /root/sums
      sync
      umount /mnt
      e2fsck -fn /dev/nbd0
      nbd-client -d /dev/nbd0
      cowbd-attach /dev/nbd0
      echo 3 > /proc/sys/vm/drop_caches
      e2fsck -fn /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      (cd /mnt && sha256sum -c /root/sums)
      umount /mnt
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 60) });
  t.match(r.log, /f4: OK/, 'checksums verified after reconnecting');
  const sessions = d.logs.filter((l) => l.msg === 'transmission started' && l.export === 'vol0');
  t.equal(sessions.length, 4, 'two connections per attach, two attaches');
  t.same(
    d.logs.filter((l) => Number(l.level) >= 40),
    [],
    'the daemon logged no warnings or errors',
  );
  t.comment(
    `guest wall ${r.wallMs} ms, uptime at init ${r.uptime.init}s, attached ${r.uptime.attached}s, script done ${r.uptime.scriptDone}s`,
  );
});
