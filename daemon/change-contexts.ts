// The daemon's change tracking as NBD meta contexts on a read-only snapshot's export,
// in the manner of qemu's qemu:dirty-bitmap:NAME: a third-party copier asks block
// status for them and reads only what they mark.
//   cowbd:allocated          flag 1: written before the snapshot (0 reads as zeros)
//   cowbd:changed-since:N    flag 1: written between checkpoint N and the snapshot
import type { Extent } from '../protocol/backend.js';
import type { ChangeTracker } from '../cow/index.js';

export const NAMESPACE = 'cowbd:';
export const ALLOCATED = 'cowbd:allocated';
const CHANGED = /^cowbd:changed-since:(0|[1-9]\d{0,9})$/;

export class ChangeContexts {
  private readonly cache = new Map<string, Promise<Uint8Array | undefined>>();

  constructor(
    private readonly tracker: ChangeTracker,
    /** The checkpoint the snapshot's creation made. */
    private readonly checkpoint: number,
    private readonly size: number,
  ) {}

  /** Checkpoints N for which cowbd:changed-since:N is exact. */
  private available(): number[] {
    const out: number[] = [];
    for (let n = this.checkpoint - 1; n >= 0 && n >= this.tracker.oldest; n--) out.push(n);
    return out;
  }

  metaContexts(query: string): string[] {
    if (query === '' || query === NAMESPACE) {
      return [...(this.tracker.trusted ? [ALLOCATED] : []), ...this.available().map((n) => `cowbd:changed-since:${n}`)];
    }
    if (query === ALLOCATED) return this.tracker.trusted ? [ALLOCATED] : [];
    const m = CHANGED.exec(query);
    if (m) {
      const n = Number(m[1]);
      return n < this.checkpoint && n >= this.tracker.oldest ? [query] : [];
    }
    return [];
  }

  /** The bitmap behind a context: immutable once the snapshot exists, so read once. */
  bits(context: string): Promise<Uint8Array | undefined> {
    const cached = this.cache.get(context);
    if (cached) return cached;
    const m = CHANGED.exec(context);
    const p = m ? this.tracker.changedBetween(Number(m[1]), this.checkpoint) : this.tracker.allocatedBefore(this.checkpoint);
    this.cache.set(context, p);
    return p;
  }

  async contextExtents(context: string, offset: number, length: number): Promise<Extent[]> {
    const bits = await this.bits(context);
    if (!bits) throw new Error(`${context} is no longer available`);
    return extentsOf(bits, this.tracker.chunkSize, this.size, offset, length);
  }
}

/** Runs of chunks with equal flags over [offset, offset+length), clipped to the volume, as extents. */
export function chunkExtents(
  flagsOf: (chunk: number) => number,
  chunkSize: number,
  size: number,
  offset: number,
  length: number,
): Extent[] {
  const end = Math.min(size, offset + length);
  const out: Extent[] = [];
  for (let at = offset; at < end; ) {
    const i = Math.floor(at / chunkSize);
    const next = Math.min(end, (i + 1) * chunkSize);
    const flags = flagsOf(i);
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += next - at;
    else out.push({ length: next - at, flags });
    at = next;
  }
  return out;
}

/** A bitmap's runs as extents with flag 0 or 1. */
export function extentsOf(bits: Uint8Array, chunkSize: number, size: number, offset: number, length: number): Extent[] {
  return chunkExtents((i) => (bits[i >>> 3]! >>> (i & 7)) & 1, chunkSize, size, offset, length);
}
