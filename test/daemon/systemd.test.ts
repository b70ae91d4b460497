// Running under systemd: the daemon says when it serves (Type=notify), the example unit
// passes systemd's checks with a low exposure score, and the daemon needs no root.
import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Logger } from 'pino';
import { notifySystemd } from '../../daemon/systemd.js';
import { CLI, ROOT, startDaemon } from '../helpers/daemon.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const UNIT = join(ROOT, 'docs', 'examples', 'cowbd.service');
/** The most exposure `systemd-analyze security` may give the example unit; its OK band ends higher. */
const MAX_EXPOSURE = 2.0;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const found = (cmd: string) => ['/usr/bin', '/bin', '/usr/sbin', '/sbin'].some((d) => existsSync(join(d, cmd)));

/** A systemd-notify that records its parent's pid, whether NBD answered on FAKE_SOCK then, and its arguments. */
const FAKE_NOTIFY = `#!/bin/sh
served=no
nbdinfo --size "nbd+unix:///?socket=$FAKE_SOCK" >/dev/null 2>&1 && served=yes
printf '%s %s %s\\n' "$PPID" "$served" "$*" >> "$FAKE_RECORD"
exit \${FAKE_EXIT:-0}
`;

async function fakeNotify(t: Test): Promise<{ dir: string; record: string; lines(): Promise<string[]> }> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-notify-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'systemd-notify'), FAKE_NOTIFY, { mode: 0o755 });
  const record = join(dir, 'record');
  return {
    dir,
    record,
    lines: async () => (existsSync(record) ? (await readFile(record, 'utf8')).split('\n').filter(Boolean) : []),
  };
}

async function waitFor<T>(f: () => Promise<T>, ok: (v: T) => boolean, timeoutMs = 5000): Promise<T> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; await sleep(20)) {
    const v = await f();
    if (ok(v)) return v;
  }
  return f();
}

/** A logger that keeps its warnings and drops debug lines. */
function warnings(): { log: Logger; seen: Record<string, unknown>[] } {
  const seen: Record<string, unknown>[] = [];
  const log = { debug: () => undefined, warn: (o: Record<string, unknown>, msg: string) => seen.push({ ...o, msg }) } as unknown as Logger;
  return { log, seen };
}

t.test('notifySystemd runs systemd-notify only under NOTIFY_SOCKET, and a failure is a warning', async (t) => {
  const fake = await fakeNotify(t);
  const env = { PATH: `${fake.dir}:${process.env.PATH}`, FAKE_RECORD: fake.record, FAKE_SOCK: '/nonexistent' };
  const quiet = warnings();
  await notifySystemd('ready', quiet.log, env);
  t.same(await fake.lines(), [], 'not run without NOTIFY_SOCKET');

  await notifySystemd('stopping', quiet.log, { ...env, NOTIFY_SOCKET: '/run/fake' });
  t.same(
    (await fake.lines()).map((l) => l.split(' ').slice(2).join(' ')),
    ['STOPPING=1'],
  );
  t.same(quiet.seen, [], 'no warning when it succeeds');

  const failing = warnings();
  await notifySystemd('ready', failing.log, { ...env, NOTIFY_SOCKET: '/run/fake', FAKE_EXIT: '1' });
  t.match(failing.seen, [{ msg: 'could not notify systemd', code: 1 }]);

  const missing = warnings();
  await notifySystemd('ready', missing.log, { PATH: '/nonexistent', NOTIFY_SOCKET: '/run/fake' });
  t.match(missing.seen, [{ msg: 'could not notify systemd', err: { code: 'ENOENT' } }]);
});

t.test('the daemon notifies systemd once it serves, and when it stops', { skip: found('nbdinfo') ? false : 'needs nbdinfo' }, async (t) => {
  const fake = await fakeNotify(t);
  const sock = join(fake.dir, 'nbd.sock');
  const d = await startDaemon({
    volumes: [{ name: 'vol', size: '4M' }],
    socket: sock,
    logLevel: 'debug',
    // env(1) execs the daemon, so the fake's parent is the daemon itself.
    launcher: [
      'env',
      `PATH=${fake.dir}:${process.env.PATH}`,
      'NOTIFY_SOCKET=/run/fake-notify',
      `FAKE_RECORD=${fake.record}`,
      `FAKE_SOCK=${sock}`,
    ],
  });
  t.teardown(() => d.stop());
  const pid = d.proc.pid!;
  const ready = await waitFor(fake.lines, (l) => l.length > 0);
  await sleep(200); // a second notification would show by now
  t.same(await fake.lines(), [`${pid} yes --ready --pid=${pid}`], 'once, from the daemon, with NBD served already');
  t.same(ready.length, 1);
  // The daemon's own log gives the order, which a fast listener could hide from nbdinfo.
  const at = (msg: string) => d.logs.findIndex((l) => l.msg === msg);
  const notified = at('notifying systemd');
  t.ok(notified > at('serving') && at('serving') > at('metrics listening'), 'notified after every listener is up');
  t.ok(at('listening') >= 0 && at('metrics listening') > at('listening'));

  t.equal(await d.stop(), 0);
  const after = await waitFor(fake.lines, (l) => l.length > 1);
  t.same(
    after.map((l) => l.split(' ').slice(2).join(' ')),
    [`--ready --pid=${pid}`, 'STOPPING=1'],
  );
});

t.test('without NOTIFY_SOCKET the daemon runs no systemd-notify', async (t) => {
  const fake = await fakeNotify(t);
  const d = await startDaemon({
    logLevel: 'info',
    launcher: ['env', '-u', 'NOTIFY_SOCKET', `PATH=${fake.dir}:${process.env.PATH}`, `FAKE_RECORD=${fake.record}`],
  });
  await sleep(300);
  t.equal(await d.stop(), 0);
  await sleep(300);
  t.same(await fake.lines(), []);
});

t.test('the example unit passes systemd-analyze', { skip: found('systemd-analyze') ? false : 'needs systemd-analyze' }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-unit-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const text = await readFile(UNIT, 'utf8');
  t.match(text, /^ExecStart=\/usr\/bin\/node \/opt\/cowbd\/dist\/daemon\/cli\.cjs serve /m);
  // verify checks that ExecStart's program exists: point it at this checkout's build.
  const unit = join(dir, 'cowbd.service');
  await writeFile(unit, text.replace('/usr/bin/node', process.execPath).replaceAll('/opt/cowbd', ROOT));

  const verify = await execFileP('systemd-analyze', ['verify', unit]).catch((e: { code: number; stderr: string }) => e);
  t.equal('code' in verify ? verify.code : 0, 0, verify.stderr);
  t.notMatch(verify.stderr, /cowbd/, 'nothing said about our unit');

  const security = await execFileP('systemd-analyze', ['security', '--offline=true', unit]);
  const m = /Overall exposure level for cowbd\.service: ([\d.]+) (\w+)/.exec(security.stdout);
  t.ok(m, 'an overall exposure level');
  const score = Number(m?.[1]);
  t.comment(`systemd-analyze security: exposure ${score} ${m?.[2]}`);
  t.ok(score <= MAX_EXPOSURE, `exposure ${score} <= ${MAX_EXPOSURE}`);
  for (const line of ['User=/DynamicUser=', 'NoNewPrivileges=', 'CapabilityBoundingSet=~CAP_SYS_ADMIN', 'SystemCallFilter=~@privileged']) {
    t.match(security.stdout, new RegExp(`✓ ${line.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`), `${line} is set`);
  }
});

// tap's NODE_OPTIONS make node record process info in .tap/, which nobody may not write.
const asNobody = ['--reuid=nobody', '--regid=nogroup', '--clear-groups', 'env', '-u', 'NODE_OPTIONS'];
const unprivileged =
  process.getuid?.() !== 0
    ? 'needs root to become nobody'
    : !found('setpriv') || !found('nbdinfo') || !found('qemu-io')
      ? 'needs setpriv, nbdinfo, qemu-io'
      : false;

t.test('the daemon serves as an unprivileged user', { skip: unprivileged }, async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-nobody-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  const { stdout: ids } = await execFileP('setpriv', [...asNobody, 'id', '-u']);
  const uid = Number(ids.trim());
  const gid = Number((await execFileP('setpriv', [...asNobody, 'id', '-g'])).stdout.trim());
  await chown(dataDir, uid, gid);
  await chmod(dataDir, 0o700);
  const d = await startDaemon({ dataDir, logLevel: 'info', launcher: ['setpriv', ...asNobody] });
  t.teardown(() => d.stop());
  const cli = (...args: string[]) => execFileP('setpriv', [...asNobody, process.execPath, CLI, ...args, '--data-dir', dataDir]);
  await cli('volume', 'create', 'vol', '--size', '64M');
  await cli('snapshot', 'create', 'snap', '--origin', 'vol', '--size', '16M');
  t.equal((await stat(join(dataDir, 'vol.vol'))).uid, uid, 'the volume belongs to the user');

  t.equal((await execFileP('nbdinfo', ['--size', d.uri('snap')])).stdout.trim(), String(64 * MiB));
  await execFileP('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 0 1M', d.uri('vol')]);
  // The snapshot still reads what the origin held: the copy-on-write ran as that user.
  await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 0 0 1M', d.uri('snap')]).then((r) =>
    t.notMatch(r.stdout, /Pattern verification failed/, 'snapshot unchanged'),
  );
  await execFileP('qemu-io', ['-f', 'raw', '-c', 'read -P 0xab 0 1M', d.uri('vol')]).then((r) =>
    t.notMatch(r.stdout, /Pattern verification failed/, 'origin written'),
  );
  const { stdout: status } = await cli('status', '--json');
  const rows = JSON.parse(status) as { name: string; origin: string | null; state: string; usedPercent: number | null }[];
  const snap = rows.find((r) => r.name === 'snap');
  t.match(snap, { origin: 'vol', state: 'valid' });
  t.ok((snap?.usedPercent ?? 0) > 0, 'chunks were copied into the store');
  t.equal(await d.stop(), 0);
});
