// A throwaway Prometheus (Debian's binary) scraping one target every second, with alert
// rules evaluated as often, and the few HTTP API calls the tests make of it.
import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';

/** The executable's path when it is on PATH. */
export function onPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {}
  }
  return undefined;
}

export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((res) => s.listen(0, '127.0.0.1', res));
  const port = (s.address() as { port: number }).port;
  await new Promise((res) => s.close(res));
  return port;
}

export interface Series {
  metric: Record<string, string>;
  value: [number, string];
}

export interface Rule {
  name: string;
  query: string;
  health: string;
  lastError?: string;
}

export interface Alert {
  labels: Record<string, string>;
  state: string;
}

export interface Prometheus {
  url: string;
  /** An instant query's vector (an empty list when nothing matches); throws on a bad query. */
  query(expr: string): Promise<Series[]>;
  /** Polls until the query returns a series; throws after timeoutMs. */
  waitFor(expr: string, timeoutMs?: number): Promise<Series[]>;
  /** The loaded alerting rules. */
  rules(): Promise<Rule[]>;
  /** Polls until, for each label set, an alert with those labels is pending or firing; returns those alerts. */
  waitForAlerts(wanted: Record<string, string>[], timeoutMs?: number): Promise<Alert[]>;
  stop(): Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function startPrometheus(bin: string, o: { target: string; ruleFiles?: string[] }): Promise<Prometheus> {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-prometheus-'));
  const config = {
    global: { scrape_interval: '1s', evaluation_interval: '1s' },
    rule_files: o.ruleFiles ?? [],
    scrape_configs: [{ job_name: 'cowbd', static_configs: [{ targets: [o.target] }] }],
  };
  // JSON is YAML.
  await writeFile(join(dir, 'prometheus.yml'), JSON.stringify(config));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const proc = spawn(
    bin,
    [
      `--config.file=${join(dir, 'prometheus.yml')}`,
      `--storage.tsdb.path=${join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
      '--log.level=warn',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  proc.stderr!.on('data', (b: Buffer) => {
    stderr = (stderr + b.toString()).slice(-4000);
  });
  const exited = new Promise<void>((res) => proc.once('exit', () => res()));

  async function api<T>(path: string): Promise<T> {
    const res = await fetch(url + path);
    const body = (await res.json()) as { status: string; data: T; error?: string };
    if (body.status !== 'success') throw new Error(`Prometheus ${path}: ${body.error}`);
    return body.data;
  }
  async function query(expr: string): Promise<Series[]> {
    const data = await api<{ resultType: string; result: Series[] }>(`/api/v1/query?query=${encodeURIComponent(expr)}`);
    if (data.resultType !== 'vector') throw new Error(`${expr} is a ${data.resultType}, not a vector`);
    return data.result;
  }

  for (const end = Date.now() + 15_000; ; await sleep(100)) {
    if (proc.exitCode !== null) throw new Error(`prometheus exited with ${proc.exitCode}: ${stderr}`);
    try {
      if ((await fetch(`${url}/-/ready`)).ok) break;
    } catch {}
    if (Date.now() > end) throw new Error(`prometheus not ready after 15 s: ${stderr}`);
  }

  return {
    url,
    query,
    async waitFor(expr, timeoutMs = 15_000) {
      for (const end = Date.now() + timeoutMs; ; await sleep(200)) {
        const r = await query(expr);
        if (r.length) return r;
        if (Date.now() > end) throw new Error(`no data for ${expr} after ${timeoutMs} ms`);
      }
    },
    async rules() {
      const data = await api<{ groups: { rules: (Rule & { type: string })[] }[] }>('/api/v1/rules?type=alert');
      return data.groups.flatMap((g) => g.rules);
    },
    async waitForAlerts(wanted, timeoutMs = 15_000) {
      for (const end = Date.now() + timeoutMs; ; await sleep(200)) {
        const { alerts } = await api<{ alerts: Alert[] }>('/api/v1/alerts');
        const found = wanted.map((w) => alerts.find((a) => Object.entries(w).every(([k, v]) => a.labels[k] === v)));
        if (found.every(Boolean)) return found as Alert[];
        if (Date.now() > end) {
          const missing = wanted.filter((_, i) => !found[i]);
          throw new Error(`alerts ${JSON.stringify(missing)} not raised after ${timeoutMs} ms; raised: ${JSON.stringify(alerts)}`);
        }
      }
    },
    async stop() {
      if (proc.exitCode === null) {
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(timer);
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
}
