// Names for tab completion: volumes from the data directory, snapshots from a running daemon.
// A shell waits for these on every Tab, so any failure or slow daemon just completes no names.
import { request } from 'node:http';
import { readdir } from 'node:fs/promises';
import { controlSocketPath } from './control-client.js';

/** How long a Tab waits for the daemon's snapshot list before offering none. */
const SNAPSHOT_LIST_TIMEOUT_MS = 300;

export type NameKind = 'volume' | 'snapshot';

/**
 * What the word being completed (`current`) names. `words` are the command's non-option
 * words as yargs parsed them; `previous` is the word before the current one.
 */
export function nameKind(words: readonly (string | number)[], current: string, previous: string | undefined): NameKind | null {
  if (previous === '--origin') return 'volume';
  // Otherwise only a positional is a name, not an option's value.
  if (String(words[words.length - 1]) !== current) return null;
  const [group, command] = words.map(String);
  if (group === 'volume' && command === 'remove' && words.length === 3) return 'volume';
  if (group === 'snapshot' && (command === 'extend' || command === 'merge' || command === 'remove') && words.length === 3)
    return 'snapshot';
  if (group === 'backup' && command === 'create' && words.length >= 3) return 'volume';
  return null;
}

export async function volumeNames(dataDir: string): Promise<string[]> {
  try {
    return (await readdir(dataDir)).filter((f) => f.endsWith('.vol')).map((f) => f.slice(0, -'.vol'.length));
  } catch {
    return [];
  }
}

export function snapshotNames(dataDir: string): Promise<string[]> {
  return new Promise((resolve) => {
    const req = request({ socketPath: controlSocketPath(dataDir), path: '/v1/snapshots', timeout: SNAPSHOT_LIST_TIMEOUT_MS }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => {
        try {
          const list = JSON.parse(body) as { name?: unknown }[];
          resolve(Array.isArray(list) ? list.map((s) => String(s.name)) : []);
        } catch {
          resolve([]);
        }
      });
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve([]));
    req.end();
  });
}

export async function namesFor(kind: NameKind, dataDir: string): Promise<string[]> {
  return kind === 'volume' ? volumeNames(dataDir) : snapshotNames(dataDir);
}
