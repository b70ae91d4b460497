// The threadpool sender against real loopback sockets: bytes leave whole and in order,
// a client that stops reading blocks no threadpool thread, and a socket destroyed while
// a write is in flight keeps its descriptor until the write returns.
import t from 'tap';
import { once } from 'node:events';
import { stat } from 'node:fs/promises';
import { createServer, Socket, type AddressInfo } from 'node:net';
import { PassThrough } from 'node:stream';
import { ThreadpoolSender } from '../../protocol/threadpool-sender.js';

const MiB = 1 << 20;

/** A connected pair: `server` is the accepted side, `client` the connecting one. */
async function pair(t: { teardown(fn: () => void): void }): Promise<{ server: Socket; client: Socket }> {
  const srv = createServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const client = new Socket();
  const accepted = once(srv, 'connection') as Promise<[Socket]>;
  client.connect((srv.address() as AddressInfo).port, '127.0.0.1');
  const [server] = await accepted;
  t.teardown(() => {
    client.destroy();
    server.destroy();
    srv.close();
  });
  return { server, client };
}

/** Collects what the client receives until `n` bytes came. */
function receive(client: Socket, n: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  let got = 0;
  return new Promise((resolve) => {
    const onData = (b: Buffer) => {
      parts.push(b);
      got += b.length;
      if (got >= n) {
        client.off('data', onData);
        resolve(Buffer.concat(parts));
      }
    };
    client.on('data', onData);
  });
}

/** A buffer whose bytes say where they are in the stream. */
function patterned(start: number, n: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (start + i) * 7 + ((start + i) >> 11);
  return b;
}

t.test('replies of every size leave whole and in order; each callback runs once, in order', async (t) => {
  const { server, client } = await pair(t);
  const sender = ThreadpoolSender.attach(server, 128 * 1024, 64 * MiB, () => {})!;
  t.ok(sender, 'a plain socket gets a sender');
  const sizes = [16, 4096, 300 * 1024, 16, 16, MiB, 2 * MiB + 16, 100, 128 * 1024, 5, 64 * 1024, 3 * MiB];
  for (let i = 0; i < 120; i++) sizes.push([16, 4112, 65552, MiB + 16, 200 * 1024][(i * 7) % 5]!);
  const total = sizes.reduce((a, b) => a + b, 0);
  const expected = patterned(0, total);
  const done: number[] = [];
  const got = receive(client, total);
  let off = 0;
  for (let i = 0; i < sizes.length; i++) {
    const n = sizes[i]!;
    // A reply of two frames, header and data, as the reply writer hands them.
    const head = Math.min(16, n);
    const frames = [expected.subarray(off, off + head), expected.subarray(off + head, off + n)].filter((f) => f.length > 0);
    off += n;
    sender.write(frames, () => done.push(i));
    // Some replies come in later turns, as read completions do.
    if (i % 9 === 0) await new Promise((r) => setImmediate(r));
  }
  const bytes = await got;
  t.equal(bytes.length, total, `${total} bytes arrived`);
  t.ok(bytes.equals(expected), 'byte for byte as written, in order');
  while (done.length < sizes.length) await new Promise((r) => setImmediate(r));
  t.same(
    done,
    sizes.map((_, i) => i),
    'every callback once, in reply order',
  );
});

t.test('a client that stops reading holds no threadpool thread, and gets everything when it resumes', async (t) => {
  const { server, client } = await pair(t);
  client.pause();
  let drained = 0;
  const sender = ThreadpoolSender.attach(server, 128 * 1024, 8 * MiB, () => drained++)!;
  const n = 48;
  const expected = patterned(0, n * MiB);
  let blocked = false;
  let done = 0;
  for (let i = 0; i < n; i++) blocked = sender.write([expected.subarray(i * MiB, (i + 1) * MiB)], () => done++) || blocked;
  t.ok(blocked, 'past the limit the writer is told to stop');
  // Let the sender run into the full socket buffer.
  for (let i = 0; i < 20; i++) await new Promise((r) => setTimeout(r, 5));
  const t0 = performance.now();
  await Promise.all(Array.from({ length: 8 }, () => stat('.')));
  const ms = performance.now() - t0;
  t.ok(ms < 200, `8 threadpool jobs beside the stalled socket took ${ms.toFixed(1)} ms`);
  t.ok(done < n, `${done} of ${n} replies taken while the client reads nothing`);
  t.ok(sender.writableLength > 8 * MiB, `${(sender.writableLength / MiB).toFixed(1)} MiB wait unsent`);
  const got = receive(client, n * MiB);
  client.resume();
  const bytes = await got;
  t.ok(bytes.equals(expected), 'resumed, the client gets every byte in order');
  while (done < n) await new Promise((r) => setImmediate(r));
  t.equal(done, n, 'every callback ran');
  t.ok(drained >= 1, 'the writer was told the queue drained');
});

t.test('destroyed while a threadpool write is in flight: callbacks run, then the handle closes', async (t) => {
  const { server } = await pair(t);
  const sender = ThreadpoolSender.attach(server, 128 * 1024, 64 * MiB, () => {})!;
  server.on('error', () => {});
  let done = 0;
  let doneAtClose = -1;
  server.on('close', () => {
    doneAtClose = done;
  });
  for (let i = 0; i < 8; i++) sender.write([Buffer.alloc(2 * MiB, i)], () => done++);
  server.destroy();
  await once(server, 'close');
  t.equal(doneAtClose, 8, 'the descriptor closed only after the write in flight returned, and every callback ran once');
  sender.write([Buffer.alloc(MiB)], () => done++);
  await new Promise((r) => setImmediate(r));
  t.equal(done, 9, 'a reply after the socket is gone is dropped and its callback runs');
});

t.test('end() sends FIN after everything queued', async (t) => {
  const { server, client } = await pair(t);
  const sender = ThreadpoolSender.attach(server, 64 * 1024, 64 * MiB, () => {})!;
  const expected = patterned(5, 3 * MiB + 100);
  sender.write([expected.subarray(0, 100)]);
  sender.write([expected.subarray(100, MiB + 100)]);
  sender.write([expected.subarray(MiB + 100)]);
  const parts: Buffer[] = [];
  client.on('data', (b: Buffer) => parts.push(b));
  let ended = false;
  sender.end(() => {
    ended = true;
  });
  await once(client, 'end');
  t.ok(Buffer.concat(parts).equals(expected), 'every byte before the FIN');
  while (!ended) await new Promise((r) => setImmediate(r));
  t.ok(ended, "end's callback ran");
});

t.test('no sender where there is no descriptor, or when turned off', async (t) => {
  const { server } = await pair(t);
  t.equal(
    ThreadpoolSender.attach(server, 0, MiB, () => {}),
    undefined,
    'minBytes 0 turns it off',
  );
  t.equal(
    ThreadpoolSender.attach(new PassThrough() as unknown as Socket, 1, MiB, () => {}),
    undefined,
    'a stream that is not a socket',
  );
});
