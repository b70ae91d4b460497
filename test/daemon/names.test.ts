// Hostile names through the NBD handshake and the control API must never reach
// a file outside the data directory, and the control socket and data directory
// must be the daemon user's alone.
import t from 'tap';
import { request } from 'node:http';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import { startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/raw-client.js';
import { clientFlags, goData, metaData, option } from '../helpers/frames.js';
import { run } from '../integration/target.js';

/** Every path under dir with its size and mode, sorted. */
async function tree(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { recursive: true })) {
    const st = await stat(join(dir, e)).catch(() => undefined);
    if (st) out.push(`${e} ${st.isDirectory() ? 'dir' : st.size} ${(st.mode & 0o777).toString(8)}`);
  }
  return out.sort();
}

function control(dataDir: string, method: string, path: string, body?: unknown): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request(
      { socketPath: join(dataDir, 'control.sock'), method, path, headers: payload ? { 'content-type': 'application/json' } : {} },
      (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

/** The first option reply type for INFO/GO/LIST_META_CONTEXT on `name`, or 'closed'. */
async function optionReply(port: number, opt: number, name: string): Promise<number | 'closed'> {
  const c = await RawClient.connect(port);
  try {
    await c.read(18);
    const data = opt === C.NBD_OPT_LIST_META_CONTEXT ? metaData(name, []) : goData(name);
    c.send(Buffer.concat([clientFlags(), option(C.NBD_OPT_STRUCTURED_REPLY), option(opt, data)]));
    await c.read(20);
    for (;;) {
      const h = await c.read(20);
      await c.read(h.readUInt32BE(16));
      const type = h.readUInt32BE(12) >>> 0;
      if (type < 0x80000000 && type !== C.NBD_REP_ACK) continue;
      return type;
    }
  } catch {
    return 'closed';
  } finally {
    c.close();
  }
}

async function exportName(port: number, name: Buffer): Promise<number> {
  const c = await RawClient.connect(port);
  await c.read(18);
  c.send(Buffer.concat([clientFlags(), option(C.NBD_OPT_EXPORT_NAME, name)]));
  const rest = await c.readAll(5000);
  c.close();
  return rest.length;
}

t.test('hostile names reach nothing outside the data directory', async (t) => {
  const root = await mkdtemp(join(tmpdir(), 'cowbd-names-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  const dataDir = join(root, 'data');
  // Files a traversal would hit: ROOT/victim.vol is "../victim" as a volume,
  // ROOT/cow/... would be a store of it, ROOT/etc/passwd.vol is "/etc/passwd" made relative.
  await writeFile(join(root, 'victim.vol'), Buffer.alloc(1 << 20, 0xee));
  await mkdir(join(root, 'etc'));
  await writeFile(join(root, 'etc', 'passwd.vol'), 'root:x:0:0\n');
  const outsideBefore = await tree(root).then((l) => l.filter((p) => !p.startsWith('data')));

  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '8M' }] });
  t.teardown(() => d.stop());
  const insideBefore = await tree(dataDir);

  const names = [
    '../victim',
    '../../victim',
    '..',
    '.',
    '/',
    '/etc/passwd',
    join(root, 'victim'),
    `${root}/victim.vol`,
    'victim',
    'vol/../../victim',
    'vol\0../victim',
    '\0',
    '..\\victim',
    '%2e%2e/victim',
    'vol.vol',
    'cow',
    'control.sock',
    'a'.repeat(4096),
    'é'.repeat(300),
  ];
  for (const name of names) {
    for (const opt of [C.NBD_OPT_INFO, C.NBD_OPT_GO, C.NBD_OPT_LIST_META_CONTEXT]) {
      const r = await optionReply(d.port, opt, name);
      t.ok(
        r === C.NBD_REP_ERR_UNKNOWN || r === C.NBD_REP_ERR_INVALID,
        `option ${opt} on ${JSON.stringify(name.length > 40 ? `${name.slice(0, 40)}…` : name)}: 0x${typeof r === 'number' ? r.toString(16) : r}`,
      );
    }
    t.equal(await exportName(d.port, Buffer.from(name)), 0, `EXPORT_NAME ${JSON.stringify(name.slice(0, 40))} hangs up`);
  }
  // Past the spec's 4096-byte limit: malformed for INFO, a hang-up for EXPORT_NAME.
  t.equal(await optionReply(d.port, C.NBD_OPT_INFO, 'a'.repeat(4097)), C.NBD_REP_ERR_INVALID, 'a 4097-byte name is invalid');
  t.equal(await exportName(d.port, Buffer.alloc(70_000, 0x61)), 0, 'a 70000-byte EXPORT_NAME hangs up');

  const api: [string, string, unknown?][] = [
    ['DELETE', '/v1/volumes/..%2Fvictim'],
    ['DELETE', '/v1/volumes/..%2F..%2Fvictim'],
    ['DELETE', '/v1/volumes/%2e%2e%2fvictim'],
    ['DELETE', '/v1/volumes/%2E%2E'],
    ['DELETE', '/v1/volumes/..'],
    ['DELETE', '/v1/volumes/%2Fetc%2Fpasswd'],
    ['DELETE', '/v1/volumes/vol%00..%2Fvictim'],
    ['DELETE', '/v1/volumes/%ZZ'],
    ['DELETE', `/v1/volumes/${'a'.repeat(5000)}`],
    ['GET', '/v1/snapshots/..%2Fvictim'],
    ['DELETE', '/v1/snapshots/..%2Fvictim'],
    ['POST', '/v1/snapshots/..%2Fvictim/extend', { size: '+1M' }],
    ['POST', '/v1/volumes', { name: '../victim', size: '1M' }],
    ['POST', '/v1/volumes', { name: '/etc/passwd', size: '1M' }],
    ['POST', '/v1/volumes', { name: `${root}/x`, size: '1M' }],
    ['POST', '/v1/volumes', { name: 'a\0b', size: '1M' }],
    ['POST', '/v1/volumes', { name: '.hidden', size: '1M' }],
    ['POST', '/v1/volumes', { name: 'x'.repeat(65), size: '1M' }],
    ['POST', '/v1/snapshots', { name: '../snap', origin: 'vol', size: '4M' }],
    ['POST', '/v1/snapshots', { name: 'snap', origin: '../victim', size: '4M' }],
    ['POST', '/v1/snapshots', { name: 'snap', origin: '/etc/passwd', size: '4M' }],
  ];
  for (const [method, path, body] of api) {
    const r = await control(dataDir, method, path, body);
    t.ok(
      r.status >= 400 && r.status < 500,
      `${method} ${path.slice(0, 60)} ${body ? JSON.stringify(body).slice(0, 60) : ''}: ${r.status} ${r.body.slice(0, 120)}`,
    );
  }

  t.same(await tree(root).then((l) => l.filter((p) => !p.startsWith('data'))), outsideBefore, 'nothing outside the data directory changed');
  t.ok((await readFile(join(root, 'victim.vol'))).equals(Buffer.alloc(1 << 20, 0xee)), 'the victim file is intact');
  t.same(await tree(dataDir), insideBefore, 'nothing inside the data directory changed either');
  const still = await run('nbdinfo', ['--json', d.uri('vol')]);
  t.equal(still.code, 0, 'the daemon still serves');
  t.same(
    d.logs.filter((l) => Number(l.level) >= 50),
    [],
    'no errors logged (no 500s)',
  );
});

t.test('the control socket is 0600 and a new data directory 0700', async (t) => {
  const root = await mkdtemp(join(tmpdir(), 'cowbd-perm-'));
  t.teardown(() => rm(root, { recursive: true, force: true }));
  const dataDir = join(root, 'fresh', 'data');
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '1M' }] });
  t.teardown(() => d.stop());
  t.equal((await stat(dataDir)).mode & 0o777, 0o700, 'data directory made by `volume create` is 0700');
  const sock = await stat(join(dataDir, 'control.sock'));
  t.ok(sock.isSocket(), 'control.sock is a socket');
  t.equal(sock.mode & 0o777, 0o600, 'control socket is 0600');
  t.equal((await stat(join(dataDir, 'vol.vol'))).mode & 0o777, 0o600, 'volume files are 0600');
  t.notOk(
    d.logs.some((l) => String(l.msg).includes('accessible to other users')),
    'no warning for a private data directory',
  );
  await d.stop();

  const open = join(root, 'open');
  await mkdir(open);
  await chmod(open, 0o755);
  const o = await startDaemon({ dataDir: open, args: ['--default-size', '1M'] });
  t.teardown(() => o.stop());
  const warn = o.logs.find((l) => String(l.msg).includes('data directory is accessible to other users'));
  t.ok(warn, 'a data directory others can enter is warned about');
  t.equal(warn?.mode, '755');
});
