// What the kernel snapshot tests ask the running daemon from the host: the CLI with
// --json, and /metrics samples.
import { cowbdResult, type Daemon } from './daemon.js';

export interface SnapshotUsage {
  name: string;
  origin: string;
  state: string;
  policy: string;
  usedChunks: number;
  capacityChunks: number;
  exceptions: number;
  chunkSize: number;
}
export interface StatusRow {
  name: string;
  kind: string;
  origin: string | null;
  state: string;
  usedPercent: number | null;
  storeSize: number | null;
}

/** `cowbd ARGS --data-dir DIR`: exit code and output, failing or not. */
export function cli(d: Daemon, ...args: string[]) {
  return cowbdResult([...args, '--data-dir', d.dataDir]);
}

/** `cowbd ARGS --json`, parsed; throws with stderr when it fails. */
export async function cliJson<T>(d: Daemon, ...args: string[]): Promise<T> {
  const r = await cli(d, ...args, '--json');
  if (r.code !== 0) throw new Error(`cowbd ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

export async function snapshotUsage(d: Daemon, name: string): Promise<SnapshotUsage | undefined> {
  return (await cliJson<SnapshotUsage[]>(d, 'snapshot', 'list')).find((u) => u.name === name);
}

/** The /metrics port: d.metricsPort, or from the log when that is 0 (a startDaemon
 *  that resolves on the 'listening' line can return before 'metrics listening'). */
export function metricsPort(d: Daemon): number {
  const rec = d.logs.find((l) => l.msg === 'metrics listening');
  const port = d.metricsPort || (typeof rec?.port === 'number' ? rec.port : 0);
  if (!port) throw new Error('the daemon has not logged its metrics port');
  return port;
}

export async function scrape(d: Daemon): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${metricsPort(d)}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  return res.text();
}

/** The value of the first sample of `name` whose labels include all of `labels`. */
export function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const close = line.lastIndexOf('}');
    const set = line.slice(name.length + 1, close);
    if (Object.entries(labels).every(([k, v]) => set.includes(`${k}="${v}"`))) return Number(line.slice(close + 1).trim());
  }
  return undefined;
}

/** Guest script lines that attach an export the guest did not know at boot (a snapshot
 *  taken while it runs) with cowbd-attach, which retries. Detach it yourself: the
 *  guest's init only detaches the devices it attached. */
export function attachLater(port: number, name: string, device: string, timeoutS = 30): string {
  return `echo "${port} ${device} ${name} 1 ${timeoutS}" >> /cowbd/exports\n      cowbd-attach ${device}`;
}

/** `sha256sum` output as { "./path": hash }. */
export function parseSums(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split('\n')) {
    const r = /^([0-9a-f]{64})\s+(\S+)$/.exec(line.trim());
    if (r) m.set(r[2]!, r[1]!);
  }
  return m;
}

/** Guest shell: every regular file but lost+found's, with its checksum, in a stable order. */
export const SUMS = `find . -type f ! -path './lost+found/*' | sort | xargs sha256sum`;

/** Guest shell: a file system's worth of files in /mnt (random data, a precious one, many small ones). */
export const POPULATE = `
      mkdir /mnt/dir /mnt/many
      echo "the only copy of something important" > /mnt/precious.txt
      seq 1 50000 > /mnt/dir/seq.txt
      head -c $((6 << 20)) /dev/urandom > /mnt/random.bin
      head -c $((2 << 20)) /dev/urandom > /mnt/dir/photo.bin
      head -c $((1 << 20)) /dev/urandom > /mnt/keep.bin
      for i in $(seq 1 64); do echo "file $i" > /mnt/many/f$i; done`;
