// The seed scenario as the real Linux kernel sees it: a consistent backup of a live
// volume. The guest formats and fills an ext4 origin and, with the file system still
// mounted, asks the host (over HTTP, see helpers/host-hooks.ts) to take a snapshot
// with the CLI; then it deletes and rewrites files on the origin. A second boot
// attaches the snapshot too: mounting it replays the ext4 journal (a snapshot of a
// mounted file system is a crash image), every file is back exactly as it was, the
// origin has the changes, and both fsck clean. Then status, metrics and removal.
import t from 'tap';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import {
  POPULATE,
  SUMS,
  cli,
  cliJson as json,
  parseSums,
  sample,
  scrape,
  type SnapshotUsage as Usage,
  type StatusRow,
} from '../helpers/snapshot-checks.js';
import { startHostHooks } from '../helpers/host-hooks.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

t.test('a consistent backup of a live ext4 volume', { skip: await guestSkipReason() }, async (t) => {
  const t0 = Date.now();
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }] });
  let snapshotMs = 0;
  const hooks = await startHostHooks({
    // The guest posts its checksums and waits for the answer: the snapshot is taken
    // while it blocks here, with the file system mounted.
    snapshot: async () => {
      const started = Date.now();
      const r = await cli(d, 'snapshot', 'create', 'snap', '--origin', 'vol', '--size', '64M', '--chunk-size', '64K');
      snapshotMs = Date.now() - started;
      if (r.code !== 0) throw new Error(`snapshot create exited ${r.code}: ${r.stderr}`);
      return 'ok';
    },
    after: () => 'ok',
  });
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    await d.stop();
  });

  // Boot 1: make a live file system, snapshot it mounted, then change the origin.
  const log1 = await guestLogPath('snapshot-ext4-1');
  t.comment(`guest console: ${log1}`);
  const r1 = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log: log1,
    timeoutMs: 120_000,
    script: `
      mkfs.ext4 -q -L live /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      ${POPULATE}
      (cd /mnt && ${SUMS}) > /root/before
      sync
      # Still mounted: this is a backup of a live file system.
      grep -q '^/dev/nbd0 /mnt ext4 rw' /proc/mounts
      wget -q -O /root/reply --post-file=/root/before ${hooks.url('snapshot')}
      grep -qx ok /root/reply
      # The origin moves on: files deleted, rewritten in place, appended, created.
      rm /mnt/precious.txt /mnt/dir/photo.bin
      rm /mnt/many/f1*
      dd if=/dev/urandom of=/mnt/random.bin bs=1M count=3 seek=1 conv=notrunc
      echo changed >> /mnt/dir/seq.txt
      head -c $((2 << 20)) /dev/urandom > /mnt/new.bin
      (cd /mnt && ${SUMS}) > /root/after
      wget -q -O /root/reply --post-file=/root/after ${hooks.url('after')}
      umount /mnt
      e2fsck -fn /dev/nbd0
    `,
  });
  t.equal(r1.exitCode, 0, 'boot 1: formatted, snapshotted while mounted, changed the origin', { log: tail(r1.log, 60) });
  const before = parseSums(hooks.calls.find((c) => c.path === 'snapshot')?.body ?? '');
  const after = parseSums(hooks.calls.find((c) => c.path === 'after')?.body ?? '');
  t.equal(before.size, 5 + 64, 'the guest reported every file before the snapshot');
  t.ok(after.size > 0 && !after.has('./precious.txt') && after.has('./new.bin'), 'the guest reported the origin after its changes');
  t.not(after.get('./random.bin'), before.get('./random.bin'), 'random.bin was rewritten after the snapshot');
  if (r1.exitCode !== 0 || before.size === 0 || after.size === 0) return;

  const u1 = (await json<Usage[]>(d, 'snapshot', 'list')).find((u) => u.name === 'snap');
  t.equal(u1?.state, 'valid', 'the snapshot is valid after the origin changed');
  t.ok((u1?.exceptions ?? 0) > 0, `the origin's changes copied chunks into the snapshot (${u1?.exceptions} exceptions)`);

  // Boot 2: a fresh kernel (no page cache) attaches the origin and the snapshot.
  const log2 = await guestLogPath('snapshot-ext4-2');
  t.comment(`guest console: ${log2}`);
  const r2 = await runGuest({
    exports: [
      { port: d.port, name: 'vol', device: '/dev/nbd0' },
      { port: d.port, name: 'snap', device: '/dev/nbd1' },
    ],
    log: log2,
    timeoutMs: 120_000,
    script: `
      cat > /root/before <<'EOF'
${[...before].map(([f, h]) => `${h}  ${f}`).join('\n')}
EOF
      cat > /root/after <<'EOF'
${[...after].map(([f, h]) => `${h}  ${f}`).join('\n')}
EOF
      test "$(cat /sys/block/nbd1/size)" = $((256 * 2048))
      mkdir -p /mnt/snap /mnt/vol
      # The origin was unmounted cleanly; the snapshot was taken of a mounted file
      # system, so its journal needs recovery.
      # (sh -e ignores a failing "! cmd", hence the ifs.)
      if dumpe2fs -h /dev/nbd0 2>/dev/null | grep -q needs_recovery; then echo "COWBD-FAIL: origin not clean"; exit 1; fi
      if dumpe2fs -h /dev/nbd1 2>/dev/null | grep -q needs_recovery; then echo COWBD-SNAP-NEEDS-RECOVERY; fi
      mount -t ext4 /dev/nbd1 /mnt/snap
      (cd /mnt/snap && sha256sum -c /root/before) > /root/snap-check
      cat /root/snap-check
      (cd /mnt/snap && ${SUMS}) | cut -c 67- > /root/snap-files
      cut -c 67- /root/before > /root/before-files
      diff /root/before-files /root/snap-files
      echo COWBD-SNAP-SAME-FILES
      mount -t ext4 /dev/nbd0 /mnt/vol
      (cd /mnt/vol && sha256sum -c /root/after) > /root/vol-check
      cat /root/vol-check
      (cd /mnt/vol && ${SUMS}) | cut -c 67- > /root/vol-files
      cut -c 67- /root/after > /root/after-files
      diff /root/after-files /root/vol-files
      echo COWBD-VOL-SAME-FILES
      test ! -e /mnt/vol/precious.txt
      # The backup: bring the deleted file back from the snapshot.
      cp -a /mnt/snap/precious.txt /mnt/vol/precious.txt
      umount /mnt/snap
      e2fsck -fn /dev/nbd1
      echo COWBD-SNAP-FSCK-CLEAN
      umount /mnt/vol
      e2fsck -fn /dev/nbd0
      echo COWBD-VOL-FSCK-CLEAN
      # Read the restored file back from the daemon, not the page cache.
      nbd-client -d /dev/nbd0
      cowbd-attach /dev/nbd0
      echo 3 > /proc/sys/vm/drop_caches
      mount -t ext4 -o ro /dev/nbd0 /mnt/vol
      grep ' ./precious.txt$' /root/before > /root/precious.sum
      (cd /mnt/vol && sha256sum -c /root/precious.sum)
      umount /mnt/vol
    `,
  });
  t.equal(r2.exitCode, 0, 'boot 2: snapshot and origin checked', { log: tail(r2.log, 80) });
  t.match(r2.log, /^COWBD-SNAP-NEEDS-RECOVERY\r?$/m, 'the snapshot holds a mounted file system (journal needs recovery)');
  t.match(r2.log, /EXT4-fs \(nbd1\): recovery complete/, 'mounting the snapshot replayed its journal');
  const snapOk = (r2.log.match(/^\.\/\S+: OK\r?$/gm) ?? []).length;
  t.ok(snapOk >= before.size + after.size, `every checksum matched (${snapOk} OK lines for ${before.size} + ${after.size} files)`);
  t.match(
    r2.log,
    /\.\/precious\.txt: OK[\s\S]*COWBD-SNAP-SAME-FILES/,
    'the deleted file is back in the snapshot, and nothing written later is',
  );
  t.match(r2.log, /^COWBD-VOL-SAME-FILES\r?$/m, 'the origin has exactly its post-snapshot files');
  t.match(r2.log, /COWBD-SNAP-FSCK-CLEAN[\s\S]*COWBD-VOL-FSCK-CLEAN/, 'e2fsck -fn is clean on both');
  t.notMatch(r2.log, /I\/O error|EXT4-fs error/, 'the kernel logged no I/O or ext4 errors');

  // From the host: status, usage, metrics, removal.
  const status = await json<StatusRow[]>(d, 'status');
  const row = status.find((s) => s.name === 'snap');
  t.match(row, { kind: 'snapshot', origin: 'vol', state: 'valid', storeSize: 64 << 20 }, 'status: the snapshot is valid');
  t.ok((row?.usedPercent ?? 0) > 0, `status: usage ${row?.usedPercent?.toFixed(2)}% > 0`);
  const u2 = (await json<Usage[]>(d, 'snapshot', 'list')).find((u) => u.name === 'snap')!;
  // The replay and the copy-back may land only in chunks the snapshot already holds
  // (the origin's own journal commits after the snapshot copied them), so usage need
  // not grow; it must never shrink, and the writes must have reached the snapshot.
  t.ok(
    u2.usedChunks >= u1!.usedChunks && u2.exceptions >= u1!.exceptions,
    `the journal replay and the copy-back lost no chunk (${u1!.usedChunks} -> ${u2.usedChunks} of ${u2.capacityChunks})`,
  );
  const metrics = await scrape(d);
  const used = sample(metrics, 'cowbd_snapshot_chunks_used', { snapshot: 'snap', origin: 'vol' });
  t.equal(used, u2.usedChunks, `/metrics: cowbd_snapshot_chunks_used{snapshot="snap"} ${used}`);
  t.equal(sample(metrics, 'cowbd_snapshot_chunks_capacity', { snapshot: 'snap' }), u2.capacityChunks, '/metrics: capacity in chunks');
  t.equal(sample(metrics, 'cowbd_snapshot_state', { snapshot: 'snap', state: 'valid' }), 1, '/metrics: state valid');
  t.ok(
    (sample(metrics, 'cowbd_nbd_requests_total', { export: 'snap', command: 'write', result: 'ok' }) ?? 0) > 0,
    '/metrics: the snapshot served writes (journal replay)',
  );

  const removed = await cli(d, 'snapshot', 'remove', 'snap');
  t.equal(removed.code, 0, `snapshot remove: ${removed.stderr.trim() || removed.stdout.trim()}`);
  t.same(await json<Usage[]>(d, 'snapshot', 'list'), [], 'no snapshots left');
  t.equal(sample(await scrape(d), 'cowbd_snapshot_chunks_used', { snapshot: 'snap' }), undefined, '/metrics: the series went away');
  t.same(
    (await readdir(join(d.dataDir, 'cow'))).filter((f) => f.startsWith('vol.') && !f.endsWith('.cbt')),
    [],
    'the exception store file was deleted',
  );

  t.same(
    d.logs.filter((l) => Number(l.level) >= 40).map((l) => l.msg),
    [],
    'the daemon logged no warnings or errors',
  );
  t.comment(
    `snapshot create (CLI, while mounted) ${snapshotMs} ms; snapshot used ${u1!.usedChunks} chunks after boot 1, ` +
      `${u2.usedChunks}/${u2.capacityChunks} after boot 2 (${u2.exceptions} exceptions)`,
  );
  t.comment(
    `boot 1: qemu to init ${r1.initMs} ms, wall ${r1.wallMs} ms, script ${((r1.uptime.scriptDone ?? 0) - (r1.uptime.attached ?? 0)).toFixed(1)} s guest time`,
  );
  t.comment(
    `boot 2: qemu to init ${r2.initMs} ms, wall ${r2.wallMs} ms, script ${((r2.uptime.scriptDone ?? 0) - (r2.uptime.attached ?? 0)).toFixed(1)} s guest time`,
  );
  t.comment(`test duration ${Date.now() - t0} ms`);
});
