// The exception map of one snapshot: origin chunk -> store chunk, as an open-addressing
// hash table in two Uint32Arrays (8 bytes a slot). Growing by 1.5x at 85% load keeps the
// load factor in [0.567, 0.85], so a map costs at most 8 / 0.567 = 14.1 bytes per
// exception, whatever the pattern (dm-snapshot uses a list_head hash of kmalloc'd
// exceptions: ~48 bytes each). Keys are origin chunk numbers < 2^32 - 1.

const EMPTY = 0xffffffff;
const MAX_LOAD = 0.85;
const GROWTH = 1.5;

/** get() result for an absent key. */
export const ABSENT = -1;

function hash32(k: number): number {
  let h = Math.imul(k ^ (k >>> 16), 0x7feb352d);
  h = Math.imul(h ^ (h >>> 15), 0x846ca68b);
  return (h ^ (h >>> 16)) >>> 0;
}

export class ChunkMap {
  private keys: Uint32Array;
  private vals: Uint32Array;
  private cap: number;
  private count = 0;
  private limit: number;

  constructor(capacity = 16) {
    this.cap = Math.max(8, capacity);
    this.keys = new Uint32Array(this.cap).fill(EMPTY);
    this.vals = new Uint32Array(this.cap);
    this.limit = Math.floor(this.cap * MAX_LOAD);
  }

  get size(): number {
    return this.count;
  }

  /** Bytes held by the table's arrays. */
  get bytes(): number {
    return this.cap * 8;
  }

  private home(key: number): number {
    // Multiply-shift range reduction: any table size works, not just powers of two.
    return Math.min(this.cap - 1, Math.floor((hash32(key) * this.cap) / 4294967296));
  }

  get(key: number): number {
    const keys = this.keys;
    const cap = this.cap;
    let i = this.home(key);
    for (;;) {
      const k = keys[i]!;
      if (k === key) return this.vals[i]!;
      if (k === EMPTY) return ABSENT;
      if (++i === cap) i = 0;
    }
  }

  has(key: number): boolean {
    return this.get(key) !== ABSENT;
  }

  set(key: number, val: number): void {
    const keys = this.keys;
    const cap = this.cap;
    let i = this.home(key);
    for (;;) {
      const k = keys[i]!;
      if (k === key) {
        this.vals[i] = val;
        return;
      }
      if (k === EMPTY) break;
      if (++i === cap) i = 0;
    }
    if (this.count + 1 > this.limit) {
      this.grow();
      this.set(key, val);
      return;
    }
    keys[i] = key;
    this.vals[i] = val;
    this.count++;
  }

  delete(key: number): boolean {
    const keys = this.keys;
    const cap = this.cap;
    let i = this.home(key);
    for (;;) {
      const k = keys[i]!;
      if (k === EMPTY) return false;
      if (k === key) break;
      if (++i === cap) i = 0;
    }
    // Backward-shift deletion keeps probe chains intact without tombstones.
    let j = i;
    for (;;) {
      if (++j === cap) j = 0;
      const k = keys[j]!;
      if (k === EMPTY) break;
      const h = this.home(k);
      const movable = i <= j ? h <= i || h > j : h <= i && h > j;
      if (movable) {
        keys[i] = k;
        this.vals[i] = this.vals[j]!;
        i = j;
      }
    }
    keys[i] = EMPTY;
    this.count--;
    return true;
  }

  forEach(fn: (key: number, val: number) => void): void {
    const keys = this.keys;
    for (let i = 0; i < this.cap; i++) if (keys[i] !== EMPTY) fn(keys[i]!, this.vals[i]!);
  }

  /** Sizes the table for n entries at once (replay), so growth leaves no garbage behind. */
  reserve(n: number): void {
    if (n > this.limit) this.grow(Math.ceil(n / 0.8));
  }

  private grow(to = Math.ceil(this.cap * GROWTH)): void {
    const oldKeys = this.keys;
    const oldVals = this.vals;
    this.cap = to;
    this.keys = new Uint32Array(this.cap).fill(EMPTY);
    this.vals = new Uint32Array(this.cap);
    this.limit = Math.floor(this.cap * MAX_LOAD);
    this.count = 0;
    for (let i = 0; i < oldKeys.length; i++) {
      const k = oldKeys[i]!;
      if (k !== EMPTY) this.set(k, oldVals[i]!);
    }
  }
}
