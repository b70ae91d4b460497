// Reserved snapshot space as users see it: --sparse and --preallocate through the CLI,
// the RESERVED column and why a snapshot is invalid in status, and the metrics.
import t from 'tap';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as C from '../../protocol/constants.js';
import { cowbdResult, startDaemon, type Daemon } from '../helpers/daemon.js';
import { request } from '../helpers/frames.js';
import { RawClient } from '../helpers/raw-client.js';

const execFileP = promisify(execFile);
const MiB = 1 << 20;

interface Row {
  name: string;
  kind: string;
  state: string;
  storeSize: number | null;
  sparse: boolean | null;
  reservedBytes: number | null;
  invalid: { reason: string; usedChunks: number; usedBytes: number } | null;
}

async function cli(dataDir: string, ...args: string[]) {
  return cowbdResult([...args, '--data-dir', dataDir]);
}

async function status(d: Daemon): Promise<Row[]> {
  const r = await cli(d.dataDir, 'status', '--json');
  if (r.code !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout) as Row[];
}

async function metrics(d: Daemon): Promise<string> {
  return (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
}

/** The file under dir (at any depth) with this name. */
async function find(dir: string, name: string): Promise<string | undefined> {
  const all = await readdir(dir, { recursive: true });
  const hit = all.find((f) => f === name || f.endsWith(`/${name}`));
  return hit === undefined ? undefined : join(dir, hit);
}

async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

async function write(c: RawClient, offset: number, data: Buffer): Promise<number> {
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, offset, data.length, 1), data]));
  return (await c.simpleReply()).error;
}

async function flush(c: RawClient): Promise<number> {
  c.send(request(C.NBD_CMD_FLUSH, 0, 0, 2));
  return (await c.simpleReply()).error;
}

t.test('reserved and sparse snapshots in the CLI, status, export descriptions and metrics', async (t) => {
  const d = await startDaemon({
    volumes: [
      { name: 'vol0', size: '32M' },
      { name: 'vol1', size: '16M' },
    ],
  });
  t.teardown(() => d.stop());

  const sparse = await cli(d.dataDir, 'snapshot', 'create', 'sp', '--origin', 'vol0', '--size', '8M', '--sparse');
  t.equal(sparse.code, 0, sparse.stderr);
  t.match(sparse.stdout, /sparse/, 'the output says the snapshot is sparse');
  const reserved = await cli(d.dataDir, 'snapshot', 'create', 'res', '--origin', 'vol0', '--size', '8M');
  t.equal(reserved.code, 0, reserved.stderr);
  t.match(reserved.stdout, /8MiB reserved/, 'the output says what is reserved');

  let rows = await status(d);
  const sp = rows.find((r) => r.name === 'sp')!;
  const res = rows.find((r) => r.name === 'res')!;
  t.same([sp.sparse, sp.reservedBytes, sp.invalid], [true, 0, null], 'a sparse snapshot reserves nothing');
  t.same([res.sparse, res.reservedBytes, res.invalid], [false, 8 * MiB, null], 'a default snapshot reserves its size');
  t.same(
    rows.filter((r) => r.kind === 'origin').map((r) => [r.sparse, r.reservedBytes, r.invalid]),
    [
      [null, null, null],
      [null, null, null],
    ],
    'origins have no reserve',
  );
  const resStore = await find(d.dataDir, 'vol0.64k.cows');
  const spStore = await find(d.dataDir, 'vol0.64k.sparse.cows');
  t.ok(resStore && spStore, 'one store file each');
  t.ok((await allocated(resStore!)) >= 8 * MiB, "the reserved store's blocks are allocated");
  t.ok((await allocated(spStore!)) < 8 * MiB, "the sparse store's are not");

  // A 1 MiB snapshot cannot hold 8 MiB of changed chunks: it is invalidated because it filled up.
  t.equal((await cli(d.dataDir, 'snapshot', 'create', 'small', '--origin', 'vol1', '--size', '1M')).code, 0);
  const c = await RawClient.connect(d.port);
  await c.go('vol1');
  t.equal(await write(c, 0, Buffer.alloc(8 * MiB, 0x5a)), 0, 'the origin write succeeds');
  t.equal(await flush(c), 0);
  c.close();
  rows = await status(d);
  const small = rows.find((r) => r.name === 'small')!;
  t.equal(small.state, 'invalid');
  t.equal(small.invalid?.reason, 'full', 'the reason is recorded');
  t.ok(small.invalid!.usedChunks > 0 && small.invalid!.usedBytes === small.invalid!.usedChunks * 64 * 1024, 'and what it held');

  const table = await cli(d.dataDir, 'status');
  t.equal(table.code, 0, table.stderr);
  const lines = table.stdout.split('\n');
  t.match(lines[0], /RESERVED/);
  const col = lines[0]!.indexOf('RESERVED') + 'RESERVED'.length;
  const cell = (name: string) => {
    const line = lines.find((l) => l.startsWith(`${name} `))!;
    return line.slice(0, col).trimEnd().split(/\s+/).pop();
  };
  t.equal(cell('res'), '8MiB', 'RESERVED shows the reserve');
  t.equal(cell('sp'), 'sparse', 'or sparse');
  t.equal(cell('vol0'), '-', 'or - for an origin');
  t.match(lines.find((l) => l.startsWith('small '))!, /invalid \(full\)$/, 'STATE says why');
  t.match(
    table.stdout,
    /^small: invalid since its exception store filled up; it held \d+ of 16 chunks \([\d.]+%\)$/m,
    'a note says what it held',
  );
  const list = await cli(d.dataDir, 'snapshot', 'list');
  t.match(list.stdout, /RESERVED/);
  t.match(list.stdout, /invalid \(full\)/);
  t.match(list.stdout, /^small: invalid since its exception store filled up/m);

  const { stdout } = await execFileP('nbdinfo', ['--list', '--json', d.uri()]);
  const desc = (name: string) =>
    (JSON.parse(stdout).exports as { 'export-name': string; description: string }[]).find((e) => e['export-name'] === name)!.description;
  t.match(desc('res'), /8MiB reserved/);
  t.match(desc('sp'), /sparse/);
  t.match(desc('small'), /state invalid \(its exception store filled up; it held \d+ of 16 chunks/);

  let m = await metrics(d);
  t.match(m, /cowbd_snapshot_reserved_bytes\{snapshot="res",origin="vol0"\} 8388608\n/);
  t.match(m, /cowbd_snapshot_reserved_bytes\{snapshot="sp",origin="vol0"\} 0\n/);
  t.match(m, /cowbd_snapshot_sparse\{snapshot="sp",origin="vol0"\} 1\n/);
  t.match(m, /cowbd_snapshot_sparse\{snapshot="res",origin="vol0"\} 0\n/);
  t.match(m, /cowbd_snapshot_invalid_reason\{snapshot="small",origin="vol1",reason="full"\} 1\n/);
  t.notMatch(m, /cowbd_snapshot_invalid_reason\{snapshot="res"/, 'no reason for a valid snapshot');
  t.match(m, new RegExp(`cowbd_snapshot_invalidated_used_bytes\\{snapshot="small",origin="vol1"\\} ${small.invalid!.usedBytes}\\n`));
  t.match(m, /cowbd_store_needed_bytes\{origin="vol0",chunk_size="65536",sparse="false",transient="false"\} \d{7,}\n/);
  t.match(m, /cowbd_store_needed_bytes\{origin="vol0",chunk_size="65536",sparse="true",transient="false"\} 0\n/);
  for (const g of ['reserved', 'used', 'file'])
    t.match(m, new RegExp(`cowbd_store_${g}_bytes\\{origin="vol1",chunk_size="65536",sparse="false"`));
  const gauge = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(m)?.[1]);
  t.ok(gauge('cowbd_datadir_fs_size_bytes') > 0);
  t.ok(gauge('cowbd_datadir_fs_free_bytes') > 0 && gauge('cowbd_datadir_fs_free_bytes') < gauge('cowbd_datadir_fs_size_bytes'));
  t.ok(gauge('cowbd_datadir_reserved_bytes') >= 7 * MiB, "the reserved snapshot's room to grow is counted");

  // Series of removed snapshots and stores go away.
  t.equal((await cli(d.dataDir, 'snapshot', 'remove', 'small')).code, 0);
  t.equal((await cli(d.dataDir, 'snapshot', 'remove', 'sp')).code, 0);
  m = await metrics(d);
  t.notMatch(m, /snapshot="small"/);
  t.notMatch(m, /snapshot="sp"/);
  t.notMatch(m, /cowbd_store_\w+\{origin="vol1"/);
  t.notMatch(m, /sparse="true"/);
});

t.test('volume create --preallocate allocates, or fails clearly and leaves nothing', async (t) => {
  const d = await startDaemon();
  t.teardown(() => d.stop());
  const offline = await mkdtemp(join(tmpdir(), 'cowbd-prealloc-'));
  t.teardown(() => rm(offline, { recursive: true, force: true }));
  for (const [how, dir] of [
    ['through the daemon', d.dataDir],
    ['offline', offline],
  ] as const) {
    const ok = await cli(dir, 'volume', 'create', 'full', '--size', '8M', '--preallocate');
    t.equal(ok.code, 0, `${how}: ${ok.stderr}`);
    t.match(ok.stdout, /preallocated/);
    t.ok((await allocated(join(dir, 'full.vol'))) >= 8 * MiB, `${how}: its blocks are allocated`);

    const big = await cli(dir, 'volume', 'create', 'huge', '--size', '1P', '--preallocate');
    t.not(big.code, 0, `${how}: a volume larger than the disk fails`);
    t.match(big.stderr, /^cowbd: volume huge needs 1PiB allocated on disk and the file system has [\d.]+[KMGT]?i?B free/, how);
    t.equal(big.stderr.trim().split('\n').length, 1, `${how}: in one line`);
    t.notOk(await find(dir, 'huge.vol'), `${how}: and leaves no file`);
  }
  t.match((await cli(d.dataDir, 'volume', 'list')).stdout, /^full\s/m, 'the daemon serves the preallocated volume');
  t.notMatch((await cli(d.dataDir, 'volume', 'list')).stdout, /huge/);
});
