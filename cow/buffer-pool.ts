// Reuses copy buffers on the COW hot path instead of allocating per chunk.
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  constructor(private readonly maxPerSize = 16) {}

  get(size: number): Buffer {
    const list = this.free.get(size);
    return list?.pop() ?? Buffer.allocUnsafe(size);
  }

  put(buf: Buffer): void {
    let list = this.free.get(buf.length);
    if (!list) this.free.set(buf.length, (list = []));
    if (list.length < this.maxPerSize) list.push(buf);
  }
}

/** A shared read-only buffer of zeros. */
export const ZEROS = Buffer.alloc(1 << 20);
