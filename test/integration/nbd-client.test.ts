// protocol/client.ts against nbdkit (the reference server) and against our own server
// with the memory backend: data round trips, pipelining, block status, errors.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { STATE_HOLE } from '../../protocol/backend.js';
import * as C from '../../protocol/constants.js';
import { NbdClient } from '../../protocol/client.js';
import { NbdClientError, ProtocolError } from '../../protocol/errors.js';
import { silentLogger } from '../../protocol/logger.js';
import { NbdServer } from '../../protocol/server.js';
import { EVEN_CONTEXT, MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';

const MiB = 1024 * 1024;
let dir: string;
t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cowbd-client-'));
});
t.teardown(() => rm(dir, { recursive: true, force: true }));

/** nbdkit on a unix socket, in the foreground; resolves once the socket exists. */
async function nbdkit(name: string, args: string[]): Promise<{ sock: string; proc: ChildProcess }> {
  const sock = join(dir, `${name}.sock`);
  const proc = spawn('nbdkit', ['-f', '-U', sock, ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  for (let i = 0; i < 200 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
  if (!existsSync(sock)) throw new Error(`nbdkit ${args.join(' ')} did not start`);
  return { sock, proc };
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected a rejection');
}

t.test('nbdkit memory: reads, writes, zeroes, trim, flush round trip', async (t) => {
  const { sock } = await nbdkit('memory', ['memory', '64M']);
  const c = await NbdClient.connect({ path: sock, exportName: '', metaContexts: [C.BASE_ALLOCATION] });
  t.teardown(() => c.destroy());
  t.equal(c.size, 64 * MiB);
  t.equal(c.readOnly, false);
  t.same([...c.contexts.keys()], [C.BASE_ALLOCATION], 'base:allocation granted');

  const data = randomBytes(3 * MiB + 512);
  await c.write(data, 5 * MiB);
  const back = Buffer.alloc(data.length, 0xee);
  await c.read(back, 5 * MiB);
  t.ok(back.equals(data), 'what was written reads back');

  await c.writeZeroes(5 * MiB + 4096, 8192, { noHole: true });
  await c.trim(6 * MiB, MiB);
  await c.flush();
  const expect = Buffer.from(data);
  expect.fill(0, 4096, 4096 + 8192);
  expect.fill(0, MiB, 2 * MiB);
  await c.read(back, 5 * MiB);
  t.ok(back.equals(expect), 'zeroed and trimmed ranges read as zeroes');

  const big = Buffer.alloc(32 * MiB);
  await c.read(big, 0);
  t.ok(big.subarray(5 * MiB, 5 * MiB + 4096).equals(data.subarray(0, 4096)), 'a 32 MiB read');
  const tooBig = await rejection(c.read(Buffer.alloc(32 * MiB + 1), 0));
  t.equal((tooBig as ProtocolError).code, 'EINVAL', 'over 32 MiB is refused before it is sent');

  const st = await c.blockStatus(0, 16 * MiB);
  const ext = st.get(C.BASE_ALLOCATION)!;
  t.ok(ext.length > 0, 'extents returned');
  t.equal(ext[0]!.flags & STATE_HOLE, STATE_HOLE, 'the start of the export is a hole');
  t.ok(
    ext.some((e) => (e.flags & 1) === 0),
    'the written range is allocated',
  );
  await c.close();
});

t.test('nbdkit memory: 64 requests in flight', async (t) => {
  const { sock } = await nbdkit('pipeline', ['memory', '64M']);
  const c = await NbdClient.connect({ path: sock, exportName: '' });
  t.teardown(() => c.destroy());
  const blocks = Array.from({ length: 64 }, () => randomBytes(64 * 1024 + 512));
  const writes = blocks.map((b, i) => c.write(b, i * MiB));
  t.equal(c.inFlight, 64, 'all 64 writes are in flight at once');
  await Promise.all(writes);
  const outs = blocks.map((b) => Buffer.alloc(b.length));
  const reads = outs.map((o, i) => c.read(o, i * MiB));
  t.equal(c.inFlight, 64, 'all 64 reads are in flight at once');
  await Promise.all(reads);
  t.ok(
    outs.every((o, i) => o.equals(blocks[i]!)),
    'every read matches its write',
  );
  await c.close();
});

t.test('nbdkit sparse-random: block status with holes agrees with the data', async (t) => {
  const { sock } = await nbdkit('sparse', ['sparse-random', '32M', 'percent=50', 'runlength=262144']);
  const c = await NbdClient.connect({ path: sock, exportName: '', metaContexts: [C.BASE_ALLOCATION] });
  t.teardown(() => c.destroy());
  const ext = (await c.blockStatus(0, 8 * MiB)).get(C.BASE_ALLOCATION)!;
  t.ok(
    ext.some((e) => e.flags & 2),
    'some extents are zero',
  );
  t.ok(
    ext.some((e) => !(e.flags & 2)),
    'some hold data',
  );
  let at = 0;
  let checked = 0;
  for (const e of ext.slice(0, 16)) {
    const b = Buffer.alloc(Math.min(e.length, MiB));
    await c.read(b, at);
    const zero = b.every((x) => x === 0);
    if (e.flags & 2) t.ok(zero, `zero extent at ${at} reads as zeroes`);
    else t.notOk(zero, `data extent at ${at} holds data`);
    at += e.length;
    checked++;
  }
  t.ok(checked > 1);
  await c.close();
});

t.test('nbdkit killed mid-request: every pending request is rejected', async (t) => {
  const { sock, proc } = await nbdkit('killed', ['--filter=delay', 'memory', '16M', 'rdelay=5']);
  const c = await NbdClient.connect({ path: sock, exportName: '' });
  const pending = Array.from({ length: 4 }, (_, i) => rejection(c.read(Buffer.alloc(4096), i * 4096)));
  await new Promise((r) => setTimeout(r, 200));
  t.equal(c.inFlight, 4);
  proc.kill('SIGKILL');
  for (const err of await Promise.all(pending)) {
    t.ok(err instanceof ProtocolError, 'a protocol error');
    t.equal((err as ProtocolError).code, 'ECONNRESET');
    t.match(err.message, /connection lost/);
  }
  const later = await rejection(c.flush());
  t.equal((later as ProtocolError).code, 'ECONNRESET', 'later requests fail at once');
});

t.test('our server: contexts, holes in reads, error replies', async (t) => {
  const snap = new MemoryBackend('snap', 8 * MiB);
  snap.contextChunk = 64 * 1024;
  const ro = new MemoryBackend('ro', MiB, true);
  const server = new NbdServer(new MemoryRegistry([snap, ro]), silentLogger);
  const path = join(dir, 'ours.sock');
  await server.listen({ path });
  t.teardown(() => server.close());

  const c = await NbdClient.connect({ path, exportName: 'snap', metaContexts: [C.BASE_ALLOCATION, EVEN_CONTEXT, 'nosuch:x'] });
  t.same(
    [...c.contexts],
    [
      [C.BASE_ALLOCATION, C.BASE_ALLOCATION_ID],
      [EVEN_CONTEXT, 2],
    ],
  );
  const st = await c.blockStatus(32 * 1024, 128 * 1024);
  t.same(st.get(C.BASE_ALLOCATION), [
    { length: 64 * 1024, flags: 0 },
    { length: 64 * 1024, flags: 3 },
  ]);
  t.same(st.get(EVEN_CONTEXT), [
    { length: 32 * 1024, flags: 1 },
    { length: 64 * 1024, flags: 0 },
    { length: 32 * 1024, flags: 1 },
  ]);

  // Zero runs of 64 KiB and more come back as OFFSET_HOLE chunks between OFFSET_DATA ones.
  const data = randomBytes(MiB);
  data.fill(0, 128 * 1024, 512 * 1024);
  await c.write(data, MiB);
  const back = Buffer.alloc(MiB, 0xff);
  await c.read(back, MiB);
  t.ok(back.equals(data), 'data and holes reassemble');

  snap.contextFailWith = 'ENOSPC';
  const failed = await rejection(c.blockStatus(0, 4096));
  t.ok(failed instanceof NbdClientError);
  t.equal((failed as NbdClientError).code, 'ENOSPC');
  snap.contextFailWith = undefined;
  t.equal((await c.blockStatus(0, 4096)).size, 2, 'the connection carries on');
  await c.close();

  const r = await NbdClient.connect({ path, exportName: 'ro' });
  t.equal(r.readOnly, true);
  const denied = await rejection(r.write(Buffer.alloc(4096, 1), 0));
  t.ok(denied instanceof NbdClientError);
  t.equal((denied as NbdClientError).errno, C.NBD_EPERM);
  t.equal((denied as NbdClientError).code, 'EPERM');
  const b = Buffer.alloc(4096, 1);
  await r.read(b, 0);
  t.ok(
    b.every((x) => x === 0),
    'a read after the refusal works',
  );
  const noCtx = await rejection(r.blockStatus(0, 4096));
  t.equal((noCtx as ProtocolError).id, 'NBD_CLIENT_NO_CONTEXT', 'no context asked, none granted');
  await r.close();

  const unknown = await rejection(NbdClient.connect({ path, exportName: 'nope' }));
  t.equal((unknown as ProtocolError).code, 'ENOENT');
  t.match(unknown.message, /no export "nope"/);
});
