// A fuzz campaign against one target: canary up, warm-up cases, baseline RSS and
// fd count, the main run, then the same figures once every fuzz connection is gone.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { percentiles } from '../helpers/nbd-client.js';
import { mib, sample, waitForFds, type ProcSample } from '../helpers/proc.js';
import { Canary, fuzzRun, runCase, type FuzzFailure } from './driver.js';
import { loadCase, type SavedCase } from './fuzzer.js';
import { CANARY_EXPORT, type FuzzTarget } from './target.js';

export interface CampaignOptions {
  seed: number;
  cases: number;
  /** Cases run before the baseline is taken (they count towards `cases`). */
  warmup: number;
  concurrency: number;
  timeoutMs: number;
  regressionsDir?: string;
  maxFailures?: number;
  log: (line: string) => void;
}

export interface CampaignResult {
  cases: number;
  elapsedMs: number;
  casesPerSecond: number;
  failures: FuzzFailure[];
  aborted?: string;
  kinds: Record<string, number>;
  warm: ProcSample;
  end: ProcSample;
  /** Connections open when the baseline and the end sample were taken (the canary's). */
  connectionsWarm: number;
  connectionsEnd: number;
  canaryOps: number;
  canaryFailures: string[];
  canaryLatency: ReturnType<typeof percentiles>;
}

/** Waits until the server counts at most `n` connections; returns the last count. */
export async function settleConnections(t: FuzzTarget, n: number, timeoutMs = 10_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let c = await t.connections();
  while (c > n && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    c = await t.connections();
  }
  return c;
}

export async function campaign(t: FuzzTarget, o: CampaignOptions): Promise<CampaignResult> {
  const canary = new Canary(t, CANARY_EXPORT, o.timeoutMs, o.seed);
  await canary.start();
  const kinds: Record<string, number> = {};
  const progress = (phase: string) => (done: number, failures: number, ms: number, final: boolean) => {
    if (final || done % 10_000 === 0) {
      const s = t.dead() ? undefined : sample(t.pid);
      o.log(
        `${phase}: ${done} cases, ${failures} failures, ${Math.round((done / ms) * 1000)} cases/s` +
          (s ? `, RSS ${mib(s.rssKiB)} MiB, ${s.fds} fds` : '') +
          `, canary ${canary.ops} ops`,
      );
    }
  };
  const common = {
    seed: o.seed,
    concurrency: o.concurrency,
    timeoutMs: o.timeoutMs,
    regressionsDir: o.regressionsDir,
    maxFailures: o.maxFailures,
    abort: () => t.dead(),
    kinds,
  };
  const warmRun = await fuzzRun(t, { ...common, start: 0, cases: o.warmup, onProgress: progress('warm-up') });
  const connectionsWarm = await settleConnections(t, 1);
  const warm = t.dead() ? { rssKiB: 0, fds: 0 } : await waitForFds(t.pid, 0, 300);
  o.log(
    `baseline after ${warmRun.cases} warm-up cases: RSS ${mib(warm.rssKiB)} MiB, ${warm.fds} fds, ${connectionsWarm} connection(s) open`,
  );
  const main = warmRun.aborted
    ? { cases: 0, failures: [], elapsedMs: 0, aborted: warmRun.aborted }
    : await fuzzRun(t, { ...common, start: o.warmup, cases: o.cases - o.warmup, onProgress: progress('fuzz') });
  const connectionsEnd = t.dead() ? NaN : await settleConnections(t, connectionsWarm);
  const end = t.dead() ? { rssKiB: 0, fds: 0 } : await waitForFds(t.pid, warm.fds);
  await canary.stop(!t.dead());
  const cases = warmRun.cases + main.cases;
  const elapsedMs = warmRun.elapsedMs + main.elapsedMs;
  return {
    cases,
    elapsedMs,
    casesPerSecond: Math.round((cases / elapsedMs) * 1000),
    failures: [...warmRun.failures, ...main.failures],
    aborted: warmRun.aborted ?? main.aborted,
    kinds,
    warm,
    end,
    connectionsWarm,
    connectionsEnd,
    canaryOps: canary.ops,
    canaryFailures: canary.failures,
    canaryLatency: percentiles(canary.latencies),
  };
}

export function summary(r: CampaignResult): string[] {
  const l = r.canaryLatency;
  return [
    `cases: ${r.cases} in ${(r.elapsedMs / 1000).toFixed(1)} s (${r.casesPerSecond} cases/s); kinds ${JSON.stringify(r.kinds)}`,
    `failures: ${r.failures.length}${r.aborted ? `; aborted: ${r.aborted}` : ''}`,
    `RSS: ${mib(r.warm.rssKiB)} MiB after warm-up, ${mib(r.end.rssKiB)} MiB at the end (${r.end.rssKiB >= r.warm.rssKiB ? '+' : ''}${mib(r.end.rssKiB - r.warm.rssKiB)} MiB)`,
    `fds: ${r.warm.fds} after warm-up, ${r.end.fds} at the end; connections ${r.connectionsWarm} -> ${r.connectionsEnd}`,
    `canary: ${r.canaryOps} verified ops, ${r.canaryFailures.length} failures, latency ms p50 ${l.p50.toFixed(2)} p90 ${l.p90.toFixed(2)} p99 ${l.p99.toFixed(2)} max ${l.max.toFixed(2)}`,
  ];
}

/** Every saved regression case. */
export function loadRegressions(dir: string): { file: string; saved: SavedCase }[] {
  let names: string[];
  try {
    names = readdirSync(dir)
      .filter((n) => n.endsWith('.json'))
      .sort();
  } catch {
    return [];
  }
  return names.map((n) => ({ file: n, saved: JSON.parse(readFileSync(join(dir, n), 'utf8')) as SavedCase }));
}

/** Replays saved cases; returns the failures. */
export async function replayRegressions(t: FuzzTarget, dir: string, timeoutMs: number): Promise<{ file: string; message: string }[]> {
  const out: { file: string; message: string }[] = [];
  for (const { file, saved } of loadRegressions(dir)) {
    const message = await runCase(t, loadCase(saved), timeoutMs);
    if (message) out.push({ file, message });
  }
  return out;
}
