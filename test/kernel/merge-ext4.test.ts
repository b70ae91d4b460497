// Rollback as the real Linux kernel sees it: `cowbd snapshot merge`. The guest fills an
// ext4 origin, has the host take snapshot "early", writes more, has it take snapshot
// "s" (both with the file system frozen), then deletes and rewrites files. It unmounts
// and disconnects, the host starts a rate-limited merge of "s", and the guest
// reconnects and mounts the origin while the merge still copies: every file is as it
// was at "s", the deleted ones are back, fsck is clean; "early" still shows its own
// point in time; and once the host lifts the rate bound it sees the merge finish and
// "s" go away.
import t from 'tap';
import { request } from 'node:http';
import { join } from 'node:path';
import { startDaemon, type Daemon } from '../helpers/daemon.js';
import { startHostHooks } from '../helpers/host-hooks.js';
import {
  POPULATE,
  SUMS,
  attachLater,
  cli,
  cliJson as json,
  parseSums,
  type SnapshotUsage as Usage,
  type StatusRow,
} from '../helpers/snapshot-checks.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

interface Merge {
  totalChunks: number;
  mergedChunks: number;
}
type MergeUsage = Usage & { merge?: Merge | null };

/** GET /v1/snapshots/NAME on the control socket: milliseconds, where the CLI takes a
 *  node start-up, so the state is the one at the moment the guest asked. */
function usageNow(d: Daemon, name: string): Promise<MergeUsage | undefined> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: join(d.dataDir, 'control.sock'), path: `/v1/snapshots/${name}` }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks).toString('utf8');
        if (res.statusCode === 404) resolve(undefined);
        else if (res.statusCode !== 200) reject(new Error(`GET /v1/snapshots/${name}: ${res.statusCode} ${body}`));
        else resolve(JSON.parse(body) as MergeUsage);
      });
    });
    req.on('error', reject);
    req.end();
  });
}

t.test('merging a snapshot of an ext4 volume back into its origin', { skip: await guestSkipReason() }, async (t) => {
  const t0 = Date.now();
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '256M' }], logLevel: 'info' });
  const snapshot = async (name: string) => {
    const r = await cli(d, 'snapshot', 'create', name, '--origin', 'vol', '--size', '64M', '--chunk-size', '64K');
    if (r.code !== 0) throw new Error(`snapshot create ${name} exited ${r.code}: ${r.stderr}`);
    return 'ok';
  };
  let merged: Usage | undefined;
  let mergeCli = '';
  const seen: { atMerge?: string; atMount?: string; mountUsage?: MergeUsage; statusRow?: string } = {};
  const hooks = await startHostHooks({
    early: () => snapshot('early'),
    s: () => snapshot('s'),
    after: () => 'ok',
    // The guest has unmounted and disconnected; it blocks here until the merge runs.
    merge: async () => {
      merged = (await json<Usage[]>(d, 'snapshot', 'list')).find((u) => u.name === 's');
      const r = await cli(d, 'snapshot', 'merge', 's', '--rate', '1M');
      mergeCli = `${r.stdout}${r.stderr}`.trim();
      if (r.code !== 0) throw new Error(`snapshot merge exited ${r.code}: ${mergeCli}`);
      // The daemon may not have seen the guest's disconnect yet, and then defers the
      // merge: the guest reconnects only once it really runs.
      for (let i = 0; i < 100; i++) {
        seen.atMerge = (await usageNow(d, 's'))?.state;
        if (seen.atMerge?.startsWith('merging')) return seen.atMerge;
        await new Promise((r) => setTimeout(r, 100));
      }
      throw new Error(`the merge did not start: state ${seen.atMerge}`);
    },
    // The guest has mounted the merged origin: is the merge still copying?
    mounted: async () => {
      seen.mountUsage = await usageNow(d, 's');
      seen.atMount = seen.mountUsage?.state;
      const row = (await json<StatusRow[]>(d, 'status')).find((r) => r.name === 's');
      seen.statusRow = row ? `${row.state} ${JSON.stringify((row as { merge?: unknown }).merge ?? null)}` : 'gone';
      return seen.atMount ?? 'gone';
    },
  });
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    await d.stop();
  });

  const log1 = await guestLogPath('merge-ext4');
  t.comment(`guest console: ${log1}`);
  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log: log1,
    timeoutMs: 150_000,
    script: `
      mkfs.ext4 -q -L live /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      ${POPULATE}
      (cd /mnt && ${SUMS}) > /root/early
      # Frozen around each snapshot, so each is a clean file system.
      fsfreeze --freeze /mnt
      wget -q -O /root/reply --post-file=/root/early ${hooks.url('early')} || { fsfreeze --unfreeze /mnt; exit 1; }
      fsfreeze --unfreeze /mnt
      # Written after "early", before "s".
      head -c $((3 << 20)) /dev/urandom > /mnt/between.bin
      echo "second version" > /mnt/precious.txt
      for i in $(seq 1 16); do echo "later $i" > /mnt/many/g$i; done
      (cd /mnt && ${SUMS}) > /root/s
      fsfreeze --freeze /mnt
      wget -q -O /root/reply --post-file=/root/s ${hooks.url('s')} || { fsfreeze --unfreeze /mnt; exit 1; }
      fsfreeze --unfreeze /mnt
      # The change that goes wrong: files deleted, rewritten in place, appended, created.
      rm /mnt/precious.txt /mnt/dir/photo.bin /mnt/between.bin
      rm /mnt/many/f1* /mnt/many/g1*
      # About 22 MiB of chunks to copy back, more than one batch of the merge (16 MiB):
      # at 1 MiB/s the rest waits long enough to be read by the guest from "s".
      dd if=/dev/urandom of=/mnt/random.bin bs=1M count=6 conv=notrunc
      dd if=/dev/urandom of=/mnt/keep.bin bs=1M count=1 conv=notrunc
      echo changed >> /mnt/dir/seq.txt
      head -c $((14 << 20)) /dev/urandom > /mnt/new.bin
      (cd /mnt && ${SUMS}) > /root/after
      wget -q -O /root/reply --post-file=/root/after ${hooks.url('after')}
      umount /mnt
      nbd-client -d /dev/nbd0
      # Roll back: the host merges "s" into the origin; reconnect while it copies.
      wget -q -O /root/reply --post-file=/dev/null ${hooks.url('merge')}
      echo "COWBD-MERGE-STATE $(cat /root/reply)"
      cowbd-attach /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      wget -q -O /root/reply --post-file=/dev/null ${hooks.url('mounted')}
      echo "COWBD-MOUNTED-STATE $(cat /root/reply)"
      cut -c 67- /root/s > /root/s-files
      (cd /mnt && sha256sum -c /root/s) > /root/s-check
      cat /root/s-check
      (cd /mnt && ${SUMS}) | cut -c 67- | diff /root/s-files -
      echo COWBD-ORIGIN-IS-S
      umount /mnt
      fsck.ext4 -fn /dev/nbd0
      echo COWBD-ORIGIN-FSCK-CLEAN
      # The snapshot taken before all this keeps its own point in time.
      ${attachLater(d.port, 'early', '/dev/nbd1')}
      mkdir -p /mnt/early
      mount -t ext4 -o ro /dev/nbd1 /mnt/early
      cut -c 67- /root/early > /root/early-files
      (cd /mnt/early && sha256sum -c /root/early) > /root/early-check
      cat /root/early-check
      (cd /mnt/early && ${SUMS}) | cut -c 67- | diff /root/early-files -
      echo COWBD-EARLY-SAME-FILES
      umount /mnt/early
      fsck.ext4 -fn /dev/nbd1
      echo COWBD-EARLY-FSCK-CLEAN
      nbd-client -d /dev/nbd1
    `,
  });
  t.equal(r.exitCode, 0, 'the guest rolled back, checked the origin and the early snapshot', { log: tail(r.log, 80) });
  const call = (path: string) => hooks.calls.find((c) => c.path === path && !c.error);
  const early = parseSums(call('early')?.body ?? '');
  const s = parseSums(call('s')?.body ?? '');
  const after = parseSums(call('after')?.body ?? '');
  t.equal(early.size, 5 + 64, 'the guest reported every file at "early"');
  t.equal(s.size, early.size + 1 + 16, 'and at "s"');
  t.ok(after.size > 0 && !after.has('./precious.txt') && after.has('./new.bin'), 'the guest reported the origin after its changes');
  t.not(s.get('./precious.txt'), early.get('./precious.txt'), 'precious.txt differs between "early" and "s"');
  t.not(after.get('./random.bin'), s.get('./random.bin'), 'random.bin was rewritten after "s"');
  if (r.exitCode !== 0 || s.size === 0) {
    t.comment(`merge CLI: ${mergeCli}`);
    return;
  }

  const log = r.log.replace(/\r/g, '');
  t.ok((merged?.exceptions ?? 0) > 0, `"s" held the changed chunks when the merge began (${merged?.exceptions} exceptions)`);
  t.match(seen.atMerge, /^merging/, `status right after "snapshot merge": ${seen.atMerge}`);
  t.match(seen.atMount, /^merging/, `state when the guest had mounted the origin again: ${seen.atMount}`);
  t.match(seen.statusRow, /^merging/, `cowbd status --json then: ${seen.statusRow}`);
  const m = seen.mountUsage?.merge;
  t.ok(
    m && m.mergedChunks < m.totalChunks,
    `chunks of "s" were still to copy back when the guest read the origin (${m?.mergedChunks} of ${m?.totalChunks} copied)`,
  );
  const okLines = (text: string) => (text.match(/^\.\/\S+: OK$/gm) ?? []).length;
  // Split at the marker's output line, not at sh -x's trace of the echo.
  const cut = /^COWBD-ORIGIN-FSCK-CLEAN$/m.exec(log)?.index ?? log.length;
  const [originPart, earlyPart] = [log.slice(0, cut), log.slice(cut)];
  t.equal(okLines(originPart ?? ''), s.size, `every file of "s" is back with its checksum (${s.size})`);
  t.match(originPart, /^\.\/precious\.txt: OK$/m, 'the deleted precious.txt is back, in its "s" version');
  t.match(originPart, /^\.\/dir\/photo\.bin: OK$/m, 'the deleted photo.bin is back');
  t.match(originPart, /^\.\/between\.bin: OK$/m, 'the deleted between.bin is back');
  t.match(log, /^COWBD-ORIGIN-IS-S$/m, 'the origin holds exactly the files of "s" (new.bin is gone)');
  t.match(log, /^COWBD-ORIGIN-FSCK-CLEAN$/m, 'fsck.ext4 -fn is clean on the merged origin');
  t.equal(okLines(earlyPart ?? ''), early.size, `"early" still has every file of its own time with its checksum (${early.size})`);
  t.match(earlyPart, /^\.\/precious\.txt: OK$/m, '"early" still has the first precious.txt');
  t.match(log, /^COWBD-EARLY-SAME-FILES$/m, '"early" has exactly its own files (no between.bin, no g*)');
  t.match(log, /^COWBD-EARLY-FSCK-CLEAN$/m, 'fsck.ext4 -fn is clean on "early"');
  t.notMatch(log, /I\/O error|EXT4-fs error/, 'the kernel logged no I/O or ext4 errors');

  // Lifting the bound of the running merge lets it finish at once; "s" goes away by
  // itself, and "early" stays valid.
  const unbound = await cli(d, 'snapshot', 'merge', 's', '--rate', '0');
  t.equal(unbound.code, 0, `snapshot merge s --rate 0 on the running merge: ${(unbound.stdout + unbound.stderr).trim()}`);
  const waitStart = Date.now();
  let left: MergeUsage[] = [];
  while (Date.now() - waitStart < 120_000) {
    left = await json<MergeUsage[]>(d, 'snapshot', 'list');
    if (!left.some((u) => u.name === 's')) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  t.same(
    left.map((u) => u.name),
    ['early'],
    `the merge finished and "s" is gone (${Date.now() - waitStart} ms after the bound was lifted)`,
  );
  t.equal(left.find((u) => u.name === 'early')?.state, 'valid', '"early" is still valid');
  const done = d.logs.find((l) => l.msg === 'merge done');
  t.ok(done, `the daemon logged "merge done" (${JSON.stringify(done ?? {})})`);
  t.same(
    d.logs.filter((l) => Number(l.level) >= 40).map((l) => l.msg),
    [],
    'the daemon logged no warnings or errors',
  );
  t.comment(`merge CLI: ${mergeCli}`);
  t.comment(`boot: qemu to init ${r.initMs} ms, wall ${r.wallMs} ms; test duration ${Date.now() - t0} ms`);
});
