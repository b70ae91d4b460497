// kill -9 soak against the real daemon (dist/; npm run soak builds first):
//
//   npm run soak -- --cycles 100 [--seed N] [--size 16M] [--clients 4] [--depth 8]
//                   [--load-ms 300-2000] [--max-snapshots 6] [--data-dir DIR]
//                   [--stop-on-failure] [--daemon-log FILE]
//
// Every cycle runs writers (FUA writes, plain writes, FLUSHes, verified reads) and a
// verified snapshot reader, SIGKILLs the daemon at a random moment (every third cycle
// in the middle of a snapshot creation), restarts it on the same data directory and
// checks the origin against the durability model and every snapshot block for block
// (test/helpers/soak.ts). Prints figures at the end; exit status 1 on any failure.
// The data directory is removed afterwards unless --data-dir names one; with
// --stop-on-failure the run ends at the first failing check, the data as it found it.
import { parseArgs } from 'node:util';
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseSizeNumber } from '../daemon/sizes.js';
import { describeSoak, runSoak } from '../test/helpers/soak.js';

const { values } = parseArgs({
  options: {
    cycles: { type: 'string', default: '50' },
    seed: { type: 'string' },
    size: { type: 'string', default: '16M' },
    clients: { type: 'string', default: '4' },
    depth: { type: 'string', default: '8' },
    'load-ms': { type: 'string', default: '300-2000' },
    'max-snapshots': { type: 'string', default: '6' },
    'data-dir': { type: 'string' },
    'stop-on-failure': { type: 'boolean', default: false },
    'daemon-log': { type: 'string' },
  },
});

const seed = values.seed !== undefined ? Number(values.seed) >>> 0 : Math.floor(Math.random() * 1e9);
const [lo, hi] = values['load-ms'].split('-').map(Number) as [number, number];
const size = parseSizeNumber(values.size, 1 << 20);
const dataDir = values['data-dir'] ?? (await mkdtemp(join(tmpdir(), 'cowbd-soak-')));
const log = (s: string) => console.log(`[soak] ${s}`);
log(
  `seed ${seed}, ${values.cycles} cycles, origin ${values.size}, ${values.clients} clients x ${values.depth} in flight, data dir ${dataDir}`,
);

const daemonLog = values['daemon-log'] ? createWriteStream(values['daemon-log']) : undefined;
const t0 = Date.now();
const r = await runSoak({
  stopOnFailure: values['stop-on-failure'],
  daemonLog: daemonLog ? (rec) => daemonLog.write(`${JSON.stringify(rec)}\n`) : undefined,
  dataDir,
  seed,
  size,
  cycles: Number(values.cycles),
  clients: Number(values.clients),
  depth: Number(values.depth),
  loadMs: [lo, hi ?? lo],
  maxSnapshots: Number(values['max-snapshots']),
  log,
});
for (const line of describeSoak(r)) log(line);
log(`${((Date.now() - t0) / 1000).toFixed(1)} s in all`);
for (const e of r.errorLogs) log(`daemon error line: ${e}`);
const failed = r.failures.length > 0 || r.errorLogs.length > 0;
if (failed) log(`FAILED (${r.failures.length} failures); replay with --seed ${seed}`);
else log('passed');
if (!values['data-dir']) await rm(dataDir, { recursive: true, force: true });
process.exit(failed ? 1 : 0);
