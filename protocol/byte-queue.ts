// Buffered input as a list of chunks, as ws's receiver keeps it: bytes are
// handed out as views of the socket's own buffers whenever a frame lies inside
// one chunk, and copied only when it spans several.

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position inside chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** Whether the next n bytes lie inside one chunk, so take(n) would not copy. */
  contiguous(n: number): boolean {
    const first = this.chunks[0];
    return first !== undefined && first.length - this.head >= n;
  }

  /** Takes n bytes (n <= length). A view when possible, else a fresh copy. */
  take(n: number): Buffer {
    if (n > this.total) throw new RangeError(`take(${n}) with only ${this.total} bytes buffered`);
    const first = this.chunks[0];
    if (first !== undefined && first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n);
    return out;
  }

  /** Copies n bytes into dst at dstOffset and consumes them. */
  copyOut(dst: Buffer, dstOffset: number, n: number): void {
    let copied = 0;
    while (copied < n) {
      const first = this.chunks[0]!;
      const m = Math.min(n - copied, first.length - this.head);
      first.copy(dst, dstOffset + copied, this.head, this.head + m);
      copied += m;
      this.advance(m);
    }
  }

  /** Discards up to n bytes; returns how many were discarded. */
  skip(n: number): number {
    const m = Math.min(n, this.total);
    let left = m;
    while (left > 0) {
      const avail = this.chunks[0]!.length - this.head;
      const k = Math.min(avail, left);
      this.advance(k);
      left -= k;
    }
    return m;
  }

  /**
   * Replaces the chunks that are views of `shared` with copies: the socket is
   * about to read into that memory again. Only unparsed leftovers are copied,
   * usually a partial header.
   */
  detach(shared: ArrayBufferLike): void {
    for (let i = 0; i < this.chunks.length; i++) {
      const c = this.chunks[i]!;
      if (c.buffer !== shared) continue;
      this.chunks[i] = Buffer.from(i === 0 ? c.subarray(this.head) : c);
      if (i === 0) this.head = 0;
    }
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }

  private advance(n: number): void {
    this.total -= n;
    this.head += n;
    while (this.chunks.length > 0 && this.head >= this.chunks[0]!.length) {
      this.head -= this.chunks[0]!.length;
      this.chunks.shift();
    }
  }
}
