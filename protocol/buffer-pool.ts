// Reusable read buffers in power-of-two size classes, so the read path does not
// allocate a fresh ArrayBuffer per request. Each class keeps a bounded free list.

const MIN_SHIFT = 12; // 4 KiB
const MAX_SHIFT = 22; // 4 MiB: larger buffers are allocated and left to the GC
const PER_CLASS_BYTES = 16 * 1024 * 1024;

export class BufferPool {
  private readonly free: Buffer[][] = [];

  constructor() {
    for (let s = MIN_SHIFT; s <= MAX_SHIFT; s++) this.free.push([]);
  }

  /** A buffer of exactly n bytes (a view of a pooled one when n fits a class). Contents are undefined. */
  get(n: number): Buffer {
    const cls = classOf(n);
    if (cls < 0) return Buffer.allocUnsafeSlow(n);
    const list = this.free[cls]!;
    const b = list.pop() ?? Buffer.allocUnsafeSlow(1 << (cls + MIN_SHIFT));
    return b.length === n ? b : b.subarray(0, n);
  }

  /** Returns a buffer obtained from get(); it must no longer be in use. */
  put(b: Buffer): void {
    if (b.byteOffset !== 0) return;
    const full = Buffer.from(b.buffer, 0, b.buffer.byteLength);
    const cls = classOf(full.length);
    if (cls < 0 || full.length !== 1 << (cls + MIN_SHIFT)) return;
    const list = this.free[cls]!;
    if ((list.length + 1) * full.length <= PER_CLASS_BYTES) list.push(full);
  }
}

function classOf(n: number): number {
  if (n > 1 << MAX_SHIFT) return -1;
  let s = MIN_SHIFT;
  while (1 << s < n) s++;
  return s - MIN_SHIFT;
}

export const sharedPool = new BufferPool();
