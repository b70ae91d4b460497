// BLOCK_STATUS from the data itself: extents by absolute 64 KiB blocks, read in pooled pieces.
import t from 'tap';
import { VolumeBackend } from '../../daemon/volume-backend.js';
import type { Volume } from '../../cow/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function volumeOver(data: Buffer, seen: ArrayBufferLike[]): Volume {
  return {
    name: 'v',
    size: data.length,
    state: 'valid',
    read: async (buf, offset) => {
      seen.push(buf.buffer);
      data.copy(buf, 0, offset, offset + buf.length);
    },
    write: async () => {},
    flush: async () => {},
    discard: async () => {},
    writeZeroes: async () => {},
  };
}

t.test('extents: zero and data blocks, merged across the pieces a scan is read in', async (t) => {
  const data = Buffer.alloc(12 * MiB);
  data.fill(1, 4 * MiB - 64 * KiB, 4 * MiB + 64 * KiB); // straddles the 4 MiB piece boundary
  data[9 * MiB] = 7; // past the 8 MiB a reply covers
  const seen: ArrayBufferLike[] = [];
  const b = new VolumeBackend(volumeOver(data, seen), () => '', false);

  const all = await b.extents(0, 12 * MiB);
  t.same(
    all,
    [
      { length: 4 * MiB - 64 * KiB, flags: 3 },
      { length: 128 * KiB, flags: 0 },
      { length: 4 * MiB - 64 * KiB, flags: 3 },
    ],
    'one reply covers 8 MiB; the data run crossing a piece boundary is one extent',
  );

  // Blocks follow absolute boundaries: an unaligned query ends its first extent on one.
  const odd = await b.extents(4 * MiB - 64 * KiB - 100, 1000);
  t.same(odd, [
    { length: 100, flags: 3 },
    { length: 900, flags: 0 },
  ]);

  const tail = await b.extents(8 * MiB, 4 * MiB);
  t.same(tail, [
    { length: MiB, flags: 3 },
    { length: 64 * KiB, flags: 0 },
    { length: 3 * MiB - 64 * KiB, flags: 3 },
  ]);

  const before = new Set(seen);
  await b.extents(0, 8 * MiB);
  t.ok(
    seen.slice(-2).every((m) => before.has(m)),
    'a later query reads into memory an earlier one used, not fresh memory',
  );
});
