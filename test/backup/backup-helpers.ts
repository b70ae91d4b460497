// Shared by the backup command's tests: a daemon with a volume, writes over NBD, the
// CLI's JSON output, and whole-image hashes to compare a restore with its snapshot.
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cowbdResult, type Daemon } from '../helpers/daemon.js';
import { NbdClient } from '../helpers/nbd-client.js';

export const CHUNK = 65536;

export async function tempDir(prefix: string): Promise<string> {
  return mkdtemp(join(tmpdir(), prefix));
}

export async function run(d: Daemon | { dataDir: string }, ...args: string[]) {
  return cowbdResult([...args, '--data-dir', d.dataDir]);
}

/** Runs a backup with --json; returns the summaries (one per volume) or the failure. */
export async function backup(d: Daemon, volumes: string | string[], repo: string, ...args: string[]) {
  const r = await run(d, 'backup', 'create', ...[volumes].flat(), ...args, '--repo', repo, '--json');
  const lines = r.stdout
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  const summaries = lines.filter((l) => l.type === 'summary') as unknown as Summary[];
  return { ...r, summaries, progress: lines.filter((l) => l.type === 'progress') };
}

export interface Summary {
  id: string;
  volume: string;
  mode: string;
  parent?: string;
  group?: string;
  snapshot: string;
  checkpoint?: { tracker: string; generation: number };
  stats: { bytesRead: number; newBytes: number; dedupBytes: number; storedBytes: number; zeroChunks: number; chunks: number };
}

export async function connect(d: Daemon, exportName: string): Promise<NbdClient> {
  return NbdClient.connect({ port: d.port, exportName });
}

/** Writes random data to the given chunks of an export; returns the bytes written. */
export async function writeChunks(d: Daemon, exportName: string, chunks: number[], partial = false): Promise<number> {
  const c = await connect(d, exportName);
  try {
    for (const i of chunks) {
      const len = partial ? 4096 : CHUNK;
      await c.write(i * CHUNK + (partial ? 8192 : 0), randomBytes(len));
    }
    await c.flush();
  } finally {
    await c.disconnect();
  }
  return chunks.length * CHUNK;
}

export async function exportHash(d: Daemon, exportName: string): Promise<string> {
  const c = await connect(d, exportName);
  const h = createHash('sha256');
  try {
    for (let at = 0; at < c.size; at += 1 << 20) h.update(await c.read(at, Math.min(1 << 20, c.size - at)));
  } finally {
    await c.disconnect();
  }
  return h.digest('hex');
}

export async function fileHash(path: string): Promise<string> {
  return createHash('sha256')
    .update(await readFile(path))
    .digest('hex');
}

/** n distinct chunk indexes below `count`, from a seeded generator. */
export function scattered(n: number, count: number, seed: number): number[] {
  const out = new Set<number>();
  let x = seed >>> 0 || 1;
  while (out.size < n) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.add((x >>> 0) % count);
  }
  return [...out].sort((a, b) => a - b);
}
