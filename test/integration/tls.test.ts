// TLS with real clients: nbdinfo (libnbd, GnuTLS) and qemu-io (QEMU's NBD client,
// tls-creds-x509) against `cowbd serve --tls ...`, with a CA, server and client
// certificates made by openssl for this run.
import t from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon, waitForLog, type Daemon } from '../helpers/daemon.js';
import { makePki, type TestPki } from '../helpers/certs.js';
import { run } from './target.js';

const SIZE = 64 * 1024 * 1024;
let pki: TestPki;
let dir: string;
const daemons: Daemon[] = [];

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cowbd-tls-it-'));
  pki = await makePki(dir);
});
t.teardown(async () => {
  for (const d of daemons) await d.stop();
  await rm(dir, { recursive: true, force: true });
});

async function serve(args: string[]): Promise<Daemon> {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '64M' }], args: ['--tls-certificates', pki.server, ...args] });
  daemons.push(d);
  return d;
}

const nbds = (d: Daemon, certs: string, name = 'vol') => `nbds://127.0.0.1:${d.port}/${name}?tls-certificates=${certs}`;

async function nbdinfo(uri: string) {
  const r = await run('nbdinfo', ['--json', uri], 30_000);
  let size: number | undefined;
  if (r.code === 0) size = (JSON.parse(r.stdout) as { exports: { 'export-size': number }[] }).exports[0]?.['export-size'];
  return { ...r, size };
}

function qemuIo(d: Daemon, certs: string | undefined, commands: string[]) {
  const args: string[] = [];
  let opts = `driver=nbd,host=127.0.0.1,port=${d.port},export=vol`;
  if (certs) {
    args.push('--object', `tls-creds-x509,id=tls0,dir=${certs},endpoint=client`);
    opts += ',tls-creds=tls0';
  }
  args.push('--image-opts', opts);
  for (const c of commands) args.push('-c', c);
  return run('qemu-io', args, 60_000);
}

// Log lines travel through the daemon's stdout pipe and can trail the client's exit.
const logged = (d: Daemon, re: RegExp) => waitForLog(d, (l) => re.test(String(l.msg)));

t.test('require: TLS clients get in, plain ones get TLS_REQD', async (t) => {
  const d = await serve(['--tls', 'require']);

  const ok = await nbdinfo(nbds(d, pki.clientNoCert));
  t.equal(ok.code, 0, `nbdinfo over TLS: ${ok.stderr}`);
  t.equal(ok.size, SIZE, 'export size over TLS');
  t.ok(await logged(d, /^TLS established$/), 'the daemon logged the TLS session');

  const plain = await nbdinfo(`nbd://127.0.0.1:${d.port}/vol`);
  t.not(plain.code, 0, 'plain nbdinfo fails');
  t.match(plain.stderr, /nbdinfo/, `it says why: ${plain.stderr.trim()}`);
  t.ok(await logged(d, /TLS is required \(NBD_REP_ERR_TLS_REQD\)/), 'the daemon logged the TLS_REQD refusal');

  const list = await run('nbdinfo', ['--list', '--json', `nbds://127.0.0.1:${d.port}/?tls-certificates=${pki.clientNoCert}`]);
  t.equal(list.code, 0, list.stderr);
  t.same(
    (JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']),
    ['vol'],
    'listing over TLS',
  );

  const w = await qemuIo(d, pki.clientNoCert, ['write -P 0x5a 1M 256k', 'write -P 0xc3 3M 4k']);
  t.equal(w.code, 0, `qemu-io writes over TLS: ${w.stderr}${w.stdout}`);
  t.notMatch(w.stdout, /error|failed/i);
  // A second process reads back: the data went through the server, not a cache.
  const r = await qemuIo(d, pki.clientNoCert, ['read -P 0x5a 1M 256k', 'read -P 0xc3 3M 4k', 'read -P 0 2M 64k']);
  t.equal(r.code, 0, `qemu-io reads over TLS: ${r.stderr}`);
  t.notMatch(r.stdout, /Pattern verification failed|error/i, 'the patterns read back');
  t.match(r.stdout, /read 262144\/262144 bytes/);

  const q = await qemuIo(d, undefined, ['read 0 4k']);
  t.not(q.code, 0, 'qemu-io without TLS is refused');
});

t.test('verify peer: a client certificate from the CA is required', async (t) => {
  const d = await serve(['--tls', 'require', '--tls-verify-peer']);

  const none = await nbdinfo(nbds(d, pki.clientNoCert));
  t.not(none.code, 0, 'nbdinfo without a client certificate is refused');
  const rogue = await nbdinfo(nbds(d, pki.clientRogue));
  t.not(rogue.code, 0, 'nbdinfo with a certificate from another CA is refused');
  const good = await nbdinfo(nbds(d, pki.client));
  t.equal(good.code, 0, `nbdinfo with a CA-signed certificate: ${good.stderr}`);
  t.equal(good.size, SIZE);
  const failed = (l: Record<string, unknown>) => l.msg === 'TLS handshake failed; closing';
  const both = await waitForLog(d, () => d.logs.filter(failed).length >= 2);
  t.ok(both, `both refusals logged (${d.logs.filter(failed).length})`);
  t.ok(
    await waitForLog(d, (l) => l.msg === 'TLS established' && l.clientCertificate === 'cowbd-test-client'),
    'the accepted certificate is logged',
  );

  const q = await qemuIo(d, pki.client, ['write -P 0x11 0 64k', 'read -P 0x11 0 64k']);
  t.equal(q.code, 0, `qemu-io with a client certificate: ${q.stderr}`);
  t.notMatch(q.stdout, /Pattern verification failed/);
  const qn = await qemuIo(d, pki.clientNoCert, ['read 0 4k']);
  t.not(qn.code, 0, 'qemu-io without a client certificate is refused');
});

t.test('on: plain and TLS clients are both served', async (t) => {
  const d = await serve(['--tls', 'on']);
  const plain = await nbdinfo(`nbd://127.0.0.1:${d.port}/vol`);
  t.equal(plain.code, 0, plain.stderr);
  t.equal(plain.size, SIZE);
  const tls = await nbdinfo(nbds(d, pki.clientNoCert));
  t.equal(tls.code, 0, tls.stderr);
  t.equal(tls.size, SIZE);
  const q = await qemuIo(d, pki.clientNoCert, ['write -P 0x77 0 4k']);
  t.equal(q.code, 0, q.stderr);
  const p = await qemuIo(d, undefined, ['read -P 0x77 0 4k']);
  t.equal(p.code, 0, p.stderr);
  t.notMatch(p.stdout, /Pattern verification failed/, 'a plain client reads what a TLS client wrote');
});

t.test('off: a client that insists on TLS is turned away', async (t) => {
  const d = await serve([]);
  const r = await nbdinfo(nbds(d, pki.clientNoCert));
  t.not(r.code, 0, 'nbds:// to a server without TLS fails');
  const plain = await nbdinfo(`nbd://127.0.0.1:${d.port}/vol`);
  t.equal(plain.code, 0, plain.stderr);
});
