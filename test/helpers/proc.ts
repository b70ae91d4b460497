// Resource figures of a running process from /proc (Linux): resident memory and
// open file descriptors, for leak checks on the daemon.
import { readdirSync, readFileSync } from 'node:fs';

export interface ProcSample {
  /** VmRSS in KiB. */
  rssKiB: number;
  /** Entries in /proc/PID/fd. */
  fds: number;
}

export function sample(pid: number): ProcSample {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  return { rssKiB: m ? Number(m[1]) : 0, fds: readdirSync(`/proc/${pid}/fd`).length };
}

export function mib(kib: number): string {
  return (kib / 1024).toFixed(1);
}

/** Polls until the process's fd count is at most `target`; returns the last sample. */
export async function waitForFds(pid: number, target: number, timeoutMs = 10_000): Promise<ProcSample> {
  const deadline = Date.now() + timeoutMs;
  let s = sample(pid);
  while (s.fds > target && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    s = sample(pid);
  }
  return s;
}

/** The value of an unlabelled gauge or counter in Prometheus text. */
export function metricValue(text: string, name: string): number | undefined {
  const m = new RegExp(`^${name} ([0-9.eE+-]+)$`, 'm').exec(text);
  return m ? Number(m[1]) : undefined;
}

export async function scrape(metricsPort: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
  return res.text();
}
