// A reserved snapshot survives a full disk, as the real Linux kernel sees it. The
// daemon's data directory is a small tmpfs under a larger sparse origin; the guest
// makes ext4 on the origin, fills it with files, freezes it while the host takes a
// snapshot (reserved: its whole size is allocated at creation), rewrites a file so
// chunks are copied into the reservation, then writes until the disk is full. The
// origin's writes fail (the guest sees I/O errors) and the snapshot stays valid: read
// only, it fscks clean and every file written before it reads back with its checksum.
import t from 'tap';
import { join } from 'node:path';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { startDaemon } from '../helpers/daemon.js';
import { call } from '../../daemon/control-client.js';
import { startHostHooks } from '../helpers/host-hooks.js';
import { POPULATE, SUMS, attachLater, cli, parseSums, sample, scrape, snapshotUsage } from '../helpers/snapshot-checks.js';
import { allocatedBytes, freeBytes, tmpfsMounts } from '../helpers/tmpfs.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

const MiB = 1 << 20;
t.setTimeout(600_000);
const mounts = tmpfsMounts();
const top = await mkdtemp(join(tmpdir(), 'cowbd-reserve-vm-'));
t.teardown(async () => {
  await mounts.unmountAll();
  await rm(top, { recursive: true, force: true });
});
const dataDir = join(top, 'data');
const skip = (await guestSkipReason()) || (await mounts.mount(dataDir, '192m')) || false;

interface Usage {
  state: string;
  reservedBytes: number;
  capacityBytes: number;
  exceptions: number;
  invalid: { reason: string } | null;
}

t.test('a full disk fails the origin, not its reserved snapshot (ext4)', { skip }, async (t) => {
  const t0 = Date.now();
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '512M' }] });
  const states: string[] = [];
  let freeAfterSnapshot = 0;
  const hooks = await startHostHooks({
    snapshot: async () => {
      const r = await cli(d, 'snapshot', 'create', 'snap', '--origin', 'vol', '--size', '64M', '--read-only');
      if (r.code !== 0) throw new Error(`snapshot create exited ${r.code}: ${r.stderr}`);
      freeAfterSnapshot = await freeBytes(dataDir);
      return 'ok';
    },
    state: async () => {
      const u = await snapshotUsage(d, 'snap');
      const s = u ? `${u.state} ${u.usedChunks}/${u.capacityChunks}` : 'gone';
      states.push(s);
      return s;
    },
  });
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    await d.stop();
  });
  const log = await guestLogPath('reserve-space');
  t.comment(`guest console: ${log}`);

  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log,
    timeoutMs: 240_000,
    script: `
      # Inode tables left to the kernel's lazy init, which noinit_itable turns off: the
      # file system's own writes stay a few MiB; the journal is written out whole.
      mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=0,nodiscard /dev/nbd0
      mount -t ext4 -o noinit_itable /dev/nbd0 /mnt
      ${POPULATE}
      (cd /mnt && ${SUMS}) > /root/before
      sync
      # Frozen, the file system is clean on disk: the snapshot needs no journal replay
      # and can be checked read-only.
      fsfreeze --freeze /mnt
      wget -q -O /root/reply --post-file=/root/before ${hooks.url('snapshot')}
      fsfreeze --unfreeze /mnt
      grep -qx ok /root/reply
      wget -q -O - ${hooks.url('state')}
      # Rewritten in place: its chunks are copied into the snapshot's reservation.
      dd if=/dev/urandom of=/mnt/random.bin bs=1M count=6 conv=notrunc,fsync
      echo COWBD-REWRITTEN
      # Then more than the disk holds, into space the origin never wrote.
      head -c $((1 << 20)) /dev/urandom > /root/r1m
      if (for i in $(seq 1 320); do cat /root/r1m; done) | dd of=/mnt/fill bs=1M iflag=fullblock oflag=direct 2>/root/dd.err; then
        cat /root/dd.err; echo "COWBD-FAIL: 320M fit the disk"; exit 1
      fi
      cat /root/dd.err
      echo COWBD-ORIGIN-WRITE-FAILED
      wget -q -O - ${hooks.url('state')}
      umount /mnt || umount -l /mnt
      ${attachLater(d.port, 'snap', '/dev/nbd1')}
      test "$(blockdev --getro /dev/nbd1)" = 1
      echo COWBD-SNAP-READ-ONLY
      if dumpe2fs -h /dev/nbd1 2>/dev/null | grep -q needs_recovery; then echo "COWBD-FAIL: snapshot needs recovery"; exit 1; fi
      fsck.ext4 -fn /dev/nbd1
      echo COWBD-SNAP-FSCK-CLEAN
      mkdir -p /mnt/snap
      mount -t ext4 -o ro /dev/nbd1 /mnt/snap
      (cd /mnt/snap && sha256sum -c /root/before) > /root/snap-check
      cat /root/snap-check
      (cd /mnt/snap && ${SUMS}) | cut -c 67- > /root/snap-files
      cut -c 67- /root/before > /root/before-files
      diff /root/before-files /root/snap-files
      echo COWBD-SNAP-SAME-FILES
      umount /mnt/snap
      nbd-client -d /dev/nbd1
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 80) });
  const before = parseSums(hooks.calls.find((c) => c.path === 'snapshot')?.body ?? '');
  t.equal(before.size, 5 + 64, 'the guest reported every file before the snapshot');
  t.ok(
    freeAfterSnapshot > 0 && freeAfterSnapshot < 320 * MiB,
    `free after the snapshot: ${(freeAfterSnapshot / MiB).toFixed(1)} MiB, less than the 320 MiB written`,
  );
  t.match(r.log, /^COWBD-REWRITTEN\r?$/m, 'rewriting a file copied into the reservation, without error');
  t.match(r.log, /^COWBD-ORIGIN-WRITE-FAILED\r?$/m, 'filling the origin failed');
  // ext4 may abort its journal on the origin's I/O errors and go read-only before dd's next write.
  t.match(
    r.log,
    /dd: error writing '\/mnt\/fill': (Input\/output error|No space left on device|Read-only file system)/,
    'dd saw the error',
  );
  t.match(r.log, /I\/O error, dev nbd0/, 'the kernel saw I/O errors on the origin');
  t.same(
    states.map((s) => s.split(' ')[0]),
    ['valid', 'valid'],
    `snapshot state after the snapshot and after the disk filled: ${states.join(', ')}`,
  );
  const used = states.map((s) => Number(/ (\d+)\//.exec(s)?.[1] ?? 0));
  t.ok(used.length === 2 && used[1]! - used[0]! >= 96, `the 6 MiB rewrite took 96+ chunks of the reservation (${used.join(' -> ')})`);
  t.match(r.log, /^COWBD-SNAP-READ-ONLY\r?$/m, 'the snapshot attached read-only');
  t.match(r.log, /^COWBD-SNAP-FSCK-CLEAN\r?$/m, 'fsck.ext4 -fn is clean on the snapshot');
  const ok = (r.log.match(/^\.\/\S+: OK\r?$/gm) ?? []).length;
  t.equal(ok, before.size, `every file written before the snapshot reads back (${ok} OK of ${before.size})`);
  t.match(r.log, /^COWBD-SNAP-SAME-FILES\r?$/m, 'and nothing written after it is there');
  t.notMatch(r.log, /I\/O error, dev nbd1|EXT4-fs error \(device nbd1\)/, 'no I/O or ext4 error on the snapshot');

  const u = await call<Usage>(dataDir, 'GET', '/v1/snapshots/snap');
  t.match(u, { state: 'valid', invalid: null }, 'the daemon: the snapshot is valid, never invalidated');
  t.ok(u.exceptions > 0, `the rewrite copied chunks into it (${u.exceptions} exceptions)`);
  t.equal(u.reservedBytes, u.capacityBytes, 'its whole size is reserved');
  const store = join(dataDir, 'cow', 'vol.64k.cows');
  const allocated = await allocatedBytes(store);
  t.ok(allocated >= 64 * MiB, `the store file holds ${(allocated / MiB).toFixed(1)} MiB allocated`);
  t.ok((await freeBytes(dataDir)) < 4 * MiB, `the disk is full (${((await freeBytes(dataDir)) / MiB).toFixed(1)} MiB free)`);
  const m = await scrape(d);
  const enospc = sample(m, 'cowbd_nbd_requests_total', { export: 'vol', command: 'write', result: 'ENOSPC' }) ?? 0;
  t.ok(enospc >= 1, `/metrics: origin writes answered ENOSPC (${enospc})`);
  t.equal(sample(m, 'cowbd_snapshot_state', { snapshot: 'snap', state: 'valid' }), 1, '/metrics: the snapshot is valid');
  t.notOk(
    d.logs.some((l) => /invalidated/.test(String(l.msg))),
    'the daemon logged no invalidation',
  );
  t.comment(`boot: qemu to init ${r.initMs} ms, wall ${r.wallMs} ms; test duration ${Date.now() - t0} ms`);
});
