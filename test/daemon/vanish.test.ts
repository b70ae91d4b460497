// Clients that vanish mid-request or mid-handshake leave nothing behind: the
// daemon's fd count, its connection gauge, requests in flight and bytes in flight
// all return to where they were, and a client that stays is served throughout.
import t from 'tap';
import { connect, type Socket } from 'node:net';
import * as C from '../../protocol/constants.js';
import { startDaemon } from '../helpers/daemon.js';
import { clientFlags, goData, option, request } from '../helpers/frames.js';
import { NbdClient } from '../helpers/nbd-client.js';
import { metricValue, sample, scrape } from '../helpers/proc.js';

const MiB = 1024 * 1024;
const ROUNDS = 25;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A raw socket; resolves once connected. */
async function raw(port: number): Promise<Socket> {
  const s = connect({ host: '127.0.0.1', port });
  s.on('error', () => undefined);
  s.resume(); // read and drop whatever the server sends
  await new Promise<void>((r, j) => {
    s.once('connect', () => r());
    s.once('error', j);
  });
  return s;
}

const handshake = Buffer.concat([clientFlags(), option(C.NBD_OPT_GO, goData('vol'))]);

/** Each scenario sends something and then destroys the socket without a goodbye. */
const scenarios: Record<string, (port: number, i: number) => Promise<void>> = {
  'a write header and half its payload': async (port) => {
    const s = await raw(port);
    s.write(Buffer.concat([handshake, request(C.NBD_CMD_WRITE, 0, 4 * MiB, 1), Buffer.alloc(2 * MiB, 0xee)]));
    await sleep(5);
    s.destroy();
  },
  'many writes, the last one cut short': async (port) => {
    const s = await raw(port);
    const frames: Buffer[] = [handshake];
    for (let k = 0; k < 32; k++) frames.push(request(C.NBD_CMD_WRITE, k * 65536, 65536, k + 1), Buffer.alloc(65536, k));
    frames.push(request(C.NBD_CMD_WRITE, 0, MiB, 99), Buffer.alloc(1000));
    s.write(Buffer.concat(frames));
    await sleep(2);
    s.destroy();
  },
  'many reads, gone before the replies': async (port) => {
    const s = await raw(port);
    s.pause(); // never read the replies
    const frames: Buffer[] = [handshake];
    for (let k = 0; k < 200; k++) frames.push(request(C.NBD_CMD_READ, (k % 64) * 65536, 65536, k + 1));
    s.write(Buffer.concat(frames));
    await sleep(3);
    s.destroy();
  },
  'mid-handshake, inside an option': async (port, i) => {
    const s = await raw(port);
    s.write(handshake.subarray(0, 4 + (i % 20)));
    await sleep(1);
    s.destroy();
  },
  'before the greeting is read': async (port) => {
    const s = connect({ host: '127.0.0.1', port });
    s.on('error', () => undefined);
    await new Promise<void>((r) => s.once('connect', () => r()));
    s.destroy();
  },
  'half-closed after requests, then reset': async (port) => {
    const s = await raw(port);
    const frames: Buffer[] = [handshake];
    for (let k = 0; k < 50; k++) frames.push(request(C.NBD_CMD_READ, k * 4096, 4096, k + 1));
    s.end(Buffer.concat(frames));
    await sleep(1);
    s.resetAndDestroy();
  },
};

t.test('vanishing clients leave no fds, connections or bytes behind', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '16M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const pid = d.proc.pid!;
  const stay = await NbdClient.connect({ port: d.port, exportName: 'vol' });
  await stay.write(8 * MiB, Buffer.alloc(65536, 0x5a));
  const gauges = async () => {
    const m = await scrape(d.metricsPort);
    return {
      connections: metricValue(m, 'cowbd_nbd_connections'),
      bytes: metricValue(m, 'cowbd_nbd_bytes_in_flight'),
      requests: Number(/^cowbd_nbd_requests_in_flight\{export="vol"\} (\d+)/m.exec(m)?.[1] ?? 0),
    };
  };
  await sleep(200);
  // Scrape first: the metrics client's keep-alive connection is one of the daemon's fds.
  const baseGauges = await gauges();
  const base = sample(pid);
  t.same(baseGauges, { connections: 1, bytes: 0, requests: 0 }, 'baseline: one connection, nothing in flight');

  for (const [name, run] of Object.entries(scenarios)) {
    for (let i = 0; i < ROUNDS; i++) await run(d.port, i);
    const got = await stay.read(8 * MiB, 65536);
    t.ok(got.equals(Buffer.alloc(65536, 0x5a)), `${name}: the staying client is served`);
  }

  const deadline = Date.now() + 10_000;
  let g = await gauges();
  let s = sample(pid);
  while ((g.connections !== 1 || g.bytes !== 0 || g.requests !== 0 || s.fds > base.fds) && Date.now() < deadline) {
    await sleep(50);
    g = await gauges();
    s = sample(pid);
  }
  t.comment(`fds ${base.fds} -> ${s.fds}, RSS ${(base.rssKiB / 1024).toFixed(1)} -> ${(s.rssKiB / 1024).toFixed(1)} MiB`);
  t.equal(g.connections, 1, 'connection gauge back to the baseline');
  t.equal(g.requests, 0, 'no requests left in flight');
  t.equal(g.bytes, 0, 'no bytes left held (cut-short write payloads are released)');
  t.ok(s.fds <= base.fds, `fd count back to the baseline (${base.fds} -> ${s.fds})`);
  t.same(
    d.logs.filter((l) => Number(l.level) >= 50).map((l) => l.msg),
    [],
    'no error lines in the log',
  );
  await stay.disconnect();
  t.equal(await d.stop(), 0, 'the daemon exits 0');
});
