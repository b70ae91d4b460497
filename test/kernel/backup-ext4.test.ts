// `cowbd backup` as the real Linux kernel sees it. The guest formats and fills an ext4
// origin and, with the file system mounted, asks the host (over HTTP, see
// helpers/host-hooks.ts) for a backup; then, with the file system frozen, for a second
// one, which is incremental. It then deletes a precious file on the origin. A second
// boot attaches both backups as served read-only by `serve --repo`, and a volume
// restored from the frozen one: every file is back exactly as it was, the restored
// volume fscks clean, and the origin still lacks the deleted file.
import t from 'tap';
import { join } from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { startHostHooks } from '../helpers/host-hooks.js';
import { POPULATE, SUMS, parseSums } from '../helpers/snapshot-checks.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';
import { backup, run, tempDir, type Summary } from '../backup/backup-helpers.js';

/** The sums back in `sha256sum -c` form, for a guest heredoc. */
function sumsFile(sums: Map<string, string>): string {
  return [...sums].map(([f, h]) => `${h}  ${f}`).join('\n');
}

t.test('backups of a live ext4 volume, served and restored', { skip: await guestSkipReason() }, async (t) => {
  const t0 = Date.now();
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  const repo = join(await tempDir('cowbd-kernel-repo-'), 'repo');
  const init = await run(d, 'backup', 'init', '--repo', repo);
  t.equal(init.code, 0, `backup init: ${init.stderr.trim()}`);
  const summaries: Summary[] = [];
  const createMs: number[] = [];
  const create = async () => {
    const started = Date.now();
    const r = await backup(d, 'vol', repo);
    createMs.push(Date.now() - started);
    if (r.code !== 0 || r.summaries.length !== 1) throw new Error(`backup create exited ${r.code}: ${r.stderr}`);
    summaries.push(r.summaries[0]!);
    return r.summaries[0]!.id;
  };
  // The guest posts its checksums and blocks until the backup is stored.
  const hooks = await startHostHooks({ live: create, frozen: create, after: () => 'ok' });
  let served: Awaited<ReturnType<typeof startDaemon>> | undefined;
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    await served?.stop();
    await d.stop();
  });

  // Boot 1: a live file system, backed up mounted and then frozen; then the origin moves on.
  const log1 = await guestLogPath('backup-ext4-1');
  t.comment(`guest console: ${log1}`);
  const r1 = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log: log1,
    timeoutMs: 150_000,
    script: `
      mkfs.ext4 -q -L live /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      ${POPULATE}
      (cd /mnt && ${SUMS}) > /root/live
      sync
      # Still mounted and writable: this backup is of a live file system.
      grep -q '^/dev/nbd0 /mnt ext4 rw' /proc/mounts
      wget -q -O /root/live-id --post-file=/root/live ${hooks.url('live')}
      echo "COWBD-LIVE-ID $(cat /root/live-id)"
      echo "written between the backups" > /mnt/between.txt
      (cd /mnt && ${SUMS}) > /root/frozen
      # The file system lives in this guest, so the guest freezes it around the host's
      # backup; "backup create --freeze" freezes only file systems on the daemon's host.
      fsfreeze --freeze /mnt
      wget -q -O /root/frozen-id --post-file=/root/frozen ${hooks.url('frozen')} || { fsfreeze --unfreeze /mnt; exit 1; }
      fsfreeze --unfreeze /mnt
      echo "COWBD-FROZEN-ID $(cat /root/frozen-id)"
      # The origin moves on: the precious file deleted, others rewritten and added.
      rm /mnt/precious.txt /mnt/dir/photo.bin
      rm /mnt/many/f1*
      dd if=/dev/urandom of=/mnt/random.bin bs=1M count=3 seek=1 conv=notrunc
      echo changed >> /mnt/dir/seq.txt
      head -c $((2 << 20)) /dev/urandom > /mnt/new.bin
      (cd /mnt && ${SUMS}) > /root/after
      sync
      wget -q -O /root/reply --post-file=/root/after ${hooks.url('after')}
      umount /mnt
    `,
  });
  t.equal(r1.exitCode, 0, 'boot 1: formatted, backed up mounted and frozen, changed the origin', { log: tail(r1.log, 60) });
  const call = (path: string) => hooks.calls.find((c) => c.path === path && !c.error);
  const live = parseSums(call('live')?.body ?? '');
  const frozen = parseSums(call('frozen')?.body ?? '');
  const after = parseSums(call('after')?.body ?? '');
  t.equal(live.size, 5 + 64, 'the guest reported every file before the first backup');
  t.equal(frozen.size, live.size + 1, 'and one more before the second');
  t.ok(after.size > 0 && !after.has('./precious.txt') && after.has('./new.bin'), 'the guest reported the origin after its changes');
  t.equal(summaries.length, 2, 'two backups taken');
  if (r1.exitCode !== 0 || summaries.length !== 2 || after.size === 0) return;

  const [s1, s2] = summaries as [Summary, Summary];
  t.match(r1.log, new RegExp(`^COWBD-LIVE-ID ${s1.id}\\r?$`, 'm'), 'the guest got the first backup id');
  t.match(r1.log, new RegExp(`^COWBD-FROZEN-ID ${s2.id}\\r?$`, 'm'), 'the guest got the second backup id');
  t.equal(s1.volume, 'vol', 'the summary names the volume');
  t.equal(s1.mode, 'allocated', 'the first backup of a new volume reads only what was written');
  t.equal(s2.mode, 'incremental', 'the second backup is incremental');
  t.equal(s2.parent, s1.id, 'from the first');
  t.ok(s1.stats.bytesRead >= 9 << 20, `the first backup read the files' data (${s1.stats.bytesRead} bytes)`);
  t.ok(s2.stats.bytesRead * 4 < s1.stats.bytesRead, `the incremental read far less (${s2.stats.bytesRead} vs ${s1.stats.bytesRead} bytes)`);

  // The backups served read-only by a daemon of their own; the frozen one restored by the first.
  served = await startDaemon({ readOnly: true, args: ['--repo', repo], logLevel: 'info' });
  const id8 = (s: Summary) => `vol@${s.id.slice(0, 8)}`;
  t.ok(
    [id8(s1), id8(s2)].every((name) => served!.logs.some((l) => l.msg === 'serving backup' && l.export === name)),
    `serve --repo serves ${id8(s1)} and ${id8(s2)}`,
  );
  const restore = await run(d, 'backup', 'restore', s2.id, '--repo', repo, '--to-volume', 'restored', '--json');
  t.equal(restore.code, 0, `backup restore: ${restore.stderr.trim() || restore.stdout.trim()}`);
  if (restore.code !== 0) return;

  // Boot 2: a fresh kernel attaches the origin, both served backups and the restored volume.
  const log2 = await guestLogPath('backup-ext4-2');
  t.comment(`guest console: ${log2}`);
  const r2 = await runGuest({
    exports: [
      { port: d.port, name: 'vol', device: '/dev/nbd0' },
      { port: served.port, name: id8(s2), device: '/dev/nbd1' },
      { port: served.port, name: id8(s1), device: '/dev/nbd2' },
      { port: d.port, name: 'restored', device: '/dev/nbd3' },
    ],
    log: log2,
    timeoutMs: 150_000,
    script: `
      cat > /root/live <<'EOF'
${sumsFile(live)}
EOF
      cat > /root/frozen <<'EOF'
${sumsFile(frozen)}
EOF
      cat > /root/after <<'EOF'
${sumsFile(after)}
EOF
      for f in live frozen after; do cut -c 67- /root/$f > /root/$f-files; done
      # The served backups are read-only devices; the restored volume is writable.
      test "$(cat /sys/block/nbd1/ro)" = 1
      test "$(cat /sys/block/nbd2/ro)" = 1
      test "$(cat /sys/block/nbd3/ro)" = 0
      for n in 1 2 3; do test "$(cat /sys/block/nbd$n/size)" = $((256 * 2048)); done
      echo COWBD-DEVICES-OK
      mkdir -p /mnt/frozen /mnt/live /mnt/restored /mnt/vol
      # (sh -e ignores a failing "! cmd", hence the ifs.)
      # Freezing flushed the journal, so the frozen backup is a clean file system; the
      # live one is a crash image.
      if dumpe2fs -h /dev/nbd1 2>/dev/null | grep -q needs_recovery; then echo "COWBD-FAIL: frozen backup needs recovery"; exit 1; fi
      echo COWBD-FROZEN-NO-RECOVERY
      if dumpe2fs -h /dev/nbd2 2>/dev/null | grep -q needs_recovery; then echo COWBD-LIVE-NEEDS-RECOVERY; fi
      # Before anything mounts it.
      fsck.ext4 -fn /dev/nbd3
      echo COWBD-RESTORED-FSCK-CLEAN
      fsck.ext4 -fn /dev/nbd1
      echo COWBD-FROZEN-FSCK-CLEAN

      mount -t ext4 -o ro /dev/nbd1 /mnt/frozen
      (cd /mnt/frozen && sha256sum -c /root/frozen) > /root/frozen-check
      cat /root/frozen-check
      (cd /mnt/frozen && ${SUMS}) | cut -c 67- | diff /root/frozen-files -
      echo COWBD-FROZEN-SAME-FILES
      # A read-only device cannot replay a journal: read the crash image as it lies.
      mount -t ext4 -o ro,noload /dev/nbd2 /mnt/live
      (cd /mnt/live && sha256sum -c /root/live) > /root/live-check
      cat /root/live-check
      (cd /mnt/live && ${SUMS}) | cut -c 67- | diff /root/live-files -
      echo COWBD-LIVE-SAME-FILES

      mount -t ext4 /dev/nbd3 /mnt/restored
      (cd /mnt/restored && sha256sum -c /root/frozen) > /root/restored-check
      cat /root/restored-check
      (cd /mnt/restored && ${SUMS}) | cut -c 67- | diff /root/frozen-files -
      echo COWBD-RESTORED-SAME-FILES

      mount -t ext4 /dev/nbd0 /mnt/vol
      test ! -e /mnt/vol/precious.txt
      (cd /mnt/vol && sha256sum -c /root/after) > /root/vol-check
      cat /root/vol-check
      (cd /mnt/vol && ${SUMS}) | cut -c 67- | diff /root/after-files -
      echo COWBD-VOL-SAME-FILES
      umount /mnt/frozen /mnt/live /mnt/restored /mnt/vol
      fsck.ext4 -fn /dev/nbd3
      echo COWBD-RESTORED-FSCK-CLEAN-AGAIN
    `,
  });
  t.equal(r2.exitCode, 0, 'boot 2: backups, restore and origin checked', { log: tail(r2.log, 80) });
  const log = r2.log.replace(/\r/g, '');
  t.match(log, /^COWBD-DEVICES-OK$/m, 'served backups attach read-only, the restored volume writable, all at full size');
  t.match(log, /^COWBD-FROZEN-NO-RECOVERY$/m, 'the frozen backup needs no journal recovery');
  t.match(log, /^COWBD-RESTORED-FSCK-CLEAN$/m, 'fsck.ext4 -fn is clean on the restored volume before it is mounted');
  t.match(log, /^COWBD-FROZEN-FSCK-CLEAN$/m, 'fsck.ext4 -fn is clean on the served frozen backup');
  const okLines = (log.match(/^\.\/\S+: OK$/gm) ?? []).length;
  t.ok(
    okLines >= 2 * frozen.size + live.size + after.size,
    `every checksum matched (${okLines} OK lines for ${frozen.size} + ${live.size} + ${frozen.size} + ${after.size} files)`,
  );
  t.match(log, /^\.\/precious\.txt: OK[\s\S]*^COWBD-FROZEN-SAME-FILES$/m, 'the precious file is in the served frozen backup, unchanged');
  t.match(log, /^COWBD-FROZEN-SAME-FILES[\s\S]*^\.\/precious\.txt: OK[\s\S]*^COWBD-LIVE-SAME-FILES$/m, 'and in the live one');
  t.match(log, /^COWBD-LIVE-SAME-FILES[\s\S]*^\.\/precious\.txt: OK[\s\S]*^COWBD-RESTORED-SAME-FILES$/m, 'and in the restored volume');
  t.match(log, /^COWBD-VOL-SAME-FILES$/m, 'the origin has exactly its later files, without the precious one');
  t.match(log, /^COWBD-RESTORED-FSCK-CLEAN-AGAIN$/m, 'the restored volume is still clean after mounting it');
  t.notMatch(log, /I\/O error|EXT4-fs error/, 'the kernel logged no I/O or ext4 errors');
  if (/^COWBD-LIVE-NEEDS-RECOVERY$/m.test(log)) t.comment('the live backup is a crash image: its journal needs recovery');

  for (const [name, daemon] of [
    ['the daemon', d],
    ['the serving daemon', served],
  ] as const) {
    t.same(
      daemon.logs.filter((l) => Number(l.level) >= 40).map((l) => l.msg),
      [],
      `${name} logged no warnings or errors`,
    );
  }
  t.comment(
    `backup create (CLI) live ${createMs[0]} ms, read ${s1.stats.bytesRead} B, stored ${s1.stats.storedBytes} B; ` +
      `frozen ${createMs[1]} ms, read ${s2.stats.bytesRead} B, stored ${s2.stats.storedBytes} B`,
  );
  t.comment(`boot 1: wall ${r1.wallMs} ms; boot 2: wall ${r2.wallMs} ms; test duration ${Date.now() - t0} ms`);
});
