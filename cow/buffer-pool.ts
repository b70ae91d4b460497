// Reuses copy buffers on the COW hot path instead of allocating per chunk.

/**
 * New buffers start this far into their memory, as protocol/buffer-pool.ts's do: the
 * kernel's page-cache copy is slower into page-aligned memory (docs/tuning.md, SKEW).
 */
const SKEW = 256;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  /** Bytes on the free lists. */
  private bytes = 0;
  constructor(
    private readonly maxPerSize = 16,
    private readonly maxBytes = Infinity,
  ) {}

  /** Buffers handed out by get and not yet put back. */
  lent = 0;

  get(size: number): Buffer {
    this.lent++;
    const b = this.free.get(size)?.pop();
    if (!b) return Buffer.allocUnsafeSlow(size + SKEW).subarray(SKEW);
    this.bytes -= size;
    return b;
  }

  put(buf: Buffer): void {
    this.lent--;
    let list = this.free.get(buf.length);
    if (!list) {
      list = [];
      this.free.set(buf.length, list);
    }
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

/**
 * Chunk copy buffers, shared by every store: as many free as copies may be in flight,
 * bounded in bytes rather than per size or per store (docs/tuning.md, copyBuffers).
 */
export const copyBuffers = new BufferPool(Infinity, 32 << 20);

/** A shared read-only buffer of zeros. */
export const ZEROS = Buffer.alloc(1 << 20);
