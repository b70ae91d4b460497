// A bounded snapshot that fills up, as the real Linux kernel sees it. The origin never
// pays for its snapshot: its writes all succeed and verify whatever happens to the
// snapshot. Policy invalidate (the default, as LVM): a store that cannot take the
// origin's copies invalidates the snapshot, whose reads then fail with EIO. Policy
// overflow: the snapshot's own writes fail (ENOSPC) while its reads keep working.
// The guest asks the host (helpers/host-hooks.ts) to take the snapshot and to report
// its state at the points that matter.
import t from 'tap';
import { startDaemon, type Daemon } from '../helpers/daemon.js';
import { startHostHooks } from '../helpers/host-hooks.js';
import { attachLater, cli, sample, scrape, snapshotUsage } from '../helpers/snapshot-checks.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

const skip = await guestSkipReason();

/** Hooks: `snapshot` creates NAME with the given CLI flags; `state` answers
 *  "STATE USED/CAPACITY" for it and records the answer. */
async function hooksFor(d: Daemon, name: string, flags: string[]) {
  const states: string[] = [];
  let snapshotMs = 0;
  let originBytes = 0;
  const hooks = await startHostHooks({
    snapshot: async () => {
      originBytes = sample(await scrape(d), 'cowbd_nbd_bytes_total', { export: 'vol', direction: 'write' }) ?? 0;
      const started = Date.now();
      const r = await cli(d, 'snapshot', 'create', name, '--origin', 'vol', ...flags);
      snapshotMs = Date.now() - started;
      if (r.code !== 0) throw new Error(`snapshot create exited ${r.code}: ${r.stderr}`);
      return 'ok';
    },
    state: async () => {
      const u = await snapshotUsage(d, name);
      const s = u ? `${u.state} ${u.usedChunks}/${u.capacityChunks}` : 'gone';
      states.push(s);
      return s;
    },
  });
  return { hooks, states, snapshotMs: () => snapshotMs, originBytesAtSnapshot: () => originBytes };
}

/** Daemon log lines at warn or above (level 40+) that are not about snapshot `name`:
 *  its events carry `snapshot`, its failed requests an error naming it. */
const otherWarnings = (d: Daemon, name: string) =>
  d.logs
    .filter(
      (l) =>
        Number(l.level) >= 40 &&
        l.snapshot !== name &&
        !String((l.err as { message?: unknown } | undefined)?.message).includes(`snapshot ${name} `),
    )
    .map((l) => JSON.stringify(l));

t.test('policy invalidate: the origin outgrows a 2M snapshot of its mounted ext4', { skip }, async (t) => {
  const t0 = Date.now();
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }] });
  const { hooks, states, snapshotMs, originBytesAtSnapshot } = await hooksFor(d, 'small', ['--size', '2M', '--chunk-size', '64K']);
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    await d.stop();
  });
  const log = await guestLogPath('snapshot-overflow-invalidate');
  t.comment(`guest console: ${log}`);

  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log,
    timeoutMs: 120_000,
    script: `
      mkfs.ext4 -q /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      # Data the snapshot must preserve when the origin overwrites it in place (chunks
      # that read as zeros would cost the store no data chunk).
      head -c $((16 << 20)) /dev/urandom > /mnt/data.bin
      echo before > /mnt/note.txt
      sync
      wget -q -O /root/reply ${hooks.url('snapshot')}
      grep -qx ok /root/reply
      ${attachLater(d.port, 'small', '/dev/nbd1')}
      dd if=/dev/nbd1 of=/dev/null bs=64k count=64 iflag=direct
      echo COWBD-SNAP-READABLE
      wget -q -O - ${hooks.url('state')}
      # 12 times the store: 16M overwritten in place, and 8M of new files.
      dd if=/dev/urandom of=/mnt/data.bin bs=1M count=16 conv=notrunc
      head -c $((4 << 20)) /dev/urandom > /mnt/new1.bin
      head -c $((4 << 20)) /dev/urandom > /mnt/new2.bin
      echo after > /mnt/note.txt
      (cd /mnt && sha256sum data.bin new1.bin new2.bin note.txt) > /root/sums
      sync
      echo 3 > /proc/sys/vm/drop_caches
      (cd /mnt && sha256sum -c /root/sums)
      wget -q -O - ${hooks.url('state')}
      if dd if=/dev/nbd1 of=/dev/null bs=4k count=1 iflag=direct; then echo "COWBD-FAIL: read an invalid snapshot"; exit 1; fi
      echo COWBD-SNAP-READ-FAILED
      nbd-client -d /dev/nbd1
      umount /mnt
      e2fsck -fn /dev/nbd0
      # Read the origin back from the daemon, not the page cache.
      nbd-client -d /dev/nbd0
      cowbd-attach /dev/nbd0
      echo 3 > /proc/sys/vm/drop_caches
      mount -t ext4 -o ro /dev/nbd0 /mnt
      (cd /mnt && sha256sum -c /root/sums)
      umount /mnt
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 80) });
  t.match(r.log, /^COWBD-SNAP-READABLE\r?$/m, 'the snapshot was readable while valid');
  t.same(
    states.map((s) => s.split(' ')[0]),
    ['valid', 'invalid'],
    `snapshot state before and after the origin's writes: ${states.join(', ')}`,
  );
  t.equal(
    (r.log.match(/^(data|new1|new2)\.bin: OK\r?$/gm) ?? []).length,
    6,
    "the origin's data verified twice, the second time after reconnecting",
  );
  t.notMatch(r.log, /I\/O error, dev nbd0|EXT4-fs error|Buffer I\/O error on dev nbd0/, 'no I/O error on the origin');
  t.match(r.log, /^COWBD-SNAP-READ-FAILED\r?$/m, 'dd from the invalid snapshot failed');
  t.match(r.log, /I\/O error, dev nbd1/, 'the kernel saw an I/O error on the snapshot');

  const u = await snapshotUsage(d, 'small');
  t.equal(u?.state, 'invalid', 'snapshot list --json: invalid');
  const event = d.logs.find((l) => l.msg === 'snapshot small invalidated');
  t.match(event, { snapshot: 'small', origin: 'vol', level: 50 }, `the daemon logged the invalidation (${String(event?.reason)})`);
  t.same(otherWarnings(d, 'small'), [], 'every warning or error is about the snapshot');

  const m = await scrape(d);
  t.equal(sample(m, 'cowbd_snapshot_state', { snapshot: 'small', state: 'invalid' }), 1, '/metrics: state invalid');
  t.ok(
    (sample(m, 'cowbd_nbd_requests_total', { export: 'small', command: 'read', result: 'EIO' }) ?? 0) >= 1,
    '/metrics: the snapshot answered reads EIO',
  );
  const originErrors = m
    .split('\n')
    .filter((l) => l.startsWith('cowbd_nbd_requests_total{') && l.includes('export="vol"') && !l.includes('result="ok"'));
  t.same(originErrors, [], '/metrics: every origin request succeeded');
  const written = (sample(m, 'cowbd_nbd_bytes_total', { export: 'vol', direction: 'write' }) ?? 0) - originBytesAtSnapshot();
  t.ok(written >= 24 << 20, `after the snapshot the origin took ${(written / 2 ** 20).toFixed(1)} MiB of writes, for a 2 MiB store`);

  const removed = await cli(d, 'snapshot', 'remove', 'small');
  t.equal(removed.code, 0, `an invalid snapshot can be removed: ${removed.stderr.trim() || removed.stdout.trim()}`);
  t.comment(
    `snapshot create ${snapshotMs()} ms; boot: qemu to init ${r.initMs} ms, wall ${r.wallMs} ms; test duration ${Date.now() - t0} ms`,
  );
});

t.test('policy overflow: the snapshot refuses its own writes but stays readable', { skip }, async (t) => {
  const t0 = Date.now();
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '64M' }] });
  const { hooks, states, snapshotMs } = await hooksFor(d, 'ovf', ['--size', '1M', '--chunk-size', '64K', '--policy', 'overflow']);
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    await d.stop();
  });
  const log = await guestLogPath('snapshot-overflow-policy');
  t.comment(`guest console: ${log}`);

  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log,
    timeoutMs: 120_000,
    script: `
      head -c $((4 << 20)) /dev/urandom > /root/pattern
      dd if=/root/pattern of=/dev/nbd0 bs=1M oflag=direct
      sha256sum < /root/pattern > /root/pattern.sum
      wget -q -O /root/reply ${hooks.url('snapshot')}
      grep -qx ok /root/reply
      ${attachLater(d.port, 'ovf', '/dev/nbd1')}
      # 4M of the snapshot's own writes, past the pattern, into a 1M store.
      if dd if=/dev/urandom of=/dev/nbd1 bs=64k count=64 seek=256 oflag=direct; then echo "COWBD-FAIL: 4M fit a 1M store"; exit 1; fi
      echo COWBD-SNAP-WRITE-REFUSED
      wget -q -O - ${hooks.url('state')}
      # Full stays full: even a write into a chunk that costs nothing new is refused.
      if dd if=/dev/zero of=/dev/nbd1 bs=4k count=1 seek=4096 oflag=direct; then echo "COWBD-FAIL: wrote to a full snapshot"; exit 1; fi
      # Reads keep working and the point in time is intact.
      dd if=/dev/nbd1 bs=1M count=4 iflag=direct | sha256sum > /root/snap.sum
      cmp /root/pattern.sum /root/snap.sum
      echo COWBD-SNAP-READS-OK
      # The origin never waits on its snapshot: 1M of origin writes succeed, and the
      # copies they need do not fit, so the overflowed snapshot becomes invalid.
      head -c $((1 << 20)) /dev/urandom > /root/new
      dd if=/root/new of=/dev/nbd0 bs=1M count=1 oflag=direct
      dd if=/dev/nbd0 bs=1M count=1 iflag=direct | cmp - /root/new
      echo COWBD-ORIGIN-WRITE-OK
      wget -q -O - ${hooks.url('state')}
      if dd if=/dev/nbd1 of=/dev/null bs=4k count=1 iflag=direct; then echo "COWBD-FAIL: read an invalid snapshot"; exit 1; fi
      nbd-client -d /dev/nbd1
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 80) });
  t.match(r.log, /^COWBD-SNAP-WRITE-REFUSED\r?$/m, "the snapshot's writes past its store failed");
  t.match(r.log, /^COWBD-SNAP-READS-OK\r?$/m, 'the full snapshot still read its point in time');
  t.match(r.log, /^COWBD-ORIGIN-WRITE-OK\r?$/m, 'the origin took writes the full snapshot could not');
  t.same(
    states.map((s) => s.split(' ')[0]),
    ['overflow', 'invalid'],
    `snapshot state when full, then after the origin's writes: ${states.join(', ')}`,
  );

  const m = await scrape(d);
  const enospc = sample(m, 'cowbd_nbd_requests_total', { export: 'ovf', command: 'write', result: 'ENOSPC' }) ?? 0;
  t.ok(enospc >= 2, `/metrics: the daemon refused the snapshot's writes with ENOSPC (${enospc})`);
  t.equal(
    sample(m, 'cowbd_nbd_requests_total', { export: 'ovf', command: 'write', result: 'EIO' }),
    undefined,
    '/metrics: not with EIO while overflowed',
  );
  t.ok(
    (sample(m, 'cowbd_nbd_requests_total', { export: 'ovf', command: 'read', result: 'ok' }) ?? 0) > 0,
    '/metrics: reads of the full snapshot succeeded',
  );
  const originErrors = m
    .split('\n')
    .filter((l) => l.startsWith('cowbd_nbd_requests_total{') && l.includes('export="vol"') && !l.includes('result="ok"'));
  t.same(originErrors, [], '/metrics: every origin request succeeded');
  t.ok(
    d.logs.some((l) => l.snapshot === 'ovf' && /overflowed/.test(String(l.msg))),
    'the daemon logged the overflow',
  );
  t.ok(
    d.logs.some((l) => l.msg === 'snapshot ovf invalidated'),
    'and then the invalidation',
  );
  t.same(otherWarnings(d, 'ovf'), [], 'every warning or error is about the snapshot');
  t.comment(
    `snapshot create ${snapshotMs()} ms; boot: qemu to init ${r.initMs} ms, wall ${r.wallMs} ms; test duration ${Date.now() - t0} ms`,
  );
});
