import t from 'tap';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readdir, stat, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CLI, startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/raw-client.js';
import * as C from '../../protocol/constants.js';
import { request } from '../helpers/frames.js';
import { makeDataDir } from '../../daemon/volumes.js';

const execFileP = promisify(execFile);

async function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await execFileP(process.execPath, [CLI, ...args]);
    return { code: 0, ...r };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

t.test('volume create makes a sparse file, refuses bad names and taken names', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cli-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const ok = await run(['volume', 'create', 'vol0', '--size', '64M', '--data-dir', dir]);
  t.equal(ok.code, 0, ok.stderr);
  const st = await stat(join(dir, 'vol0.vol'));
  t.equal(st.size, 64 * 1024 * 1024);
  t.ok(st.blocks * 512 < 1024 * 1024, 'sparse');
  const taken = await run(['volume', 'create', 'vol0', '--size', '1M', '--data-dir', dir]);
  t.not(taken.code, 0);
  t.match(taken.stderr, /already used/);
  for (const bad of ['../etc', 'a/b', '.hidden', '']) {
    const r = await run(['volume', 'create', bad, '--size', '1M', '--data-dir', dir]);
    t.not(r.code, 0, `name ${JSON.stringify(bad)} refused`);
  }
  const badSize = await run(['volume', 'create', 'v2', '--size', '12Q', '--data-dir', dir]);
  t.not(badSize.code, 0);
  t.match(badSize.stderr, /invalid size/);
  const list = await run(['volume', 'list', '--json', '--data-dir', dir]);
  t.same(
    JSON.parse(list.stdout).map((v: { name: string }) => v.name),
    ['vol0'],
  );
});

t.test('serve creates a default volume, locks the data dir, serves a unix socket, stops on SIGTERM', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cli-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const sock = join(dir, 'nbd.sock');
  const d = await startDaemon({ dataDir: dir, socket: sock, args: ['--default-size', '16M'] });
  t.teardown(() => d.stop());
  const st = await stat(join(dir, 'default.vol'));
  t.equal(st.size, 16 * 1024 * 1024, 'default volume created');

  const second = await run(['serve', '--data-dir', dir, '--listen', '127.0.0.1:0']);
  t.not(second.code, 0, 'second daemon refused');
  t.match(second.stderr, /in use by another cowbd/);

  const { stdout } = await execFileP('nbdinfo', ['--json', `nbd+unix:///?socket=${sock}`]);
  const info = JSON.parse(stdout);
  t.equal(info.exports[0]['export-size'], 16 * 1024 * 1024, 'unix socket serves the default export');

  // A request in flight when SIGTERM arrives still gets its reply.
  const c = await RawClient.connect(d.port);
  await c.go('');
  c.send(request(C.NBD_CMD_READ, 0, 1 << 20, 7));
  d.proc.kill('SIGTERM');
  const r = await c.simpleReply(1 << 20);
  t.equal(r.error, 0);
  t.equal(r.cookie, 7);
  const code = await d.stop();
  t.equal(code, 0, 'exit 0 after SIGTERM');
  t.ok(d.logs.some((l) => l.msg === 'stopped'));
});

t.test('the daemon runs on a threadpool of 4 unless UV_THREADPOOL_SIZE says otherwise', async (t) => {
  // libuv starts every pool thread at its first use, so the process's thread count
  // shows the size: main thread, V8's workers, the pool. Started through env(1) without tap's
  // NODE_OPTIONS, whose --import hooks load as ES modules and would start the pool first.
  const threads = async (...vars: string[]) => {
    const d = await startDaemon({
      volumes: [{ name: 'v', size: '1M' }],
      launcher: ['env', '-u', 'NODE_OPTIONS', '-u', 'UV_THREADPOOL_SIZE', ...vars],
    });
    try {
      return (await readdir(`/proc/${d.proc.pid}/task`)).length;
    } finally {
      await d.stop();
    }
  };
  const byDefault = await threads();
  const two = await threads('UV_THREADPOOL_SIZE=2');
  const nine = await threads('UV_THREADPOOL_SIZE=9');
  t.ok(byDefault > 4, `4 pool threads and the main thread at least (${byDefault} threads)`);
  t.equal(byDefault - two, 2, `the operator's UV_THREADPOOL_SIZE=2 is kept (${two} threads)`);
  t.equal(nine - byDefault, 5, `the operator's UV_THREADPOOL_SIZE=9 is kept (${nine} threads)`);
});

t.test('read-only serve refuses writes', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'v', size: '1M' }], readOnly: true });
  t.teardown(() => d.stop());
  const c = await RawClient.connect(d.port);
  const { flags } = await c.go('v');
  t.ok(flags & C.NBD_FLAG_READ_ONLY);
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, 0, 4, 1), Buffer.alloc(4)]));
  t.equal((await c.simpleReply()).error, C.NBD_EPERM);
  c.close();
});

t.test('a stale lock from a dead process is taken over', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cli-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  // No fixed metrics port: a cowbd already running on this machine holds 9810.
  const args = [CLI, 'serve', '--data-dir', dir, '--listen', '127.0.0.1:0', '--metrics-listen', 'off', '--default-size', '1M'];
  const p = spawn(process.execPath, args, { stdio: 'pipe' });
  let err = '';
  p.stderr.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((res, rej) => {
    p.stdout.on('data', (d: Buffer) => d.toString().includes('"serving"') && res());
    p.once('exit', (code) => rej(new Error(`the first daemon exited (${code}) before serving: ${err}`)));
  });
  p.kill('SIGKILL');
  await new Promise((r) => p.once('exit', r));
  const d = await startDaemon({ dataDir: dir });
  t.ok(d.port > 0, 'started over a stale pid file');
  t.equal(await d.stop(), 0);
});

t.test('the data directory serve and volume create make is 0700, nested or not', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-cli-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const nested = join(dir, 'a', 'b');
  await makeDataDir(nested);
  t.equal((await stat(nested)).mode & 0o777, 0o700);
  await makeDataDir(nested);
  t.equal((await stat(nested)).mode & 0o777, 0o700, 'an existing one is left as it is');
  const r = await run(['volume', 'create', 'v', '--size', '1M', '--data-dir', join(dir, 'c', 'd')]);
  t.equal(r.code, 0, r.stderr);
  t.equal((await stat(join(dir, 'c', 'd'))).mode & 0o777, 0o700);
});
