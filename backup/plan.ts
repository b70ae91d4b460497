// Which chunks of a snapshot a backup reads: from the daemon's change tracking over
// NBD block status (cowbd:allocated, cowbd:changed-since:N), so a sparse volume costs
// what its data costs and an incremental what changed since its parent.
import type { Extent } from '../protocol/backend.js';

export const ALLOCATED = 'cowbd:allocated';
export const changedSince = (generation: number): string => `cowbd:changed-since:${generation}`;

/** One bit per chunk, LSB first in each byte. */
export class ChunkBits {
  readonly bits: Uint8Array;
  constructor(readonly count: number) {
    this.bits = new Uint8Array(Math.ceil(count / 8));
  }
  has(i: number): boolean {
    return ((this.bits[i >>> 3]! >>> (i & 7)) & 1) === 1;
  }
  setRange(from: number, to: number): void {
    for (let i = from; i < to; i++) this.bits[i >>> 3]! |= 1 << (i & 7);
  }
  count1(): number {
    let n = 0;
    for (let i = 0; i < this.count; i++) if (this.has(i)) n++;
    return n;
  }
}

export interface StatusSource {
  readonly size: number;
  blockStatus(offset: number, length: number): Promise<Map<string, Extent[]>>;
}

/** Largest block status request: lengths are 32-bit, and chunk-aligned so extents stay whole. */
const STATUS_SPAN = 2 ** 31;

/**
 * The bitmaps of the granted contexts: a chunk is set when any extent with flag 1 touches
 * it (extents need not be chunk-aligned; rounding outwards only reads more).
 */
export async function contextBits(src: StatusSource, contexts: string[], chunkSize: number): Promise<Map<string, ChunkBits>> {
  const chunks = Math.ceil(src.size / chunkSize);
  const out = new Map(contexts.map((c) => [c, new ChunkBits(chunks)] as const));
  if (!contexts.length) return out;
  const covered = new Map(contexts.map((c) => [c, 0]));
  for (let offset = 0; offset < src.size; ) {
    const length = Math.min(STATUS_SPAN, src.size - offset);
    const reply = await src.blockStatus(offset, length);
    let next = src.size;
    for (const c of contexts) {
      let at = covered.get(c)!;
      if (at > offset) {
        next = Math.min(next, at);
        continue;
      }
      const extents = reply.get(c);
      if (!extents?.length) throw new Error(`the server returned no extents for ${c} at ${offset}`);
      const bits = out.get(c)!;
      for (const e of extents) {
        const end = Math.min(src.size, at + e.length);
        if (e.flags & 1) bits.setRange(Math.floor(at / chunkSize), Math.ceil(end / chunkSize));
        at = end;
        if (at >= src.size) break;
      }
      covered.set(c, at);
      next = Math.min(next, at);
    }
    if (next <= offset) throw new Error(`block status made no progress at ${offset}`);
    offset = next;
  }
  return out;
}
