// Space in one store file, one byte per chunk: 0 free, 1..127 data chunk reference
// count (one per snapshot mapping it), or a fixed tag for metadata, header and chunks
// being freed. One byte a chunk is all the store-side memory an exception costs.

export const REF_FREE = 0;
export const REF_LIMBO = 253; // freed, waiting for durability or a hole punch before reuse
export const REF_META = 254;
export const REF_HEADER = 255;

export class Allocator {
  refs: Uint8Array;
  /** Chunks the file spans: allocation beyond it extends the file. */
  end: number;
  private freeCount = 0;
  private cursor: number;

  constructor(
    readonly firstChunk: number,
    end = firstChunk,
  ) {
    this.refs = new Uint8Array(Math.max(1024, end * 2));
    this.refs.fill(REF_HEADER, 0, firstChunk);
    this.end = Math.max(end, firstChunk);
    this.cursor = firstChunk;
  }

  private ensure(n: number): void {
    if (n <= this.refs.length) return;
    const next = new Uint8Array(Math.max(n, Math.floor(this.refs.length * 1.5)));
    next.set(this.refs);
    this.refs = next;
  }

  /** Rebuilds counters after replay has set refs directly. */
  recount(): void {
    let free = 0;
    for (let i = this.firstChunk; i < this.end; i++) if (this.refs[i] === REF_FREE) free++;
    this.freeCount = free;
  }

  markUsed(chunk: number, tag: number): void {
    this.ensure(chunk + 1);
    if (chunk >= this.end) this.end = chunk + 1;
    this.refs[chunk] = tag;
  }

  get freeChunks(): number {
    return this.freeCount;
  }

  /**
   * Allocates n chunks with the given initial tag, contiguous when possible: reused holes
   * first (so the file does not grow while space is free), then the end of the file.
   * Returns runs as [start, length] pairs flattened: [s0, n0, s1, n1, ...].
   */
  alloc(n: number, tag: number): number[] {
    const runs: number[] = [];
    let left = n;
    while (left > 0 && this.freeCount > 0) {
      let i = this.refs.indexOf(REF_FREE, this.cursor);
      if (i < 0 || i >= this.end) i = this.refs.indexOf(REF_FREE, this.firstChunk);
      if (i < 0 || i >= this.end) {
        this.freeCount = 0; // counter drifted; the scan is the truth
        break;
      }
      let j = i;
      while (j < this.end && left > 0 && this.refs[j] === REF_FREE) {
        this.refs[j] = tag;
        j++;
        left--;
        this.freeCount--;
      }
      runs.push(i, j - i);
      this.cursor = j;
    }
    if (left > 0) {
      this.ensure(this.end + left);
      this.refs.fill(tag, this.end, this.end + left);
      if (runs.length && runs[runs.length - 2]! + runs[runs.length - 1]! === this.end) runs[runs.length - 1]! += left;
      else runs.push(this.end, left);
      this.end += left;
    }
    return runs;
  }

  allocOne(tag: number): number {
    return this.alloc(1, tag)[0]!;
  }

  free(chunk: number): void {
    if (this.refs[chunk] === REF_FREE) return;
    this.refs[chunk] = REF_FREE;
    this.freeCount++;
    if (chunk < this.cursor) this.cursor = chunk;
  }

  /** Data chunk lost a reference; true when it has none left. */
  unref(chunk: number): boolean {
    const r = this.refs[chunk]!;
    if (r === 0 || r > 127) return false;
    this.refs[chunk] = r - 1;
    return r === 1;
  }

  /** Where the file could end: after the last chunk not free. */
  usedEnd(): number {
    let e = this.end;
    while (e > this.firstChunk && this.refs[e - 1] === REF_FREE) e--;
    return e;
  }

  /** The file now spans newEnd chunks: the new ones are free. */
  grow(newEnd: number): void {
    if (newEnd <= this.end) return;
    this.ensure(newEnd);
    this.refs.fill(REF_FREE, this.end, newEnd);
    this.freeCount += newEnd - this.end;
    this.end = newEnd;
  }

  /** Drops a free tail (after the file was truncated to newEnd). */
  shrinkTo(newEnd: number): void {
    for (let i = newEnd; i < this.end; i++) if (this.refs[i] === REF_FREE) this.freeCount--;
    this.refs.fill(REF_FREE, newEnd, this.end);
    this.end = newEnd;
    if (this.cursor > newEnd) this.cursor = newEnd;
  }

  get bytes(): number {
    return this.refs.length;
  }
}
