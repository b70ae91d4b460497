// Verified load against the real daemon (dist/; npm run load builds first):
//
//   npm run load -- --seconds 60 [--connections 32] [--depth 64] [--snapshot-connections 8]
//                   [--snapshot-every 5] [--size 256M] [--seed N]
//
// Connections keep `depth` requests in flight each, reads and writes of 4 KiB to
// 256 KiB on the origin and on the current snapshot; a new snapshot is taken every
// --snapshot-every seconds through the control API and the previous one removed.
// Every read is verified against a model. Prints the daemon's RSS and fd count each
// second, then throughput and latency percentiles. Exit status 1 on any
// verification failure, error reply, error log line or fd count left above where
// it started.
import { parseArgs } from 'node:util';
import { parseSizeNumber } from '../daemon/sizes.js';
import { startDaemon } from '../test/helpers/daemon.js';
import { describeLoad, runLoad } from '../test/load/workload.js';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '60' },
    connections: { type: 'string', default: '32' },
    depth: { type: 'string', default: '64' },
    'snapshot-connections': { type: 'string', default: '8' },
    'snapshot-every': { type: 'string', default: '5' },
    size: { type: 'string', default: '256M' },
    seed: { type: 'string', default: '1' },
  },
});

const size = parseSizeNumber(values.size, 4096);
const log = (s: string) => console.log(`[load] ${s}`);
const problems: string[] = [];
const d = await startDaemon({
  volumes: [{ name: 'load', size: values.size }],
  logLevel: 'info',
  keepLog: (rec) => {
    if (Number(rec.level) >= 50 && problems.length < 5) problems.push(JSON.stringify(rec));
    return false;
  },
});
let failed = false;
try {
  const o = {
    host: d.host,
    port: d.port,
    dataDir: d.dataDir,
    pid: d.proc.pid!,
    origin: 'load',
    originSize: size,
    seconds: Number(values.seconds),
    connections: Number(values.connections),
    depth: Number(values.depth),
    snapshotConnections: Number(values['snapshot-connections']),
    snapshotEveryMs: Number(values['snapshot-every']) * 1000,
    seed: Number(values.seed),
    log,
  };
  log(
    `daemon pid ${o.pid}: ${o.connections} connections (${o.snapshotConnections} on snapshots) x ${o.depth} in flight, ` +
      `origin ${values.size}, a snapshot every ${values['snapshot-every']} s, ${o.seconds} s`,
  );
  const r = await runLoad(o);
  for (const line of describeLoad(r)) log(line);
  for (const e of [...r.verifyFailures, ...r.errors].slice(0, 20)) log(`FAILED: ${e}`);
  for (const p of problems) log(`daemon error line: ${p}`);
  failed = r.verifyFailures.length > 0 || r.errors.length > 0 || problems.length > 0 || r.after.fds > r.before.fds;
} finally {
  const code = await d.stop();
  if (code !== 0) {
    log(`the daemon exited with ${code}`);
    failed = true;
  }
}
log(failed ? 'FAILED' : 'passed');
process.exit(failed ? 1 : 0);
