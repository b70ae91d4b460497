// STARTTLS and per-export access checks in the protocol layer: an in-process
// NbdServer over a memory registry, driven byte by byte through node:net and node:tls.
import t, { type Test } from 'tap';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import type { ClientInfo, TlsMode } from '../../protocol/tls.js';
import { NbdServer } from '../../protocol/server.js';
import type { Logger } from '../../protocol/logger.js';
import { MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';
import { RawClient } from '../helpers/raw-client.js';
import { clientFlags, goData, metaData, option, request } from '../helpers/frames.js';
import { makePki, type TestPki } from '../helpers/certs.js';

let pki: TestPki;
let dir: string;
const servers: NbdServer[] = [];

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cowbd-tls-unit-'));
  pki = await makePki(dir);
});
t.teardown(async () => {
  for (const s of servers) await s.close(100);
  await rm(dir, { recursive: true, force: true });
});

interface LogLine {
  level: string;
  obj: Record<string, unknown>;
  msg?: string;
}

function captureLogger(lines: LogLine[], bindings: Record<string, unknown> = {}): Logger {
  const at = (level: string) => (a: object | string, msg?: string) => {
    if (typeof a === 'string') lines.push({ level, obj: { ...bindings }, msg: a });
    else lines.push({ level, obj: { ...bindings, ...a }, msg });
  };
  return {
    error: at('error'),
    warn: at('warn'),
    info: at('info'),
    debug: at('debug'),
    trace: at('trace'),
    child: (b) => captureLogger(lines, { ...bindings, ...b }),
  };
}

class GuardedRegistry extends MemoryRegistry {
  seen: ClientInfo[] = [];
  authorize(name: string, client: ClientInfo): boolean {
    this.seen.push({ ...client });
    return name !== 'secret';
  }
}

async function serverFile(name: string): Promise<Buffer> {
  return readFile(join(pki.server, name));
}

async function start(mode: TlsMode, opts: { verifyPeer?: boolean; registry?: MemoryRegistry } = {}) {
  const logs: LogLine[] = [];
  const registry = opts.registry ?? new MemoryRegistry([new MemoryBackend('disk', 1 << 20), new MemoryBackend('secret', 1 << 16)]);
  const tls =
    mode === 'off'
      ? { mode }
      : {
          mode,
          options: {
            key: await serverFile('server-key.pem'),
            cert: await serverFile('server-cert.pem'),
            ca: await serverFile('ca-cert.pem'),
            requestCert: !!opts.verifyPeer,
            rejectUnauthorized: !!opts.verifyPeer,
            minVersion: 'TLSv1.2' as const,
          },
        };
  const server = new NbdServer(registry, captureLogger(logs), { handshakeTimeoutMs: 5000 }, {}, tls);
  servers.push(server);
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  return { port: port!, logs, registry };
}

async function clientTls(sub: 'client' | 'clientNoCert' | 'clientRogue' = 'clientNoCert') {
  const d = pki[sub];
  const read = (f: string) => readFile(join(d, f)).catch(() => undefined);
  return { ca: await read('ca-cert.pem'), cert: await read('client-cert.pem'), key: await read('client-key.pem') };
}

/** One option reply: its type and data. */
async function reply(c: RawClient): Promise<{ option: number; type: number; data: Buffer }> {
  const h = await c.read(20);
  if (h.readBigUInt64BE(0) !== C.REPLY_MAGIC_OPT) throw new Error(`bad reply magic ${h.toString('hex')}`);
  const data = await c.read(h.readUInt32BE(16));
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12) >>> 0, data };
}

async function replies(c: RawClient): Promise<{ option: number; type: number; data: Buffer }[]> {
  const out = [];
  for (;;) {
    const r = await reply(c);
    out.push(r);
    if (r.type !== C.NBD_REP_SERVER && r.type !== C.NBD_REP_INFO && r.type !== C.NBD_REP_META_CONTEXT) return out;
  }
}

async function hello(port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.read(18);
  c.send(clientFlags());
  return c;
}

async function starttls(c: RawClient, sub?: 'client' | 'clientNoCert' | 'clientRogue'): Promise<RawClient> {
  c.send(option(C.NBD_OPT_STARTTLS));
  const r = await reply(c);
  if (r.type !== C.NBD_REP_ACK) throw new Error(`STARTTLS answered 0x${r.type.toString(16)}`);
  return c.starttls(await clientTls(sub));
}

function listNames(rs: { type: number; data: Buffer }[]): string[] {
  return rs.filter((r) => r.type === C.NBD_REP_SERVER).map((r) => r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)));
}

/** GO, a write and a read back, all over `c`. */
async function ioRoundTrip(t: Test, c: RawClient, name = 'disk'): Promise<void> {
  c.send(option(C.NBD_OPT_GO, goData(name)));
  const rs = await replies(c);
  t.equal(rs.at(-1)!.type, C.NBD_REP_ACK, `GO ${name}`);
  const data = Buffer.alloc(4096, 0xa5);
  c.send(Buffer.concat([request(C.NBD_CMD_WRITE, 8192, 4096, 1), data, request(C.NBD_CMD_READ, 8192, 4096, 2)]));
  t.equal((await c.simpleReply()).error, 0, 'write');
  const r = await c.simpleReply(4096);
  t.equal(r.error, 0, 'read');
  t.ok(r.data?.equals(data), 'read back what was written');
  c.send(request(C.NBD_CMD_DISC, 0, 0, 3));
}

t.test('off: STARTTLS is unsupported and plain clients work', async (t) => {
  const { port } = await start('off');
  const c = await hello(port);
  c.send(option(C.NBD_OPT_STARTTLS));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_UNSUP);
  await ioRoundTrip(t, c);
  c.close();
});

t.test('require: every option but STARTTLS and ABORT gets TLS_REQD', async (t) => {
  const { port, logs } = await start('require');
  const c = await hello(port);
  for (const [opt, data] of [
    [C.NBD_OPT_LIST, Buffer.alloc(0)],
    [C.NBD_OPT_INFO, goData('disk')],
    [C.NBD_OPT_GO, goData('disk')],
    [C.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
    [C.NBD_OPT_LIST_META_CONTEXT, metaData('disk', [])],
    [99, Buffer.from('xyz')],
  ] as const) {
    c.send(option(opt, data));
    const r = await reply(c);
    t.equal(r.option, opt);
    t.equal(r.type, C.NBD_REP_ERR_TLS_REQD, `option ${opt} refused before TLS`);
  }
  // An oversized option is drained and refused the same way.
  c.send(option(99, Buffer.alloc(C.MAX_OPTION_LENGTH + 1)));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_TLS_REQD, 'oversized option refused before TLS');
  c.send(option(C.NBD_OPT_STARTTLS, Buffer.from('x')));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_INVALID, 'STARTTLS with data is invalid');
  c.send(option(C.NBD_OPT_ABORT));
  t.equal((await reply(c)).type, C.NBD_REP_ACK, 'ABORT works without TLS');
  await c.closed;
  t.ok(
    logs.some((l) => l.msg?.includes('TLS is required')),
    'the refusal is logged',
  );

  const e = await hello(port);
  e.send(option(C.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  t.equal((await e.readAll(5000)).length, 0, 'EXPORT_NAME before TLS: hung up without a reply');
  t.ok(e.ended, 'connection closed');
  t.ok(
    logs.some((l) => l.level === 'warn' && String(l.obj.reason).includes('TLS is required')),
    'the hang-up is logged',
  );
});

t.test('require: after STARTTLS haggling and transmission run over TLS', async (t) => {
  const { port, logs } = await start('require');
  const plain = await hello(port);
  const c = await starttls(plain);
  t.equal((c.socket as import('node:tls').TLSSocket).encrypted, true, 'TLS is up');
  c.send(option(C.NBD_OPT_LIST));
  t.same(listNames(await replies(c)), ['disk', 'secret'], 'LIST works over TLS');
  c.send(option(C.NBD_OPT_STARTTLS));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_INVALID, 'a second STARTTLS is invalid');
  await ioRoundTrip(t, c);
  await c.closed;
  t.ok(
    logs.some((l) => l.msg === 'TLS established' && /^TLSv1\.[23]$/.test(String(l.obj.protocol))),
    'TLS logged with its version',
  );
});

t.test('require: EXPORT_NAME over TLS enters transmission', async (t) => {
  const { port } = await start('require');
  const c = await starttls(await hello(port));
  c.send(option(C.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  const h = await c.read(10);
  t.equal(Number(h.readBigUInt64BE(0)), 1 << 20, 'size');
  c.send(request(C.NBD_CMD_READ, 0, 512, 7));
  t.equal((await c.simpleReply(512)).cookie, 7, 'a read over TLS');
  c.close();
});

t.test('on: plain and TLS clients both work; plain options do not carry into TLS', async (t) => {
  const { port } = await start('on');
  const p = await hello(port);
  await ioRoundTrip(t, p);
  p.close();

  const c0 = await hello(port);
  c0.send(option(C.NBD_OPT_STRUCTURED_REPLY));
  t.equal((await reply(c0)).type, C.NBD_REP_ACK, 'structured replies in plain text');
  const c = await starttls(c0);
  c.send(option(C.NBD_OPT_SET_META_CONTEXT, metaData('disk', ['base:allocation'])));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_INVALID, 'structured replies must be negotiated again over TLS');
  await ioRoundTrip(t, c);
  c.close();
});

t.test('bytes pipelined after STARTTLS close the connection', async (t) => {
  const { port, logs } = await start('on');
  const c = await hello(port);
  c.send(Buffer.concat([option(C.NBD_OPT_STARTTLS), option(C.NBD_OPT_GO, goData('disk'))]));
  const rest = await c.readAll(5000);
  t.ok(c.ended, 'closed');
  t.ok(rest.length <= 20, 'nothing but the STARTTLS ACK was answered');
  t.ok(
    logs.some((l) => l.level === 'warn' && l.msg?.includes('after NBD_OPT_STARTTLS')),
    'logged',
  );
});

t.test('a client that never starts the TLS handshake times out', async (t) => {
  const { port, logs } = await start('require');
  const c = await hello(port);
  c.send(option(C.NBD_OPT_STARTTLS));
  t.equal((await reply(c)).type, C.NBD_REP_ACK);
  await c.readAll(15_000);
  t.ok(c.ended, 'closed by the handshake timeout');
  t.ok(
    logs.some((l) => l.msg?.includes('handshake timed out')),
    'logged',
  );
});

/** Connects with the given client credentials; resolves to whether a GO and a read succeeded. */
async function tryCert(port: number, sub: 'client' | 'clientNoCert' | 'clientRogue'): Promise<boolean> {
  const plain = await hello(port);
  try {
    const c = await starttls(plain, sub);
    // With TLS 1.3 the server judges the client's certificate after the client
    // considers the handshake done, so a refusal shows up as a closed connection here.
    c.send(option(C.NBD_OPT_GO, goData('disk')));
    const rs = await replies(c);
    c.close();
    return rs.at(-1)!.type === C.NBD_REP_ACK;
  } catch {
    return false;
  } finally {
    plain.close();
  }
}

t.test('verify peer: only clients with a certificate from the CA get in', async (t) => {
  const { port, logs } = await start('require', { verifyPeer: true });
  t.equal(await tryCert(port, 'clientNoCert'), false, 'no certificate: refused');
  t.equal(await tryCert(port, 'clientRogue'), false, 'certificate from another CA: refused');
  t.equal(await tryCert(port, 'client'), true, 'certificate from the CA: accepted');
  const failures = logs.filter((l) => l.msg?.startsWith('TLS handshake failed'));
  t.equal(failures.length, 2, 'both refusals logged');
  t.ok(
    failures.some((l) => /certificate/i.test(String(l.obj.err))),
    'missing certificate named in the log',
  );
  t.ok(
    failures.some((l) => l.obj.authorizationError),
    "the rogue certificate's verification error logged",
  );
  t.ok(
    logs.some((l) => l.msg === 'TLS established' && l.obj.clientCertificate === 'cowbd-test-client'),
    'the client certificate subject is logged',
  );
});

t.test('access checks: refused exports are hidden from LIST and get POLICY', async (t) => {
  const registry = new GuardedRegistry([new MemoryBackend('disk', 1 << 20), new MemoryBackend('secret', 1 << 16)]);
  const { port, logs } = await start('on', { registry });
  const c = await hello(port);
  c.send(option(C.NBD_OPT_LIST));
  t.same(listNames(await replies(c)), ['disk'], 'secret is not listed');
  for (const opt of [C.NBD_OPT_INFO, C.NBD_OPT_GO]) {
    c.send(option(opt, goData('secret')));
    t.equal((await reply(c)).type, C.NBD_REP_ERR_POLICY, `option ${opt} on secret: POLICY`);
  }
  c.send(option(C.NBD_OPT_STRUCTURED_REPLY));
  await reply(c);
  c.send(option(C.NBD_OPT_LIST_META_CONTEXT, metaData('secret', [])));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_POLICY, 'meta contexts of secret: POLICY');
  c.send(option(C.NBD_OPT_INFO, goData('nope')));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_UNKNOWN, 'an unknown export is still UNKNOWN');
  c.send(option(C.NBD_OPT_INFO, goData('di\0sk')));
  t.equal((await reply(c)).type, C.NBD_REP_ERR_INVALID, 'a name with NUL is invalid');
  t.ok(
    logs.some((l) => l.level === 'warn' && l.msg === 'export access denied' && l.obj.export === 'secret' && l.obj.address === '127.0.0.1'),
    'denial logged with the address',
  );
  t.equal(registry.seen[0]?.address, '127.0.0.1', 'the registry saw the client address');
  t.equal(registry.seen[0]?.tls, false, 'and that TLS is not up');
  c.close();
  const ok = await hello(port);
  await ioRoundTrip(t, ok, 'disk');
  ok.close();

  const e = await hello(port);
  e.send(option(C.NBD_OPT_EXPORT_NAME, Buffer.from('secret')));
  t.equal((await e.readAll(5000)).length, 0, 'EXPORT_NAME of a refused export hangs up');

  const s = await starttls(await hello(port));
  s.send(option(C.NBD_OPT_INFO, goData('disk')));
  await replies(s);
  t.equal(registry.seen.at(-1)?.tls, true, 'after STARTTLS the registry sees TLS');
  s.close();
});
