// A short verified load (the long one: npm run load -- --seconds 60): 8 connections
// with 64 requests in flight each on an origin and its snapshots, snapshots taken and
// removed while it runs, every read checked against the model.
import t from 'tap';
import { startDaemon } from '../helpers/daemon.js';
import { describeLoad, runLoad } from '../load/workload.js';

t.test('verified load on an origin and rotating snapshots', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'load', size: '32M' }], logLevel: 'info', keepLog: (rec) => Number(rec.level) >= 50 });
  t.teardown(() => d.stop());
  const r = await runLoad({
    host: d.host,
    port: d.port,
    dataDir: d.dataDir,
    pid: d.proc.pid!,
    origin: 'load',
    originSize: 32 * 1024 * 1024,
    seconds: 5,
    connections: 8,
    depth: 64,
    snapshotConnections: 2,
    snapshotEveryMs: 1500,
    seed: 7,
    log: (line) => t.comment(line),
  });
  for (const line of describeLoad(r)) t.comment(line);
  t.same(r.errors, [], 'no error replies, no lost connections');
  t.same(r.verifyFailures, [], 'every read matches the model');
  t.ok(r.reads > 200 && r.writes > 200, `reads (${r.reads}) and writes (${r.writes}) both ran`);
  t.ok(r.snapshotReads > 20, `snapshot reads were verified (${r.snapshotReads})`);
  t.ok(
    r.snapshotsCreated >= 2 && r.snapshotsRemoved === r.snapshotsCreated,
    `snapshots made and removed during the run (${r.snapshotsCreated})`,
  );
  t.ok(r.finalBlocksChecked >= (32 * 1024 * 1024) / 4096, 'the whole origin read back and checked');
  const fds = r.samples.map((s) => s.fds);
  // Each connection is a socket; a snapshot holds its store open; nothing else may accumulate.
  t.ok(Math.max(...fds) <= r.before.fds + 8 + 6, `fd count steady during the run (${r.before.fds} before, at most ${Math.max(...fds)})`);
  t.equal(r.after.fds, r.before.fds, 'fd count back where it started');
  t.same(
    d.logs.map((l) => l.msg),
    [],
    'no error lines in the daemon log',
  );
  t.equal(await d.stop(), 0, 'the daemon exits 0');
});
