// A backup's chunk table: for each chunk of the volume, its id or "zero". Only the non-zero chunks
// take memory (a sorted Uint32Array of indexes and one Buffer of 32-byte ids), so a large sparse
// volume costs what its data costs, not what its size costs.
import { BackupErrors } from './errors.js';
import { ID_BYTES } from './pack-format.js';

const FIRST_CAPACITY = 64;

export class ChunkTable {
  private indexes: Uint32Array;
  private ids: Buffer;
  private n = 0;

  constructor(
    readonly count: number,
    capacity = FIRST_CAPACITY,
  ) {
    if (!Number.isInteger(count) || count < 0 || count > 0xffffffff) throw BackupErrors.badChunkIndex(count, 0);
    const cap = Math.max(1, Math.min(capacity, count));
    this.indexes = new Uint32Array(cap);
    this.ids = Buffer.alloc(cap * ID_BYTES);
  }

  /** How many chunks have an id (are not zero). */
  get nonZero(): number {
    return this.n;
  }

  /** Sets chunk `index` to `id`. Ascending order appends; any other order inserts. */
  set(index: number, id: Buffer): void {
    if (!Number.isInteger(index) || index < 0 || index >= this.count) throw BackupErrors.badChunkIndex(index, this.count);
    if (id.length !== ID_BYTES) throw BackupErrors.badManifest(`a chunk id is ${ID_BYTES} bytes, not ${id.length}`);
    let at = this.n;
    if (this.n > 0 && this.indexes[this.n - 1]! >= index) {
      at = this.find(index);
      if (at < this.n && this.indexes[at] === index) {
        id.copy(this.ids, at * ID_BYTES);
        return;
      }
    }
    if (this.n === this.indexes.length) this.grow();
    if (at < this.n) {
      this.indexes.copyWithin(at + 1, at, this.n);
      this.ids.copyWithin((at + 1) * ID_BYTES, at * ID_BYTES, this.n * ID_BYTES);
    }
    this.indexes[at] = index;
    id.copy(this.ids, at * ID_BYTES);
    this.n++;
  }

  /** Makes chunk `index` zero again. */
  clear(index: number): void {
    const at = this.find(index);
    if (at >= this.n || this.indexes[at] !== index) return;
    this.indexes.copyWithin(at, at + 1, this.n);
    this.ids.copyWithin(at * ID_BYTES, (at + 1) * ID_BYTES, this.n * ID_BYTES);
    this.n--;
  }

  /** The id of chunk `index` (a view into the table: copy it to keep it), or undefined for a zero chunk. */
  get(index: number): Buffer | undefined {
    const at = this.find(index);
    if (at >= this.n || this.indexes[at] !== index) return undefined;
    return this.ids.subarray(at * ID_BYTES, (at + 1) * ID_BYTES);
  }

  /** The non-zero chunks in ascending index order; ids are views into the table. */
  *entries(): IterableIterator<[number, Buffer]> {
    for (let i = 0; i < this.n; i++) yield [this.indexes[i]!, this.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES)];
  }

  /** The table as stored: the indexes (u32 little-endian) then the ids. */
  encode(): Buffer {
    const out = Buffer.alloc(this.n * (4 + ID_BYTES));
    for (let i = 0; i < this.n; i++) out.writeUInt32LE(this.indexes[i]!, i * 4);
    this.ids.copy(out, this.n * 4, 0, this.n * ID_BYTES);
    return out;
  }

  /** The inverse of encode(); throws a plain Error naming what is wrong. */
  static decode(count: number, nonZero: number, body: Buffer): ChunkTable {
    if (body.length !== nonZero * (4 + ID_BYTES))
      throw new Error(`chunk table is ${body.length} bytes, ${nonZero} entries need ${nonZero * (4 + ID_BYTES)}`);
    const t = new ChunkTable(count, nonZero);
    let last = -1;
    for (let i = 0; i < nonZero; i++) {
      const index = body.readUInt32LE(i * 4);
      if (index <= last || index >= count) throw new Error(`chunk table entry ${i} (chunk ${index}) is out of order or past the volume`);
      t.indexes[i] = index;
      last = index;
    }
    body.copy(t.ids, 0, nonZero * 4);
    t.n = nonZero;
    return t;
  }

  private find(index: number): number {
    let lo = 0;
    let hi = this.n;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.indexes[mid]! < index) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private grow(): void {
    const cap = Math.min(this.count, this.indexes.length * 2);
    const indexes = new Uint32Array(cap);
    indexes.set(this.indexes);
    const ids = Buffer.alloc(cap * ID_BYTES);
    this.ids.copy(ids);
    this.indexes = indexes;
    this.ids = ids;
  }
}
