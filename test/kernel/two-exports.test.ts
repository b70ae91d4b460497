// Two exports attached at once: each gets its own filesystem and neither sees the other's.
import t from 'tap';
import { startDaemon } from '../helpers/daemon.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

t.test('two exports as /dev/nbd0 and /dev/nbd1', { skip: await guestSkipReason() }, async (t) => {
  const d = await startDaemon({
    volumes: [
      { name: 'vol0', size: '128M' },
      { name: 'vol1', size: '192M' },
    ],
  });
  t.teardown(async () => {
    killGuests();
    await d.stop();
  });
  const log = await guestLogPath('two-exports');
  t.comment(`guest console: ${log}`);

  const r = await runGuest({
    exports: [
      { port: d.port, name: 'vol0', device: '/dev/nbd0' },
      { port: d.port, name: 'vol1', device: '/dev/nbd1' },
    ],
    log,
    timeoutMs: 150_000,
    script: `
      test "$(cat /sys/block/nbd0/size)" = $((128 * 2048))
      test "$(cat /sys/block/nbd1/size)" = $((192 * 2048))
      for i in 0 1; do
        mkfs.ext4 -q -L vol$i /dev/nbd$i
        mkdir -p /mnt/$i
        mount -t ext4 /dev/nbd$i /mnt/$i
        echo "I am vol$i" > /mnt/$i/whoami
        head -c $(((3 + i) << 20)) /dev/urandom > /mnt/$i/random.bin
        (cd /mnt/$i && sha256sum whoami random.bin) > /root/sums$i
      done
      sync
      umount /mnt/0 /mnt/1
      e2fsck -fn /dev/nbd0
      e2fsck -fn /dev/nbd1
      # Fresh connections, so what follows is read from the daemon.
      nbd-client -d /dev/nbd0
      nbd-client -d /dev/nbd1
      cowbd-attach /dev/nbd1
      cowbd-attach /dev/nbd0
      echo 3 > /proc/sys/vm/drop_caches
      for i in 0 1; do
        e2fsck -fn /dev/nbd$i
        test "$(e2label /dev/nbd$i)" = vol$i
        mount -t ext4 -o ro /dev/nbd$i /mnt/$i
        (cd /mnt/$i && sha256sum -c /root/sums$i)
        grep -qx "I am vol$i" /mnt/$i/whoami
        umount /mnt/$i
      done
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 60) });
  t.match(r.log, /EXT4-fs \(nbd1\): mounted filesystem/, 'the kernel mounted ext4 from nbd1');
  const sessions = d.logs.filter((l) => l.msg === 'transmission started').map((l) => l.export);
  t.same([...new Set(sessions)].sort(), ['vol0', 'vol1'], 'both exports were served');
  t.same(
    d.logs.filter((l) => Number(l.level) >= 40),
    [],
    'the daemon logged no warnings or errors',
  );
  t.comment(
    `guest wall ${r.wallMs} ms, uptime at init ${r.uptime.init}s, attached ${r.uptime.attached}s, script done ${r.uptime.scriptDone}s`,
  );
});
