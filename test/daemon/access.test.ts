// Per-export access control from the config file's `exports` section: client
// address allow-lists (IPv4, IPv6, unix sockets) and read-only exports.
import t from 'tap';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import { ExportAccess } from '../../daemon/access.js';
import { loadConfig } from '../../daemon/config.js';
import { startDaemon, waitForLog } from '../helpers/daemon.js';
import { RawClient } from '../helpers/raw-client.js';
import { clientFlags, goData, option, parseOptionReplies } from '../helpers/frames.js';
import { run } from '../integration/target.js';

const tcp = (address: string) => ({ address, unix: false, tls: false });
const unix = { unix: true, tls: false };

t.test('rules: parsing and matching', async (t) => {
  const a = ExportAccess.parse({
    lan: { allow: ['10.0.0.0/8', '192.168.1.7', 'fd00::/8', '::1'] },
    ro: { readOnly: true },
    closed: { allow: [], allowUnix: false },
    'snap.1': { allow: '127.0.0.1/32', 'read-only': true },
  });
  t.ok(a.authorize('lan', tcp('10.200.3.4')), 'inside 10/8');
  t.notOk(a.authorize('lan', tcp('11.0.0.1')), 'outside 10/8');
  t.ok(a.authorize('lan', tcp('192.168.1.7')), 'a single address');
  t.notOk(a.authorize('lan', tcp('192.168.1.8')));
  t.ok(a.authorize('lan', tcp('::ffff:10.1.1.1')), 'an IPv4-mapped IPv6 address matches its IPv4 rule');
  t.ok(a.authorize('lan', tcp('fd12:3456::1')), 'inside fd00::/8');
  t.ok(a.authorize('lan', tcp('::1')), 'IPv6 loopback');
  t.notOk(a.authorize('lan', tcp('fe80::1')));
  t.notOk(a.authorize('lan', tcp('127.0.0.1')));
  t.ok(a.authorize('lan', unix), 'unix clients are allowed by default');
  t.notOk(a.authorize('closed', unix), 'unless allowUnix is false');
  t.notOk(a.authorize('closed', tcp('127.0.0.1')), 'an empty allow-list admits no address');
  t.ok(a.authorize('ro', tcp('8.8.8.8')), 'a rule without allow restricts no address');
  t.ok(a.readOnly('ro'));
  t.ok(a.readOnly('snap.1'), 'read-only spelled as the flag, on a name with a dot');
  t.notOk(a.readOnly('lan'));
  t.ok(a.authorize('unlisted', tcp('1.2.3.4')), 'no rule, no "*": open');
  t.notOk(a.authorize('lan', { unix: false, tls: false }), 'a TCP client without an address is refused');

  const star = ExportAccess.parse('{"*": {"allow": ["127.0.0.0/8"]}, "pub": {}}');
  t.ok(star.authorize('any', tcp('127.0.0.9')), '"*" governs unlisted exports');
  t.notOk(star.authorize('any', tcp('10.0.0.1')));
  t.ok(star.authorize('pub', tcp('10.0.0.1')), 'a listed export is governed by its own rule only');
  t.ok(ExportAccess.parse(undefined).empty);

  for (const [bad, why] of [
    [{ v: { allow: ['example.com'] } }, /not an IPv4 or IPv6/],
    [{ v: { allow: ['10.0.0.0/33'] } }, /prefix/],
    [{ v: { allow: ['::/129'] } }, /prefix/],
    [{ v: { allow: ['1.2.3.4/8/9'] } }, /not an IPv4/],
    [{ v: { allow: [7] } }, /list of addresses/],
    [{ v: { readonly: true } }, /unknown key "readonly"/],
    [{ v: { readOnly: 'yes' } }, /true or false/],
    [{ '../x': {} }, /not a valid export name/],
    [{ v: [] }, /must be a mapping/],
    [['v'], /mapping of export names/],
    ['{not json', /mapping of export names/],
  ] as const) {
    t.throws(() => ExportAccess.parse(bad), { code: 'COWBD_BAD_CONFIG', message: why }, JSON.stringify(bad));
  }
});

t.test('the config file carries the exports section, dotted names intact', async (t) => {
  const d = await mkdtemp(join(tmpdir(), 'cowbd-access-cfg-'));
  t.teardown(() => rm(d, { recursive: true, force: true }));
  const path = join(d, 'c.yaml');
  await writeFile(path, 'exports:\n  snap.1:\n    allow: [127.0.0.1, "::1"]\n    readOnly: true\n');
  const cfg = loadConfig(path);
  t.equal(typeof cfg.exports, 'string', 'passed to yargs as JSON text');
  const a = ExportAccess.parse(cfg.exports);
  t.ok(a.readOnly('snap.1'));
  t.ok(a.authorize('snap.1', tcp('::1')));
});

async function list(port: number, localAddress?: string): Promise<string[] | 'closed'> {
  const c = await RawClient.connect(port, localAddress?.includes(':') ? '::1' : '127.0.0.1', localAddress);
  try {
    await c.read(18);
    c.send(Buffer.concat([clientFlags(), option(C.NBD_OPT_LIST), option(C.NBD_OPT_ABORT)]));
    const all = await c.readAll(5000);
    return parseOptionReplies(all)
      .replies.filter((r) => r.type === C.NBD_REP_SERVER)
      .map((r) => r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)))
      .sort();
  } finally {
    c.close();
  }
}

async function infoReply(port: number, name: string, host = '127.0.0.1', localAddress?: string): Promise<number> {
  const c = await RawClient.connect(port, host, localAddress);
  try {
    await c.read(18);
    c.send(Buffer.concat([clientFlags(), option(C.NBD_OPT_INFO, goData(name))]));
    for (;;) {
      const h = await c.read(20);
      await c.read(h.readUInt32BE(16));
      const type = h.readUInt32BE(12) >>> 0;
      if (type !== C.NBD_REP_INFO) return type;
    }
  } finally {
    c.close();
  }
}

t.test('a daemon enforces allow-lists and read-only exports', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-access-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const cfg = join(dir, 'cowbd.yaml');
  await writeFile(
    cfg,
    [
      'exports:',
      '  lan:',
      '    allow: [10.0.0.0/8]',
      '  second:',
      '    allow: [127.0.0.2]',
      '  ro:',
      '    readOnly: true',
      '  nounix:',
      '    allow: [127.0.0.1/32]',
      '    allowUnix: false',
      '  v6:',
      '    allow: ["::1/128"]',
      '',
    ].join('\n'),
  );
  const sock = join(dir, 'nbd.sock');
  const d = await startDaemon({
    dataDir: join(dir, 'data'),
    volumes: ['open', 'lan', 'second', 'ro', 'nounix', 'v6'].map((name) => ({ name, size: '8M' })),
    socket: sock,
    args: ['--config', cfg, '--listen', '[::1]:0'],
  });
  t.teardown(() => d.stop());
  const v6port = d.logs.find((l) => l.msg === 'listening' && l.address === '::1')?.port as number;
  t.ok(v6port, 'also listening on ::1');

  t.same(await list(d.port), ['nounix', 'open', 'ro'], '127.0.0.1 sees what it may use');
  t.same(await list(d.port, '127.0.0.2'), ['open', 'ro', 'second'], '127.0.0.2 sees its own export');
  t.same(await list(v6port, '::1'), ['open', 'ro', 'v6'], '::1 sees the IPv6-only export');

  t.equal(await infoReply(d.port, 'lan'), C.NBD_REP_ERR_POLICY, 'INFO on a refused export: POLICY');
  t.equal(await infoReply(d.port, 'second', '127.0.0.1', '127.0.0.2'), C.NBD_REP_ACK, 'INFO from an allowed address');
  t.equal(await infoReply(v6port, 'v6', '::1'), C.NBD_REP_ACK, 'INFO over IPv6 from an allowed address');
  t.equal(await infoReply(d.port, 'v6'), C.NBD_REP_ERR_POLICY, 'the IPv6-only export from 127.0.0.1: POLICY');

  const denied = await run('nbdinfo', [d.uri('lan')]);
  t.not(denied.code, 0, 'nbdinfo is refused the lan export');
  await waitForLog(d, (l) => l.msg === 'export access denied' && l.export === 'lan');
  const entry = d.logs.find((l) => l.msg === 'export access denied' && l.export === 'lan');
  t.ok(entry, 'the refusal is logged');
  t.equal(entry?.address, '127.0.0.1', 'with the client address');

  const viaUnix = await run('nbdinfo', ['--json', `nbd+unix:///lan?socket=${sock}`]);
  t.equal(viaUnix.code, 0, `unix socket clients are allowed by default: ${viaUnix.stderr}`);
  const noUnix = await run('nbdinfo', [`nbd+unix:///nounix?socket=${sock}`]);
  t.not(noUnix.code, 0, 'unless the export says allowUnix: false');
  const nounixTcp = await run('nbdinfo', [d.uri('nounix')]);
  t.equal(nounixTcp.code, 0, 'that export still serves its TCP allow-list');

  const ro = await run('nbdinfo', ['--json', d.uri('ro')]);
  t.equal(ro.code, 0, ro.stderr);
  t.equal((JSON.parse(ro.stdout) as { exports: { is_read_only: boolean }[] }).exports[0]?.is_read_only, true, 'ro is advertised read-only');
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x1 0 4k', d.uri('ro')]);
  t.ok(w.code !== 0 || /failed|not permitted|read-only/i.test(w.stdout + w.stderr), 'a write to ro fails');
  const w2 = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x1 0 4k', d.uri('open')]);
  t.equal(w2.code, 0, 'a write to an export without a rule works');
  t.notMatch(w2.stdout, /failed/);
});
