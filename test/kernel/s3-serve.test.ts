// A backup in a real Ceph S3 bucket, mounted by the Linux kernel straight from the bucket.
// The guest formats and fills an ext4 volume, unmounts and disconnects it, and asks the
// host (helpers/host-hooks.ts) to back it up into two repositories of one bucket, one plain
// and one encrypted. The host starts a daemon of its own data directory per repository,
// `serve --repo s3://...`; the guest attaches both backups, which fsck clean and mount
// read-only with every file as written.
import t from 'tap';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { GetObjectCommand, ListObjectsV2Command } from '@aws-sdk/client-s3';
import { CLI, startDaemon, type Daemon } from '../helpers/daemon.js';
import { cephAvailable, s3Client, s3Env, startCeph } from '../helpers/ceph.js';
import { startHostHooks } from '../helpers/host-hooks.js';
import { SUMS, parseSums } from '../helpers/snapshot-checks.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

t.setTimeout(600_000);
const BUCKET = 'cowbd-kernel';
const PLAIN = `s3://${BUCKET}/vols`;
const ENC = `s3://${BUCKET}/enc`;
const VOLUME_MIB = 64;
/** Lines of the pattern file: "cowbd pattern NNNNNNNN\n", 23 bytes each, about 4.4 MiB. */
const PATTERN_LINES = 200_000;
const NOTE = 'kept in a bucket, read by the kernel: cowbd-s3-serve-marker';

const execFileP = promisify(execFile);

function patternSha256(): string {
  const h = createHash('sha256');
  for (let i = 0; i < PATTERN_LINES; i++) h.update(`cowbd pattern ${String(i).padStart(8, '0')}\n`);
  return h.digest('hex');
}

const sha256 = (s: string) => createHash('sha256').update(s).digest('hex');

interface Listed {
  id: string;
  volume: string;
}

// Ceph's reason first: under COWBD_REQUIRE_GUEST=1 its absence fails rather than skips.
const skip = cephAvailable() ?? (await guestSkipReason());

t.test('an ext4 backup in a Ceph bucket, served by serve --repo s3:// and mounted', { skip }, async (t) => {
  const t0 = Date.now();
  const s3 = await startCeph();
  const cephMs = Date.now() - t0;
  const env = s3Env(s3);
  const work = await mkdtemp(join(tmpdir(), 'cowbd-kernel-s3-'));
  const keyFile = join(work, 'key');
  await writeFile(keyFile, 'a passphrase for the encrypted repository\n');
  await chmod(keyFile, 0o600);

  const d = await startDaemon({ volumes: [{ name: 'vol', size: `${VOLUME_MIB}M` }], logLevel: 'info' });
  const served: Daemon[] = [];
  const cliLog: string[] = [];
  /** `cowbd ARGS` with the cluster's S3 variables: exit code and output, failing or not. */
  const s3cli = async (...args: string[]) => {
    try {
      const r = await execFileP(process.execPath, [CLI, ...args], { env: { ...process.env, ...env } });
      return { code: 0, ...r };
    } catch (e) {
      const err = e as { code: number; stdout: string; stderr: string };
      return { code: err.code, stdout: err.stdout, stderr: err.stderr };
    }
  };
  const must = async (...args: string[]) => {
    const r = await s3cli(...args);
    cliLog.push(`cowbd ${args.join(' ')}: exit ${r.code} ${r.stderr.trim()}`);
    if (r.code !== 0) throw new Error(`cowbd ${args.join(' ')} exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
    return r.stdout;
  };
  const backups: Record<string, Listed> = {};
  const serveFrom = async (repo: string, extra: string[]) => {
    // startDaemon takes no environment: env(1) as the launcher hands the daemon the S3 variables.
    const launcher = ['env', ...Object.entries(env).map(([k, v]) => `${k}=${v}`)];
    const s = await startDaemon({ readOnly: true, args: ['--repo', repo, ...extra], logLevel: 'info', launcher });
    served.push(s);
    return s;
  };
  const backupTo = async (repo: string, extra: string[]) => {
    await must('backup', 'init', '--repo', repo, ...extra);
    await must('backup', 'create', 'vol', '--repo', repo, '--data-dir', d.dataDir, ...extra);
    const list = JSON.parse(await must('backup', 'list', '--json', '--repo', repo, ...extra)) as Listed[];
    if (list.length !== 1) throw new Error(`backup list of ${repo}: ${JSON.stringify(list)}`);
    backups[repo] = list[0]!;
    return list[0]!;
  };
  // The guest has unmounted and disconnected the volume: back it up twice, serve both.
  const hooks = await startHostHooks({
    sums: () => 'ok',
    backup: async () => {
      const plain = await backupTo(PLAIN, []);
      const enc = await backupTo(ENC, ['--encryption', keyFile]);
      const a = await serveFrom(PLAIN, []);
      const b = await serveFrom(ENC, ['--encryption', keyFile]);
      const name = (l: Listed) => `${l.volume}@${l.id.slice(0, 8)}`;
      return `${a.port} /dev/nbd1 ${name(plain)} 1 30\n${b.port} /dev/nbd2 ${name(enc)} 1 30`;
    },
  });
  t.teardown(async () => {
    killGuests();
    await hooks.close();
    for (const s of served) await s.stop();
    await d.stop();
    await s3.stop();
    await rm(work, { recursive: true, force: true });
  });

  const expected = new Map([
    ['./pattern.txt', patternSha256()],
    ['./note.txt', sha256(`${NOTE}\n`)],
  ]);
  const log = await guestLogPath('s3-serve');
  t.comment(`guest console: ${log}`);
  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol', device: '/dev/nbd0' }],
    log,
    timeoutMs: 240_000,
    script: `
      mkfs.ext4 -q -L s3 /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      awk 'BEGIN { for (i = 0; i < ${PATTERN_LINES}; i++) printf "cowbd pattern %08d\\n", i }' > /mnt/pattern.txt
      echo "${NOTE}" > /mnt/note.txt
      mkdir /mnt/dir
      head -c $((3 << 20)) /dev/urandom > /mnt/dir/random.bin
      (cd /mnt && ${SUMS}) > /root/sums
      wget -q -O /root/reply --post-file=/root/sums ${hooks.url('sums')}
      umount /mnt
      nbd-client -d /dev/nbd0
      # The host backs the volume up to the bucket and serves both backups from there.
      wget -q -O /root/served --post-file=/dev/null ${hooks.url('backup')}
      cat /root/served >> /cowbd/exports
      cut -c 67- /root/sums > /root/files
      mkdir -p /mnt/plain /mnt/enc
      for n in 1 2; do
        cowbd-attach /dev/nbd$n
        test "$(cat /sys/block/nbd$n/ro)" = 1
        test "$(cat /sys/block/nbd$n/size)" = $((${VOLUME_MIB} * 2048))
        echo COWBD-NBD$n-READ-ONLY-FULL-SIZE
        # Before anything mounts it.
        fsck.ext4 -fn /dev/nbd$n
        echo COWBD-NBD$n-FSCK-CLEAN
      done
      mount -t ext4 -o ro /dev/nbd1 /mnt/plain
      mount -t ext4 -o ro /dev/nbd2 /mnt/enc
      for m in plain enc; do
        (cd /mnt/$m && sha256sum -c /root/sums) > /root/$m-check
        sed "s/^/$m: /" /root/$m-check
        (cd /mnt/$m && ${SUMS}) | cut -c 67- | diff /root/files -
        echo "COWBD-$m-SAME-FILES"
        sha256sum /mnt/$m/pattern.txt /mnt/$m/note.txt | sed "s/^/COWBD-HASH /"
      done
      umount /mnt/plain /mnt/enc
      nbd-client -d /dev/nbd1
      nbd-client -d /dev/nbd2
    `,
  });
  t.equal(r.exitCode, 0, 'the guest wrote, had the volume backed up to S3, and read both backups from the bucket', {
    log: tail(r.log, 80),
    cli: cliLog,
  });
  const call = (path: string) => hooks.calls.find((c) => c.path === path && !c.error);
  const sums = parseSums(call('sums')?.body ?? '');
  t.same([...sums.keys()], ['./dir/random.bin', './note.txt', './pattern.txt'], 'the guest reported its three files');
  for (const [file, hash] of expected) t.equal(sums.get(file), hash, `the guest wrote ${file} as the host computes it`);
  const failed = hooks.calls.find((c) => c.error);
  t.notOk(failed, `no host hook failed${failed ? `: ${failed.path}: ${failed.error}` : ''}`);
  if (r.exitCode !== 0 || !backups[PLAIN] || !backups[ENC]) return;

  const text = r.log.replace(/\r/g, '');
  for (const n of [1, 2]) {
    t.match(text, new RegExp(`^COWBD-NBD${n}-READ-ONLY-FULL-SIZE$`, 'm'), `/dev/nbd${n} attached read-only at ${VOLUME_MIB} MiB`);
    t.match(text, new RegExp(`^COWBD-NBD${n}-FSCK-CLEAN$`, 'm'), `fsck.ext4 -fn is clean on /dev/nbd${n}`);
  }
  for (const m of ['plain', 'enc']) {
    const ok = (text.match(new RegExp(`^${m}: \\./\\S+: OK$`, 'gm')) ?? []).length;
    t.equal(ok, sums.size, `${m}: every file reads back with its checksum (${ok} of ${sums.size})`);
    t.match(text, new RegExp(`^COWBD-${m}-SAME-FILES$`, 'm'), `${m}: exactly the files written`);
    for (const [file, hash] of expected) {
      const f = file.slice(2);
      t.match(text, new RegExp(`^COWBD-HASH ${hash}  /mnt/${m}/${f}$`, 'm'), `${m}: ${f} has the host's sha256`);
    }
  }
  t.notMatch(text, /I\/O error|EXT4-fs error/, 'the kernel logged no I/O or ext4 errors');

  const [a, b] = served as [Daemon, Daemon];
  for (const [daemon, repo] of [
    [a, PLAIN],
    [b, ENC],
  ] as const) {
    const l = backups[repo]!;
    const name = `vol@${l.id.slice(0, 8)}`;
    t.equal(l.volume, 'vol', `${repo} holds one backup, of vol`);
    t.ok(
      daemon.logs.some((x) => x.msg === 'serving backup' && x.export === name),
      `serve --repo ${repo} served ${name}`,
    );
    t.same(
      daemon.logs.filter((x) => Number(x.level) >= 40).map((x) => x.msg),
      [],
      `the daemon serving ${repo} logged no warnings or errors`,
    );
  }

  // Encrypted: the note's text is in no object under enc/, while the bucket does hold them.
  const client = s3Client(s3);
  t.teardown(() => client.destroy());
  const keys = async (prefix: string) => {
    const out: string[] = [];
    let token: string | undefined;
    do {
      const page = await client.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: prefix, ContinuationToken: token }));
      out.push(...(page.Contents ?? []).map((o) => o.Key!));
      token = page.NextContinuationToken;
    } while (token);
    return out;
  };
  const plainKeys = await keys('vols/');
  const encKeys = await keys('enc/');
  t.ok(
    plainKeys.length > 0 && encKeys.length > 0,
    `the bucket holds both repositories (${plainKeys.length} and ${encKeys.length} objects)`,
  );
  /** How many of the objects hold the note's marker, and their bytes. */
  const inClear = async (list: string[]) => {
    let clear = 0;
    let bytes = 0;
    for (const key of list) {
      const got = await client.send(new GetObjectCommand({ Bucket: BUCKET, Key: key }));
      const body = Buffer.from(await got.Body!.transformToByteArray());
      bytes += body.length;
      if (body.includes('cowbd-s3-serve-marker')) clear++;
    }
    return { clear, bytes };
  };
  const enc = await inClear(encKeys);
  t.equal(enc.clear, 0, `no object of the encrypted repository holds the note's text (${encKeys.length} objects, ${enc.bytes} bytes)`);
  const plain = await inClear(plainKeys);
  t.comment(`plain repository: ${plain.clear} of ${plainKeys.length} objects hold the note's text (${plain.bytes} bytes)`);
  t.comment(cliLog.join('\n'));
  t.comment(
    `ceph start ${cephMs} ms; boot: qemu to init ${r.initMs} ms, wall ${r.wallMs} ms; ` +
      `backup hook ${call('backup')?.ms} ms; test duration ${Date.now() - t0} ms`,
  );
});
