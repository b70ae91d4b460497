// The Grafana dashboard and the alert rules in docs/examples against a real Prometheus
// scraping a real daemon: every panel query and every alert expression returns data once
// a volume has been written, a snapshot has filled, and backups have run.
import t from 'tap';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { backup, run, tempDir, writeChunks, CHUNK } from '../backup/backup-helpers.js';
import { ROOT, startDaemon } from '../helpers/daemon.js';
import { NbdClient, nbdErrno } from '../helpers/nbd-client.js';
import { onPath, startPrometheus, type Prometheus } from '../helpers/prometheus.js';
import { sample, scrape } from '../helpers/snapshot-checks.js';

const execFileP = promisify(execFile);
const DASHBOARD = join(ROOT, 'docs', 'examples', 'cowbd-dashboard.json');
const ALERTS = join(ROOT, 'docs', 'examples', 'cowbd-alerts.yml');
t.setTimeout(120_000);

interface Panel {
  title: string;
  type: string;
  targets?: { expr: string; refId: string }[];
}
interface Variable {
  name: string;
  type: string;
  current?: { value: string | string[] };
}

/** The expr with the dashboard's variables set: every value of a multi-value variable, the current one of the others. */
function substitute(expr: string, vars: Variable[]): string {
  return expr.replace(/\$\{?(\w+)\}?/g, (whole, name: string) => {
    if (name === '__rate_interval') return '1m';
    const v = vars.find((x) => x.name === name);
    if (!v) throw new Error(`${whole} is not a variable of the dashboard`);
    if (v.type === 'query') return '.*';
    const cur = v.current?.value;
    if (typeof cur !== 'string') throw new Error(`variable ${name} has no single current value`);
    return cur;
  });
}

/** `x > 0.8` alerts on nothing until x is high: the part left of the threshold must have data. */
function leftOfThreshold(expr: string): string {
  const m = /^(.*?)\s*(?:>=|<=|==|!=|>|<)\s*[\d.\s*+-]+$/s.exec(expr.trim());
  return m ? m[1]! : expr;
}

/** `(a < 0.1) and on() (b == 1)`: each condition's left side, which must have data. */
function conditionSides(expr: string): string[] {
  return expr.split(/\s+and\s+on\s*\(\s*\)\s+/).map((e) => leftOfThreshold(e.trim().replace(/^\((.*)\)$/s, '$1')));
}

const prometheusBin = onPath('prometheus');
const promtoolBin = onPath('promtool');
const skip =
  prometheusBin && promtoolBin
    ? false
    : 'prometheus or promtool is not installed (apt-get install prometheus; see scripts/install-deps.sh)';

t.test('alert rules pass promtool check rules', { skip }, async (t) => {
  const r = await execFileP(promtoolBin!, ['check', 'rules', ALERTS]);
  t.match(r.stdout, /SUCCESS: \d+ rules found/);
});

t.test('every dashboard panel and alert rule returns data from Prometheus', { skip }, async (t) => {
  const d = await startDaemon({
    volumes: [
      { name: 'vol', size: '16M' },
      { name: 'vol2', size: '16M' },
    ],
    logLevel: 'info',
  });
  t.teardown(() => d.stop());
  const prom: Prometheus = await startPrometheus(prometheusBin!, { target: `127.0.0.1:${d.metricsPort}`, ruleFiles: [ALERTS] });
  t.teardown(() => prom.stop());

  // Two backups: a counter first seen at its full value shows no increase, so the
  // throughput panel needs a second backup after Prometheus scraped the first.
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  const init = await run(d, 'backup', 'init', '--repo', repo);
  t.equal(init.code, 0, init.stderr);
  await writeChunks(d, 'vol', [0, 1, 2, 3]);
  const b1 = await backup(d, 'vol', repo, '--snapshot-size', '64M');
  t.equal(b1.code, 0, b1.stderr);
  await prom.waitFor('cowbd_backups_total == 1');
  await writeChunks(d, 'vol', [4, 5]);
  const b2 = await backup(d, 'vol', repo, '--snapshot-size', '64M');
  t.equal(b2.code, 0, b2.stderr);

  // s1 fills over several scrapes, so its fill rate (and time to full) is known, and
  // stops past the 80% of CowbdSnapshotAlmostFull, short of full. Only chunks the origin
  // holds data in are copied on a write, so they are written before the snapshot too.
  const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);
  await writeChunks(d, 'vol', range(16, 64));
  await writeChunks(d, 'vol2', range(0, 20));
  let r = await run(d, 'snapshot', 'create', 's1', '--origin', 'vol', '--size', '4M');
  t.equal(r.code, 0, r.stderr);
  // A sparse snapshot, for the rule on free space that only matters when one exists.
  r = await run(d, 'snapshot', 'create', 'thin', '--origin', 'vol2', '--size', '1M', '--sparse');
  t.equal(r.code, 0, r.stderr);
  let next = 16;
  let ratio = 0;
  while (ratio < 0.82) {
    await writeChunks(d, 'vol', range(next, 6));
    next += 6;
    const c = await NbdClient.connect({ port: d.port, exportName: 's1' });
    await c.read(0, 8 * CHUNK);
    await c.disconnect();
    ratio = sample(await scrape(d), 'cowbd_snapshot_used_ratio', { snapshot: 's1' }) ?? 1;
    await new Promise((res) => setTimeout(res, 1100));
  }
  t.ok(ratio < 1, `s1 stopped filling at ${ratio}, short of full`);

  // vol2's snapshots: one invalidated by origin writes, one overflowed by its own.
  r = await run(d, 'snapshot', 'create', 'inv', '--origin', 'vol2', '--size', '1M');
  t.equal(r.code, 0, r.stderr);
  await writeChunks(d, 'vol2', range(0, 20));
  r = await run(d, 'snapshot', 'create', 'ovf', '--origin', 'vol2', '--size', '1M', '--policy', 'overflow');
  t.equal(r.code, 0, r.stderr);
  const c = await NbdClient.connect({ port: d.port, exportName: 'ovf' });
  let errno = 0;
  for (let i = 0; i < 20 && !errno; i++) errno = await nbdErrno(c.write(i * CHUNK, Buffer.alloc(CHUNK, 1)));
  await c.disconnect();
  t.not(errno, 0, 'a full overflow snapshot refuses its own writes');

  await prom.waitFor('cowbd_snapshot_state{snapshot="ovf",state="overflow"} == 1');
  await prom.waitFor('cowbd_snapshot_state{snapshot="inv",state="invalid"} == 1');
  await prom.waitFor('cowbd_snapshot_used_ratio{snapshot="s1"} > 0.8');

  const dash = JSON.parse(await readFile(DASHBOARD, 'utf8')) as {
    uid: string;
    title: string;
    schemaVersion: number;
    panels: Panel[];
    templating: { list: Variable[] };
  };
  t.equal(dash.title, 'cowbd');
  const vars = dash.templating.list;
  let queries = 0;
  for (const p of dash.panels) {
    if (p.type === 'row') continue;
    t.ok(p.targets?.length, `panel "${p.title}" has queries`);
    for (const target of p.targets ?? []) {
      const expr = substitute(target.expr, vars);
      const result = await prom.query(expr);
      queries++;
      t.ok(result.length > 0, `panel "${p.title}" ${target.refId} returns data: ${expr}`);
    }
  }
  t.ok(queries >= 20, `${queries} panel queries checked`);

  // Figures the traffic above must show, beyond a series existing.
  const value = async (expr: string) => Number((await prom.query(expr))[0]?.value[1]);
  const panelExpr = (title: string, i = 0) => substitute(dash.panels.find((p) => p.title === title)!.targets![i]!.expr, vars);
  const ttf = await prom.query(panelExpr('Time to full'));
  t.ok(
    ttf.some((s) => s.metric.snapshot === 's1' && Number(s.value[1]) > 0 && Number.isFinite(Number(s.value[1]))),
    'time to full is estimated for the filling snapshot',
  );
  t.ok((await value(panelExpr('Backup throughput'))) > 0, 'the second backup shows as backup throughput');
  t.ok((await value(panelExpr('Last successful backup'))) < 120, 'the last backup is recent');
  t.equal(await value(`${panelExpr('Snapshot state')} and on (snapshot) cowbd_snapshot_state{snapshot="ovf"}`), 2, 'ovf shows as overflow');
  t.equal(await value(`${panelExpr('Snapshot state')} and on (snapshot) cowbd_snapshot_state{snapshot="inv"}`), 1, 'inv shows as invalid');
  const lat = await prom.query(panelExpr('NBD latency', 2));
  t.ok(
    lat.some((s) => s.metric.export === 'vol' && Number(s.value[1]) > 0),
    'NBD p99 latency of vol is a positive number',
  );

  // The rules as Prometheus loaded them: each evaluates cleanly and has data.
  const rules = await prom.rules();
  const inFile = (await readFile(ALERTS, 'utf8')).match(/^\s*- alert:/gm)?.length;
  t.equal(rules.length, inFile, 'every alert rule of cowbd-alerts.yml is loaded');
  for (const rule of rules) {
    t.equal(rule.health, 'ok', `${rule.name} evaluates: ${rule.lastError ?? ''}`);
    for (const side of conditionSides(rule.query)) t.ok((await prom.query(side)).length > 0, `${rule.name} has data: ${side}`);
  }
  const [invalid, overflowed, almostFull] = await prom.waitForAlerts([
    { alertname: 'CowbdSnapshotInvalid', snapshot: 'inv' },
    { alertname: 'CowbdSnapshotOverflowed', snapshot: 'ovf' },
    { alertname: 'CowbdSnapshotAlmostFull', snapshot: 's1' },
  ]);
  t.equal(invalid!.state, 'firing', 'the invalid snapshot fires CowbdSnapshotInvalid');
  t.equal(overflowed!.state, 'firing', 'the overflowed snapshot fires CowbdSnapshotOverflowed');
  // It fires after its `for: 1m`; pending shows its condition holds.
  t.match(almostFull!.state, /^(pending|firing)$/, 'the almost full snapshot raises CowbdSnapshotAlmostFull');

  // promtool's lint of the whole exposition, prom-client's Node.js defaults included
  // (the three it names like counters are dropped: daemon/metrics.ts).
  const lint = await promtoolCheckMetrics(promtoolBin!, await scrape(d));
  t.same(lint, [], 'promtool check metrics finds nothing');
});

/** The problem lines `promtool check metrics` prints for an exposition (it exits 3 when there are any). */
async function promtoolCheckMetrics(bin: string, text: string): Promise<string[]> {
  const child = execFile(bin, ['check', 'metrics']);
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  child.stdin!.end(text);
  const code = await new Promise<number | null>((res) => child.once('close', res));
  if (code !== 0 && code !== 3) throw new Error(`promtool check metrics exited ${code}: ${out}`);
  return out.split('\n').filter(Boolean);
}
