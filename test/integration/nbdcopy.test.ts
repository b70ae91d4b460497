// Bulk data through libnbd's nbdcopy: 1 GiB of random bytes into an export and
// back out, with several connections and many requests in flight.
import t from 'tap';
import { createHash, randomFill } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, startTarget } from './target.js';

const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

const randomFillP = promisify(randomFill);

// /dev/urandom and sha256sum both run at ~100-150 MiB/s here; node's crypto is several times faster.
async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 4 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** Writes `size` random bytes to `file` and returns their sha256. */
async function randomFile(file: string, size: number): Promise<string> {
  const h = createHash('sha256');
  const fh = await open(file, 'w');
  try {
    const buf = Buffer.allocUnsafe(16 << 20);
    for (let done = 0; done < size; done += buf.length) {
      await randomFillP(buf);
      h.update(buf);
      await fh.write(buf, 0, buf.length);
    }
  } finally {
    await fh.close();
  }
  return h.digest('hex');
}

// The copies alone take several seconds each; tap's default 30 s is too tight when run by hand.
t.setTimeout(180_000);

t.test('1 GiB in and out', async (t) => {
  // The client-side files live in memory when possible, so the disk only carries the export's writes.
  const work = await mkdtemp(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'cowbd-it-copy-'));
  t.teardown(() => rm(work, { recursive: true, force: true }));
  const input = join(work, 'in.bin');
  const output = join(work, 'out.bin');
  const [srv, want] = await Promise.all([
    startTarget({
      volumes: [
        { name: 'big', size: '1G' },
        { name: 'sparse', size: '256M' },
      ],
    }),
    randomFile(input, GiB),
  ]);
  t.teardown(() => srv.stop());
  const uri = srv.uri('big');

  let started = Date.now();
  const into = await run('nbdcopy', ['--flush', input, uri], 120_000);
  t.equal(into.code, 0, `nbdcopy file -> export${into.code ? `: ${into.stderr}` : ''}`);
  t.comment(`copy in: ${Date.now() - started} ms`);

  started = Date.now();
  const out = await run('nbdcopy', [uri, output], 120_000);
  t.equal(out.code, 0, `nbdcopy export -> file${out.code ? `: ${out.stderr}` : ''}`);
  t.comment(`copy out: ${Date.now() - started} ms`);

  t.equal((await stat(output)).size, GiB, 'output is 1 GiB');
  t.equal(await sha256(output), want, 'sha256 of the copy matches the input');

  // A mostly-empty source makes nbdcopy zero the gaps (WRITE_ZEROES) and, on
  // the way out, consult block status; stale data must not survive either.
  const sparseIn = join(work, 'sparse.bin');
  const sparseOut = join(work, 'sparse-out.bin');
  await rm(output);
  const fh = await open(sparseIn, 'w');
  await fh.truncate(256 * MiB);
  const island = Buffer.alloc(MiB);
  for (let i = 0; i < 16; i++) {
    await randomFillP(island);
    await fh.write(island, 0, MiB, i * 16 * MiB + (i % 3) * 4096 + 1234);
  }
  await fh.close();
  const sparseUri = srv.uri('sparse');
  // Garbage first, so a gap nbdcopy failed to zero would show.
  const dirty = await run('qemu-io', ['-f', 'raw', sparseUri, '-c', 'write -P 0xa5 0 256M']);
  t.equal(dirty.code, 0, 'export prefilled with garbage');
  const sin = await run('nbdcopy', ['--flush', sparseIn, sparseUri], 60_000);
  t.equal(sin.code, 0, `sparse file -> export${sin.code ? `: ${sin.stderr}` : ''}`);
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', sparseIn, sparseUri], 60_000);
  t.equal(cmp.code, 0, `qemu-img compare: export equals the sparse file${cmp.code ? `: ${cmp.stdout}${cmp.stderr}` : ''}`);
  const sout = await run('nbdcopy', [sparseUri, sparseOut], 60_000);
  t.equal(sout.code, 0, 'export -> sparse file');
  t.equal(await sha256(sparseOut), await sha256(sparseIn), 'sparse round trip matches');
});
