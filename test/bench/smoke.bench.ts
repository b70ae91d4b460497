// `npm run bench` end to end at toy sizes: every section runs against real fio, nbdkit
// and the built daemon, and the report has every row the targets name. It
// asserts what the report contains, never a figure: at these sizes the figures mean
// nothing. Run by scripts/test.sh after the main suite, alone, so it neither slows
// nor is slowed by the timing-sensitive tests.
import t from 'tap';
import { join } from 'node:path';
import { ROOT } from '../helpers/daemon.js';
import { run } from '../integration/target.js';
import { cephAvailable } from '../helpers/ceph.js';

/** run.sh with the given settings: its own directory is its working directory. */
const bench = (env: Record<string, string>) =>
  run('env', [...Object.entries(env).map(([k, v]) => `${k}=${v}`), 'bash', join(ROOT, 'scripts', 'bench', 'run.sh')], 600_000);

const NUMBER = /^[\d.]+ (MiB\/s|IOPS)$/;
const RATIO = /^\d+\.\d\d$/;

t.test('the whole benchmark runs and reports every target', { timeout: 600_000 }, async (t) => {
  const r = await bench({
    ROUNDS: '1',
    RUNTIME: '1',
    SIZE: '64M',
    CREATE_SIZES: '64M 1T',
    CREATE_N: '2',
    MEM_SIZE: '64M',
    RESTARTS: '1',
    ENGINE_SIZE: '32M',
    BK_SIZE: '64M',
    BK_DATA: '16M',
    BK_HUGE: '8G',
    BK_HUGE_DATA: '16M',
    BK_FIO_SECONDS: '1',
    MERGE_FIO_SECONDS: '1',
  });
  t.equal(r.code, 0, `run.sh exit code (stderr tail: ${r.stderr.slice(-2000)})`);
  const rows = r.stdout.split('\n').filter((l) => l.startsWith('| '));
  const cells = (l: string) =>
    l
      .split('|')
      .slice(1, -1)
      .map((c) => c.trim());
  /** The rows of the table right under the heading that matches: its header and separator left out. */
  const table = (heading: RegExp) => {
    const lines = r.stdout.split('\n');
    const title = lines.findIndex((l) => heading.test(l));
    if (title < 0) return [];
    const first = lines.findIndex((l, i) => i > title && l.startsWith('|'));
    const end = lines.findIndex((l, i) => i > first && !l.startsWith('|'));
    return lines.slice(first + 2, end < 0 ? undefined : end).map(cells);
  };

  // Sections 1-5: 4 base rows, 2 first-write rows, 2 rewrite rows, 2 four-snapshot rows, 4 snapshot-read rows.
  const targets = rows.map(cells).filter((c) => /^[1-5]$/.test(c[0]!));
  const perSection = [1, 2, 3, 4, 5].map((s) => targets.filter((c) => c[0] === String(s)).length);
  t.same(perSection, [4, 2, 2, 2, 4], 'target rows per section');
  for (const c of targets) {
    t.match(c[2], NUMBER, `figure of "${c[1]}"`);
    t.match(c[3], NUMBER, `reference of "${c[1]}"`);
    t.match(c[4], RATIO, `ratio of "${c[1]}"`);
    t.ok(c[7] === 'yes' || c[7] === 'no', `met column of "${c[1]}"`);
  }

  // Four connections against one: every base shape, on cowbd, nbdkit and qemu-nbd, with two ratios.
  const conns = table(/^### 4 connections against 1, side by side/);
  t.same(
    conns.map((c) => c[0]),
    ['seq 1M read qd8', 'seq 1M write qd8', 'rand 4K read qd16', 'rand 4K write qd16'],
    'four-connection rows: one per base shape',
  );
  t.match(
    r.stdout,
    /\| shape \| cowbd 1 conn \| cowbd 4 conn \| nbdkit 1 conn \| nbdkit 4 conn \| qemu-nbd 1 conn \| qemu-nbd 4 conn \| cowbd \/ nbdkit, 4 conn \| cowbd 4 conn \/ 1 conn \|/,
    'four-connection columns',
  );
  for (const c of conns) {
    for (const fig of c.slice(1, 7)) t.match(fig, NUMBER, `four-connection figure of "${c[0]}"`);
    for (const ratio of c.slice(7)) t.match(ratio, RATIO, `four-connection ratio of "${c[0]}"`);
    t.equal(c.length, 9, `four-connection cells of "${c[0]}"`);
  }

  // Creation: each volume, idle and under load, with no other snapshot and with one held.
  const creation = rows.map(cells).filter((c) => /^(64M|1T)$/.test(c[0]!));
  t.equal(creation.length, 8, 'creation rows: 2 volumes x idle/load x none/held');
  for (const c of creation) t.match(c[3], /^\d+(\.\d+)?$/, `creation median, ${c.slice(0, 3).join(' ')}`);

  // Creation with the store reserved beside sparse, and fallocate(2) alone: it mounts an
  // ext4 image of its own, so without root one line says it was skipped.
  t.match(r.stdout, /### Snapshot creation, store reserved vs sparse/, 'reserve table');
  if (process.getuid?.() === 0) {
    const reserve = rows.map(cells).filter((c) => /^(1G|100G)$/.test(c[0]!));
    t.same(
      reserve.map((c) => `${c[0]} ${c[1]}`),
      [
        '1G reserved',
        '1G sparse',
        '1G fallocate(2) alone, no daemon',
        '100G reserved',
        '100G sparse',
        '100G fallocate(2) alone, no daemon',
      ],
      'reserve rows: each store size reserved, sparse and the floor',
    );
    for (const c of reserve) t.match(c[4], /^\d+\.\d$/, `reserve median, ${c[0]} ${c[1]}`);
    for (const c of reserve.filter((c) => c[1] !== 'fallocate(2) alone, no daemon')) {
      t.equal(c[8], '≤ 10', `reserve target, ${c[0]} ${c[1]}`);
      t.ok(c[9] === 'yes' || c[9] === 'no', `reserve met column, ${c[0]} ${c[1]}`);
    }
    // The store really was allocated when reserved, and not when sparse.
    t.same(
      reserve.filter((c) => c[1] === 'reserved' || c[1] === 'sparse').map((c) => c[2]!.replace(/^[\d.]+/, 'N')),
      ['N GiB', 'N KiB', 'N GiB', 'N KiB'],
      'allocated: GiB when reserved, KiB when sparse',
    );
    t.match(reserve.find((c) => c[0] === '100G' && c[1] === 'reserved')?.[2], /^100\.\d\d GiB$/, '100G reserved allocates 100 GiB');
  } else {
    t.match(r.stdout, /Skipped: needs root/, 'reserve skipped without root, saying why');
  }

  const memory = (name: RegExp) => rows.find((l) => name.test(l));
  // At these sizes RSS noise can make the growth negative: the row's form is what is checked.
  const rss = memory(/RSS growth per exception, restarted/);
  t.match(rss, /\| -?[\d.]+ B \| ≤ 16 B \| (yes|no) \|/, `RSS per exception row: ${rss}`);
  t.match(memory(/restart to serving, \d+ exceptions/), /\| \d+ ms; \d+ ms \| ≤ 2000 ms \| (yes|no) \|/, 'restart row');
  t.match(r.stdout, /### First writes made durable/, 'durability table');

  // The engine in process: the first-write figure, two ratios against their targets, the read ratio.
  t.match(r.stdout, /### Engine in process \(32 MiB/, 'engine table');
  const engine = rows.map(cells).filter((c) => /^(first writes|snapshot read \/ origin read)/.test(c[0]!));
  t.same(
    engine.map((c) => c[0]),
    [
      'first writes, no snapshot',
      'first writes, 1 snapshot / no snapshot',
      'first writes, 4 snapshots / 1 snapshot',
      'snapshot read / origin read throughput',
    ],
    'engine rows',
  );
  t.match(engine[0]?.[1], /^\d+ MiB\/s$/, 'first-write figure');
  for (const c of engine.slice(1)) t.match(c[1], RATIO, `ratio of "${c[0]}"`);
  for (const c of engine.slice(1, 3)) t.ok(c[3] === 'yes' || c[3] === 'no', `met column of "${c[0]}"`);
  // Backups against restic: every row of the list.
  t.match(r.stdout, /### Backups: cowbd vs restic/, 'backup table');
  // Its own table only: the S3 table below has rows of the same names.
  const backups = table(/^### Backups: cowbd vs restic/).filter((c) =>
    /^(full backup|repository after|incremental|restore|origin 4K|daemon peak RSS)/.test(c[0]!),
  );
  t.equal(backups.length, 7, `backup rows: ${backups.map((c) => c[0]).join('; ')}`);
  for (const c of backups) t.match(c[1], /^\d+(\.\d+)?$/, `cowbd figure of "${c[0]}"`);
  // Backups to a Ceph S3 gateway against restic's S3 backend: the rows of issue 21's figures.
  t.match(r.stdout, /### Backups to S3 \(Ceph RADOS Gateway\): cowbd vs restic/, 'S3 backup table');
  if (cephAvailable() === undefined) {
    const s3rows = table(/^### Backups to S3 \(Ceph RADOS Gateway\)/);
    t.same(
      s3rows.map((c) => c[0]),
      [
        'full backup, wall s',
        'incremental (1% rewritten), wall s',
        'restore, MiB/s of volume',
        'uploaded by the full backup, MiB',
        'uploaded by the incremental, MiB',
      ],
      'S3 backup rows',
    );
    for (const c of s3rows) {
      t.match(c[1], /^\d+(\.\d+)?$/, `S3 cowbd figure of "${c[0]}"`);
      t.match(c[2], /^\d+(\.\d+)?$/, `S3 restic figure of "${c[0]}"`);
      t.match(c[3], RATIO, `S3 ratio of "${c[0]}"`);
    }
    t.same(
      s3rows.map((c) => c[4]),
      ['<= 1.20', '<= 0.10', '-', '-', '-'],
      'S3 targets: issue 21 sets the full and the incremental',
    );
    // The full backup uploaded at least the data written (16M, random: incompressible).
    t.ok(Number(s3rows[3]?.[1]) >= 16, `cowbd uploaded the full backup's data: ${s3rows[3]?.[1]} MiB`);
  } else {
    const skipped = /### Backups to S3 \(Ceph RADOS Gateway\)[^\n]*\n\nSkipped: .* not installed/;
    t.match(r.stdout, skipped, 'S3 backups skipped without Ceph, saying why');
  }
  // Merging back: throughput against cp, and origin random reads during a merge, each against its goal.
  t.match(r.stdout, /### Merging a snapshot back into its origin/, 'merge table');
  const merge = rows.map(cells).filter((c) => /^(merge throughput|4K random reads of the origin)/.test(c[0]!));
  t.same(
    merge.map((c) => c[0]),
    ['merge throughput, MiB/s, against cp', '4K random reads of the origin, IOPS, during / without a merge'],
    'merge rows',
  );
  for (const c of merge) {
    t.match(c[1], /^\d+$/, `merge figure of "${c[0]}"`);
    t.match(c[2], /^\d+$/, `merge reference of "${c[0]}"`);
    t.match(c[3], RATIO, `merge ratio of "${c[0]}"`);
    t.ok(c[5] === 'yes' || c[5] === 'no', `merge met column of "${c[0]}"`);
  }
  t.same(
    merge.map((c) => c[4]),
    ['≥ 0.5', '≥ 0.7'],
    'merge targets',
  );
  t.match(
    r.stdout,
    /a 64 MiB volume, filled, snapshotted, then every chunk rewritten \(1024 exceptions of 64 KiB\)/,
    'the merged snapshot had every chunk of the 64M volume copied',
  );
  t.notMatch(r.stdout, /\b(nan|NaN|None|undefined)\b/, 'no missing values (Python None, NaN)');
});
