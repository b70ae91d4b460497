// Reusable read buffers in power-of-two size classes, so the read path does not
// allocate a fresh ArrayBuffer per request. Each class keeps a bounded free list.

const MIN_SHIFT = 12; // 4 KiB
const MAX_SHIFT = 22; // 4 MiB: larger buffers are allocated and left to the GC
/** The largest buffer the pool keeps: larger ones are allocated per request. */
export const MAX_POOLED_BYTES = 1 << MAX_SHIFT;
/** Free bytes each class keeps at least; more while more were out at once (see put). */
const PER_CLASS_BYTES = 16 * 1024 * 1024;
/**
 * Buffers start this far into their memory, off the page boundary: the kernel's copy
 * from the page cache suffers when source and destination share their offset within a
 * page, and a large malloc is page-aligned plus a small header (docs/tuning.md, SKEW).
 */
const SKEW = 256;
/**
 * How long after every buffer came back the pool still keeps as many free as were out
 * at the peak: bursts follow one another, and fresh memory is costly (docs/tuning.md,
 * KEEP_FREE_MS).
 */
const KEEP_FREE_MS = 15_000;

export class BufferPool {
  private readonly free: Buffer[][] = [];
  /** Bytes of each class handed out by get() and not yet given back. */
  private readonly out: number[] = [];
  /** The most bytes of each class out at once since the pool was last idle. */
  private readonly outPeak: number[] = [];
  private outTotal = 0;
  private trimTimer: NodeJS.Timeout | undefined;

  constructor(private readonly keepFreeMs = KEEP_FREE_MS) {
    for (let s = MIN_SHIFT; s <= MAX_SHIFT; s++) {
      this.free.push([]);
      this.out.push(0);
      this.outPeak.push(0);
    }
  }

  /** A buffer of exactly n bytes (a view of a pooled one when n fits a class). Contents are undefined. */
  get(n: number): Buffer {
    const cls = classOf(n);
    if (cls < 0) return Buffer.allocUnsafeSlow(n);
    const list = this.free[cls]!;
    const size = 1 << (cls + MIN_SHIFT);
    const b = list.pop() ?? Buffer.allocUnsafeSlow(size + SKEW).subarray(SKEW);
    this.out[cls]! += size;
    this.outTotal += size;
    if (this.out[cls]! > this.outPeak[cls]!) this.outPeak[cls] = this.out[cls]!;
    if (this.trimTimer) {
      clearTimeout(this.trimTimer);
      this.trimTimer = undefined;
    }
    return b.length === n ? b : b.subarray(0, n);
  }

  /**
   * Returns a buffer obtained from get(); it must no longer be in use. The class keeps it
   * while it holds fewer free bytes than were out at once: many connections' requests in
   * flight would otherwise free and allocate buffers in turn, and the external memory
   * churn keeps V8 in major collections (docs/tuning.md, KEEP_FREE_MS).
   */
  put(b: Buffer): void {
    const cls = pooledClass(b);
    if (cls < 0) return;
    const size = 1 << (cls + MIN_SHIFT);
    if (this.out[cls]! >= size) {
      this.out[cls]! -= size;
      this.outTotal -= size;
    }
    const list = this.free[cls]!;
    if ((list.length + 1) * size <= Math.max(PER_CLASS_BYTES, this.outPeak[cls]!)) list.push(Buffer.from(b.buffer, SKEW, size));
    if (this.outTotal === 0 && !this.trimTimer) this.trimTimer = setTimeout(() => this.trim(), this.keepFreeMs).unref();
  }

  /**
   * A buffer from get() is taken over past its request (KeepPayload): the returned
   * function gives it back, once however often it is called.
   */
  keep(b: Buffer): () => void {
    let back = false;
    return () => {
      if (back) return;
      back = true;
      this.put(b);
    };
  }

  /** Back to the usual bound on free buffers once the pool has been idle for a while. */
  trim(): void {
    clearTimeout(this.trimTimer);
    this.trimTimer = undefined;
    for (let c = 0; c < this.free.length; c++) {
      this.outPeak[c] = this.out[c]!;
      const keepN = Math.floor(Math.max(PER_CLASS_BYTES, this.out[c]!) / (1 << (c + MIN_SHIFT)));
      if (this.free[c]!.length > keepN) this.free[c]!.length = keepN;
    }
  }

  /** Bytes on the free lists (read by the tests). */
  get freeBytes(): number {
    let n = 0;
    for (let c = 0; c < this.free.length; c++) n += this.free[c]!.length << (c + MIN_SHIFT);
    return n;
  }
}

/** The size class of a buffer get() handed out, or -1 for one the pool did not make. */
function pooledClass(b: Buffer): number {
  if (b.byteOffset !== SKEW) return -1;
  const size = b.buffer.byteLength - SKEW;
  const cls = classOf(size);
  return cls >= 0 && size === 1 << (cls + MIN_SHIFT) ? cls : -1;
}

function classOf(n: number): number {
  if (n > MAX_POOLED_BYTES) return -1;
  let s = MIN_SHIFT;
  while (1 << s < n) s++;
  return s - MIN_SHIFT;
}

export const sharedPool = new BufferPool();
