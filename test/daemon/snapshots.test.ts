// The daemon as a product: volumes and snapshots created, served, invalidated,
// extended and removed live, through the CLI and NBD, with metrics and restarts.
import t from 'tap';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as C from '../../protocol/constants.js';
import { cowbdResult, startDaemon, waitForLog, type Daemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/raw-client.js';
import { request } from '../helpers/frames.js';

const execFileP = promisify(execFile);

async function cli(d: Daemon, ...args: string[]) {
  return cowbdResult([...args, '--data-dir', d.dataDir]);
}

async function json<T>(d: Daemon, ...args: string[]): Promise<T> {
  const r = await cli(d, ...args, '--json');
  if (r.code !== 0) throw new Error(`cowbd ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

async function write(c: RawClient, offset: number, data: Buffer, cookie = 1): Promise<number> {
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, offset, data.length, cookie), data]));
  return (await c.simpleReply()).error;
}

async function read(c: RawClient, offset: number, length: number, cookie = 2): Promise<{ error: number; data?: Buffer }> {
  c.send(request(C.NBD_CMD_READ, offset, length, cookie));
  return c.simpleReply(length);
}

async function metrics(d: Daemon): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`);
  return res.text();
}

async function listExports(d: Daemon): Promise<{ name: string; description: string }[]> {
  const { stdout } = await execFileP('nbdinfo', ['--list', '--json', d.uri()]);
  return (JSON.parse(stdout).exports as { 'export-name': string; description: string }[]).map((e) => ({
    name: e['export-name'],
    description: e.description,
  }));
}

const MiB = 1 << 20;

t.test('snapshots appear, freeze their point in time, and go away live', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '32M' }] });
  t.teardown(() => d.stop());
  const origin = await RawClient.connect(d.port);
  await origin.go('vol0');
  t.equal(await write(origin, 0, Buffer.alloc(MiB, 0xaa)), 0);

  const created = await cli(d, 'snapshot', 'create', 'snap1', '--origin', 'vol0', '--size', '8M');
  t.equal(created.code, 0, created.stderr);
  // The same connection keeps writing: the snapshot must not see it.
  t.equal(await write(origin, 0, Buffer.alloc(MiB, 0xbb)), 0);

  const exports = await listExports(d);
  t.same(exports.map((e) => e.name).sort(), ['snap1', 'vol0']);
  t.match(exports.find((e) => e.name === 'snap1')!.description, /snapshot of vol0 taken at .*state valid/);
  t.match(exports.find((e) => e.name === 'vol0')!.description, /origin volume vol0/);

  const snap = await RawClient.connect(d.port);
  await snap.go('snap1');
  const r = await read(snap, 0, MiB);
  t.equal(r.error, 0);
  t.ok(r.data!.equals(Buffer.alloc(MiB, 0xaa)), 'snapshot holds the data from before its creation');
  const o = await read(origin, 0, MiB);
  t.ok(o.data!.equals(Buffer.alloc(MiB, 0xbb)), 'origin holds the new data');

  // Snapshots are writable and their writes stay theirs.
  t.equal(await write(snap, 4096, Buffer.alloc(4096, 0xcc)), 0);
  const o2 = await read(origin, 4096, 4096);
  t.ok(o2.data!.equals(Buffer.alloc(4096, 0xbb)), 'snapshot write does not reach the origin');

  const status = await json<{ name: string; kind: string; state: string; usedPercent: number | null }[]>(d, 'status');
  t.same(
    status.map((s) => [s.name, s.kind, s.state]),
    [
      ['vol0', 'origin', 'active'],
      ['snap1', 'snapshot', 'valid'],
    ],
  );
  t.ok(status[1]!.usedPercent! > 0);

  const m = await metrics(d);
  t.match(m, /cowbd_snapshot_used_ratio\{snapshot="snap1",origin="vol0"\} 0\.\d+/);
  t.match(m, /cowbd_snapshot_state\{snapshot="snap1",origin="vol0",state="valid"\} 1/);
  t.match(m, /cowbd_cow_copies_total [1-9]/);
  t.match(m, /cowbd_nbd_requests_total\{export="vol0",command="write",result="ok"\} [1-9]/);
  t.match(m, /cowbd_nbd_bytes_total\{export="snap1",direction="read"\} [1-9]/);
  t.match(m, /cowbd_nbd_connections 2/);
  t.match(m, /cowbd_nbd_request_duration_seconds_bucket/);
  t.match(m, /cowbd_process_cpu_seconds_total/);

  // Removing the snapshot closes its connection cleanly; the origin's goes on.
  const removed = await cli(d, 'snapshot', 'remove', 'snap1');
  t.equal(removed.code, 0, removed.stderr);
  await snap.closed;
  t.ok(snap.ended, 'snapshot client disconnected');
  t.equal((await read(origin, 0, 4096)).error, 0, 'origin client unaffected');
  t.same(
    (await listExports(d)).map((e) => e.name),
    ['vol0'],
  );
  origin.close();
});

t.test('a full store invalidates the snapshot, never the origin, and stays invalid after restart', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-inv-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  let d = await startDaemon({ dataDir, volumes: [{ name: 'vol0', size: '16M' }] });
  const c = await RawClient.connect(d.port);
  await c.go('vol0');
  t.equal(await write(c, 0, Buffer.alloc(4 * MiB, 0x11)), 0);
  t.equal((await cli(d, 'snapshot', 'create', 'small', '--origin', 'vol0', '--size', '512K')).code, 0);
  // 4 MiB of changed chunks cannot fit in 512 KiB: the origin write proceeds anyway.
  t.equal(await write(c, 0, Buffer.alloc(4 * MiB, 0x22)), 0, 'origin write succeeds');
  t.ok((await read(c, 0, MiB)).data!.equals(Buffer.alloc(MiB, 0x22)));
  const s = await RawClient.connect(d.port);
  await s.go('small');
  t.equal((await read(s, 0, 4096)).error, C.NBD_EIO, 'invalid snapshot reads fail with EIO');
  t.equal(await write(s, 0, Buffer.alloc(4096)), C.NBD_EIO, 'and its writes');
  const exp = (await listExports(d)).find((e) => e.name === 'small')!;
  t.match(exp.description, /state invalid/);
  t.match(await metrics(d), /cowbd_snapshot_state\{snapshot="small",origin="vol0",state="invalid"\} 1/);
  t.ok(await waitForLog(d, (l) => l.msg === 'snapshot small invalidated' && l.snapshot === 'small'), 'invalidation is a log event');
  s.close();
  c.close();
  t.equal(await d.stop(), 0);

  d = await startDaemon({ dataDir });
  t.teardown(() => d.stop());
  const list = await json<{ name: string; state: string }[]>(d, 'snapshot', 'list');
  t.same(
    list.map((x) => [x.name, x.state]),
    [['small', 'invalid']],
    'still invalid after restart',
  );
  const c2 = await RawClient.connect(d.port);
  await c2.go('vol0');
  t.ok((await read(c2, 0, MiB)).data!.equals(Buffer.alloc(MiB, 0x22)), 'origin data survived the restart');
  c2.close();
});

t.test('overflow policy: the snapshot refuses its own writes with ENOSPC but keeps serving reads', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '16M' }] });
  t.teardown(() => d.stop());
  t.equal((await cli(d, 'snapshot', 'create', 'ov', '--origin', 'vol0', '--size', '512K', '--policy', 'overflow')).code, 0);
  const s = await RawClient.connect(d.port);
  await s.go('ov');
  let err = 0;
  for (let i = 0; i < 16 && err === 0; i++) err = await write(s, i * 65536, Buffer.alloc(65536, 0x33), i + 1);
  t.equal(err, C.NBD_ENOSPC, 'own writes refused once full');
  t.equal((await read(s, 0, 65536)).error, 0, 'reads still served');
  const extended = await json<{ capacityBytes: number; state: string }>(d, 'snapshot', 'extend', 'ov', '--size', '+1M');
  t.equal(extended.capacityBytes, 1536 * 1024);
  t.equal(await write(s, 15 * 65536, Buffer.alloc(65536, 0x44), 99), 0, 'writable again after extend');
  s.close();
});

t.test('auto-extend grows a filling snapshot and logs it', async (t) => {
  const d = await startDaemon({
    volumes: [{ name: 'vol0', size: '16M' }],
    args: ['--autoextend-threshold', '50', '--autoextend-percent', '100'],
  });
  t.teardown(() => d.stop());
  const c = await RawClient.connect(d.port);
  await c.go('vol0');
  // Chunks that are still zero cost no store space, so give the origin data worth copying first.
  t.equal(await write(c, 0, Buffer.alloc(640 * 1024, 0x11)), 0);
  t.equal((await cli(d, 'snapshot', 'create', 'auto', '--origin', 'vol0', '--size', '1M')).code, 0);
  t.equal(await write(c, 0, Buffer.alloc(640 * 1024, 0x55)), 0);
  let cap = 0;
  for (let i = 0; i < 50 && cap <= MiB; i++) {
    cap = (await json<{ capacityBytes: number }>(d, 'snapshot', 'list').then((l) => (l as unknown as { capacityBytes: number }[])[0]!))
      .capacityBytes;
    if (cap <= MiB) await new Promise((r) => setTimeout(r, 100));
  }
  t.ok(cap >= 2 * MiB, `capacity grew to ${cap}`);
  t.ok(await waitForLog(d, (l) => typeof l.msg === 'string' && l.msg.endsWith('auto-extended')), 'auto-extend logged');
  t.ok(await waitForLog(d, (l) => typeof l.msg === 'string' && /is now \d+\.\d\d% full/.test(l.msg)), 'usage warning logged');
  c.close();
});

t.test('CLI errors say what is wrong and exit non-zero', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '16M' }] });
  t.teardown(() => d.stop());
  const cases: [string[], RegExp][] = [
    [['snapshot', 'create', 's', '--origin', 'nope', '--size', '1M'], /no volume named "nope"/],
    [['snapshot', 'create', 'vol0', '--origin', 'vol0', '--size', '1M'], /already used/],
    [['snapshot', 'create', 's', '--origin', 'vol0', '--size', '64K'], /at least/],
    [['snapshot', 'create', 's', '--origin', 'vol0', '--size', '1M', '--chunk-size', '3K'], /chunk size/],
    [['snapshot', 'remove', 'nope'], /no snapshot named "nope"/],
    [['snapshot', 'extend', 'nope', '--size', '+1M'], /no snapshot named "nope"/],
    [['volume', 'create', 'vol0', '--size', '1M'], /already used/],
    [['volume', 'remove', 'nope'], /no volume named "nope"/],
  ];
  for (const [args, re] of cases) {
    const r = await cli(d, ...args);
    t.not(r.code, 0, args.join(' '));
    t.match(r.stderr, re, args.join(' '));
  }
  t.equal((await cli(d, 'snapshot', 'create', 's1', '--origin', 'vol0', '--size', '1M')).code, 0);
  const busy = await cli(d, 'volume', 'remove', 'vol0');
  t.not(busy.code, 0);
  t.match(busy.stderr, /busy.*s1/);
  // Volumes come and go live too.
  t.equal((await cli(d, 'volume', 'create', 'vol1', '--size', '4M')).code, 0);
  const c = await RawClient.connect(d.port);
  const { size } = await c.go('vol1');
  t.equal(size, 4 * MiB, 'new volume served at once');
  c.close();
  t.equal((await cli(d, 'volume', 'remove', 'vol1')).code, 0);
  const vols = await json<{ name: string }[]>(d, 'volume', 'list');
  t.same(
    vols.map((v) => v.name),
    ['vol0'],
  );
  const help = await cowbdResult(['snapshot', 'create', '--help']);
  t.equal(help.code, 0);
  t.match(help.stdout, /--chunk-size/);
  const offline = await cowbdResult(['snapshot', 'list', '--data-dir', join(tmpdir(), `cowbd-none-${process.pid}`)]);
  t.not(offline.code, 0);
  t.match(offline.stderr, /no cowbd daemon is running/);
});

t.test('config file: YAML options, flags win', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-conf-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  const cfg = join(dataDir, 'cowbd.yaml');
  await writeFile(cfg, 'default-volume: fromconfig\ndefault-size: 2M\nlog-level: warn\n');
  const d = await startDaemon({ dataDir, args: ['--config', cfg, '--log-level', 'debug'] });
  t.teardown(() => d.stop());
  const c = await RawClient.connect(d.port);
  t.equal((await c.go('fromconfig')).size, 2 * MiB, 'config file options applied');
  c.close();
  t.ok(
    d.logs.some((l) => l.level === 20),
    'the --log-level flag beat the config file',
  );
});
