// A backend's own meta context (the memory backend's test:even) as libnbd's nbdinfo sees
// it through our server: listed among the contexts, and mapped with --map.
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import * as C from '../../protocol/constants.js';
import { silentLogger } from '../../protocol/logger.js';
import { NbdServer } from '../../protocol/server.js';
import { EVEN_CONTEXT, MemoryBackend, MemoryRegistry } from '../helpers/memory-backend.js';

const run = promisify(execFile);
const CHUNK = 64 * 1024;
let dir: string;
let uri: (name: string) => string;
let server: NbdServer;

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'cowbd-meta-'));
  const snap = new MemoryBackend('snap', 4 * CHUNK + 4096);
  snap.contextChunk = CHUNK;
  server = new NbdServer(new MemoryRegistry([snap, new MemoryBackend('plain', 4 * CHUNK)]), silentLogger);
  const path = join(dir, 'nbd.sock');
  await server.listen({ path });
  uri = (name) => `nbd+unix:///${name}?socket=${path}`;
});
t.teardown(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

t.test('nbdinfo lists the backend context beside base:allocation', async (t) => {
  const { stdout } = await run('nbdinfo', ['--json', '--no-content', uri('snap')]);
  const j = JSON.parse(stdout) as { exports: { contexts?: string[] }[] };
  t.same(j.exports[0]!.contexts, [C.BASE_ALLOCATION, EVEN_CONTEXT]);
  const plain = JSON.parse((await run('nbdinfo', ['--json', '--no-content', uri('plain')])).stdout) as typeof j;
  t.same(plain.exports[0]!.contexts, [C.BASE_ALLOCATION], 'an export without contexts has only base:allocation');
  const text = (await run('nbdinfo', ['--no-content', uri('snap')])).stdout;
  t.match(text, /contexts:\s*\n\s*base:allocation\s*\n\s*test:even/, 'the plain-text listing too');
});

t.test('nbdinfo --map=test:even prints the alternating chunks', async (t) => {
  const { stdout } = await run('nbdinfo', [`--map=${EVEN_CONTEXT}`, uri('snap')]);
  const rows = stdout
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
  t.same(rows, [
    [0, CHUNK, 1],
    [CHUNK, CHUNK, 0],
    [2 * CHUNK, CHUNK, 1],
    [3 * CHUNK, CHUNK, 0],
    [4 * CHUNK, 4096, 1],
  ]);
});

t.test('nbdinfo --map of base:allocation is unchanged beside it', async (t) => {
  const { stdout } = await run('nbdinfo', ['--map', uri('snap')]);
  t.match(stdout, /hole,zero/, 'base:allocation still answers');
});
