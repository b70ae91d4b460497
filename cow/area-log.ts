// Appends one snapshot's exceptions to its chain of metadata areas. An area is one
// chunk: a 32-byte header (with the chunk already reserved for the next area, so a
// committed header is never rewritten) and 16-byte entries. Only the 4 KiB block being
// filled is kept in memory.
import { AREA_HEADER_BYTES, ENTRY_BYTES, META_BLOCK, encodeAreaHeader, encodeEntry, entriesPerArea, randomU32 } from './format.js';

export interface MetaWrite {
  offset: number;
  buf: Buffer;
}

export class AreaLog {
  readonly perArea: number;
  /** Current area, its sequence in the chain, nonce and entries it holds. */
  area: number;
  seq: number;
  nonce: number;
  count: number;
  /** Chunk reserved for the next area. */
  next: number;
  private block: Buffer;
  private blockIndex: number;
  private dirty = false;

  constructor(
    private readonly chunkSize: number,
    private readonly poolId: number,
    private readonly snapId: number,
    /** Allocates the chunk reserved for the area after next. */
    private readonly allocMeta: () => number,
    /** Records a new area in the snapshot's chain. */
    private readonly onNewArea: (chunk: number) => void,
    state: { area: number; seq: number; nonce: number; count: number; next: number; tail?: Buffer },
  ) {
    this.perArea = entriesPerArea(chunkSize);
    this.area = state.area;
    this.seq = state.seq;
    this.nonce = state.nonce;
    this.count = state.count;
    this.next = state.next;
    this.blockIndex = this.blockOf(this.count);
    this.block = state.tail ?? Buffer.alloc(META_BLOCK);
    if (this.count === 0 && this.nonce === 0) this.startArea(this.area, 0);
  }

  private blockOf(index: number): number {
    return Math.floor((AREA_HEADER_BYTES + index * ENTRY_BYTES) / META_BLOCK);
  }

  private startArea(area: number, seq: number): void {
    this.area = area;
    this.seq = seq;
    this.nonce = randomU32();
    this.count = 0;
    this.blockIndex = 0;
    this.block = Buffer.alloc(META_BLOCK);
    encodeAreaHeader({ snapId: this.snapId, seq, nonce: this.nonce, next: this.next, poolId: this.poolId }, this.block);
    this.dirty = true;
  }

  append(chunk: number, phys: number, out: MetaWrite[]): void {
    if (this.count === this.perArea) {
      this.finish(out);
      const area = this.next;
      this.next = this.allocMeta();
      this.onNewArea(area);
      this.startArea(area, this.seq + 1);
    }
    const b = this.blockOf(this.count);
    if (b !== this.blockIndex) {
      this.finish(out);
      this.blockIndex = b;
      this.block = Buffer.alloc(META_BLOCK);
    }
    const at = (AREA_HEADER_BYTES + this.count * ENTRY_BYTES) % META_BLOCK;
    encodeEntry(this.block, at, chunk, phys, this.nonce, this.count);
    this.count++;
    this.dirty = true;
  }

  /** Emits the block being filled if it changed; the caller writes it before appending again. */
  finish(out: MetaWrite[]): void {
    if (!this.dirty) return;
    out.push({ offset: this.area * this.chunkSize + this.blockIndex * META_BLOCK, buf: this.block });
    this.dirty = false;
  }
}
