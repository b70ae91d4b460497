// Reuses copy buffers on the COW hot path instead of allocating per chunk.
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  /** Bytes on the free lists. */
  private bytes = 0;
  constructor(
    private readonly maxPerSize = 16,
    private readonly maxBytes = Infinity,
  ) {}

  get(size: number): Buffer {
    const b = this.free.get(size)?.pop();
    if (!b) return Buffer.allocUnsafe(size);
    this.bytes -= size;
    return b;
  }

  put(buf: Buffer): void {
    let list = this.free.get(buf.length);
    if (!list) this.free.set(buf.length, (list = []));
    if (list.length >= this.maxPerSize || this.bytes + buf.length > this.maxBytes) return;
    list.push(buf);
    this.bytes += buf.length;
  }

  /** Drops every free buffer. */
  trim(): void {
    this.free.clear();
    this.bytes = 0;
  }
}

/** A shared read-only buffer of zeros. */
export const ZEROS = Buffer.alloc(1 << 20);
