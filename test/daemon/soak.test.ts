// kill -9 under load with snapshots live, a short run of the soak (npm run soak for a
// long one; test/helpers/soak.ts says what is checked after every restart). Also: a
// store file left by a creation killed before its header was written does not stop
// the daemon from starting.
import t from 'tap';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { call } from '../../daemon/control-client.js';
import { startDaemon } from '../helpers/daemon.js';
import { describeSoak, runSoak, storeFiles } from '../helpers/soak.js';

const CYCLES = Number(process.env.COWBD_SOAK_CYCLES ?? 6);
const SEED = Number(process.env.COWBD_SOAK_SEED ?? Math.floor(Math.random() * 1e9));

t.test('a store whose creation was killed before its header: the daemon starts and replaces it', async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-unfinished-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  await mkdir(join(dataDir, 'cow'));
  // What kill -9 can leave: the file just created (empty), or its zeroed slot region written and no header yet.
  await writeFile(join(dataDir, 'cow', 'vol.64k.cows'), Buffer.alloc(0));
  await writeFile(join(dataDir, 'cow', 'vol.32k.cows'), Buffer.alloc(128 * 1024));
  const d = await startDaemon({ dataDir, volumes: [{ name: 'vol', size: '8M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  t.same(await storeFiles(dataDir), [], 'both files are gone');
  t.equal(d.logs.filter((l) => l.msg === 'removed an exception store whose creation never finished').length, 2, 'each removal is logged');
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'a', origin: 'vol', size: '4M' });
  await call(d.dataDir, 'POST', '/v1/snapshots', { name: 'b', origin: 'vol', size: '4M', chunkSize: '32K' });
  t.same(await storeFiles(dataDir), ['vol.32k.cows', 'vol.64k.cows'], 'snapshots of both chunk sizes can be created again');
});

t.test(`kill -9 under load, ${CYCLES} cycles (seed ${SEED})`, async (t) => {
  const dataDir = await mkdtemp(join(tmpdir(), 'cowbd-soak-'));
  t.teardown(() => rm(dataDir, { recursive: true, force: true }));
  const r = await runSoak({
    dataDir,
    cycles: CYCLES,
    seed: SEED,
    size: 8 << 20,
    clients: 3,
    depth: 4,
    loadMs: [300, 1500],
    maxSnapshots: 5,
    log: (line) => t.comment(line),
  });
  for (const line of describeSoak(r)) t.comment(line);
  t.same(r.failures, [], `seed ${SEED}: nothing lost, no snapshot changed (COWBD_SOAK_SEED=${SEED} replays the schedule)`);
  t.same(r.errorLogs, [], 'the daemon logged no errors');
  t.equal(r.cycles, CYCLES);
  t.ok(r.writesAcked > 0 && r.durableVerified > 0 && r.snapshotChecks > 0, 'the run did real work');
});
