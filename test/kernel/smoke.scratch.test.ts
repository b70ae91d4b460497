import t from 'tap';
import { spawn } from 'node:child_process';
import { runGuest, guestSkipReason, killGuests, tail } from '../helpers/vm.js';

t.test('nbdkit smoke', { skip: await guestSkipReason() }, async (t) => {
  const port = 10809 + Math.floor(Math.random() * 1000);
  const nbdkit = spawn('nbdkit', ['-f', '-p', String(port), '-i', '127.0.0.1', 'memory', '256M'], { stdio: 'inherit' });
  t.teardown(() => { nbdkit.kill(); killGuests(); });
  await new Promise((r) => setTimeout(r, 500));
  const r = await runGuest({
    exports: [{ port, device: '/dev/nbd0' }],
    script: `cat /sys/block/nbd0/size; mkfs.ext4 -q /dev/nbd0; mount /dev/nbd0 /mnt; echo hi > /mnt/a; umount /mnt; e2fsck -fn /dev/nbd0`,
    log: '/tmp/smoke.log', timeoutMs: 180_000,
  });
  t.equal(r.exitCode, 0, tail(r.log));
  t.comment(JSON.stringify({ wallMs: r.wallMs, uptime: r.uptime }));
});
