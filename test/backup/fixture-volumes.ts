// The two volume states of test/fixtures/backup-repo-v1: 1 MiB each, text chunks that compress
// to little so the fixture stays a few KiB.
import { CHUNK } from './helpers.js';

export const FIXTURE_SIZE = 1024 * 1024;

const fill = (v: Buffer, i: number, text: string) => v.subarray(i * CHUNK, (i + 1) * CHUNK).fill(text);

export function fixtureVolumeA(): Buffer {
  const v = Buffer.alloc(FIXTURE_SIZE);
  for (let i = 0; i < 10; i++) fill(v, i, `fixture volume chunk ${i}\n`);
  return v;
}

/** A with chunk 3 rewritten, chunk 5 zeroed and chunk 12 written. */
export function fixtureVolumeB(): Buffer {
  const v = fixtureVolumeA();
  fill(v, 3, 'chunk 3, second version\n');
  v.fill(0, 5 * CHUNK, 6 * CHUNK);
  fill(v, 12, 'chunk 12 appears\n');
  return v;
}
