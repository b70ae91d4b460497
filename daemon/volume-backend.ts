// A cow/ Volume (origin or snapshot) as an NBD backend: the operations table
// protocol/ drives. Descriptions are computed when asked, so NBD_OPT_LIST and
// NBD_OPT_INFO show a snapshot's current state and usage.
import { ALL_CAPABILITIES, type Backend, type Extent, type ExportInfo, type KeepPayload, type ZeroFlags } from '../protocol/backend.js';
import type { Volume } from '../cow/index.js';
import { MAX_POOLED_BYTES, sharedPool } from '../protocol/buffer-pool.js';
import { ALLOCATED, type ChangeContexts } from './change-contexts.js';
import { Errors } from './errors.js';

const CACHE_CHUNK = 4 * 1024 * 1024;
// Block status reads the data to find zeros (Node has no lseek(SEEK_HOLE), and a
// snapshot's holes are the origin's anyway). A reply may cover less than asked,
// so one request reads at most this much; clients ask again for the rest.
const STATUS_SCAN = 8 * 1024 * 1024;
const STATUS_BLOCK = 64 * 1024;
const ZEROS = Buffer.alloc(STATUS_BLOCK);
const STATE_HOLE_ZERO = 3;

export class VolumeBackend implements Backend {
  /**
   * Built once: every request reads it. The description is computed only when read
   * (LIST, INFO, GO): formatting a snapshot's usage per request is too costly for small
   * reads (docs/tuning.md, VolumeBackend.info).
   */
  readonly info: ExportInfo;

  constructor(
    readonly volume: Volume,
    describe: () => string,
    readOnly: boolean,
    /** A read-only snapshot's change-tracking contexts (change-contexts.ts). */
    private readonly changes?: ChangeContexts,
  ) {
    this.info = {
      name: volume.name,
      get description() {
        return describe();
      },
      get size() {
        return volume.size;
      },
      readOnly,
      // canFastZero is honoured by refusing: zeroing may have to copy chunks first, never fast.
      ...ALL_CAPABILITIES,
    };
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.volume.read(buf, offset);
  }

  pwrite(buf: Buffer, offset: number, fua: boolean, keep?: KeepPayload): Promise<void> {
    return this.volume.write(buf, offset, fua, keep);
  }

  flush(): Promise<void> {
    return this.volume.flush();
  }

  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.volume.discard(offset, length, fua);
  }

  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fast) return Promise.reject(Errors.zeroNotFast());
    return this.volume.writeZeroes(offset, length, flags.fua);
  }

  async cache(offset: number, length: number): Promise<void> {
    // Reading pulls the range into the page cache (and checks it is readable).
    const buf = Buffer.allocUnsafe(Math.min(CACHE_CHUNK, length));
    for (let at = 0; at < length; at += buf.length) {
      const n = Math.min(buf.length, length - at);
      await this.volume.read(n === buf.length ? buf : buf.subarray(0, n), offset + at);
    }
  }

  metaContexts(query: string): string[] {
    return this.changes?.metaContexts(query) ?? [];
  }

  contextExtents(context: string, offset: number, length: number): Promise<Extent[]> {
    if (!this.changes) return Promise.reject(Errors.internal(`no context ${context}`));
    return this.changes.contextExtents(context, offset, length);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    // Chunks never written read as zeros: answered from the change tracking, unread.
    const allocated = this.changes?.metaContexts(ALLOCATED).length
      ? await this.changes.contextExtents(ALLOCATED, offset, length)
      : undefined;
    const first = allocated?.[0];
    if (first && first.flags === 0) return [{ length: first.length, flags: STATE_HOLE_ZERO }];
    return this.scan(offset, first ? first.length : length);
  }

  private async scan(offset: number, length: number): Promise<Extent[]> {
    const span = Math.min(length, STATUS_SCAN);
    const out: Extent[] = [];
    // Read in pooled pieces: a fresh buffer per request was up to 8 MiB of new memory
    // (page faults, and GC pressure as external memory) for every query of a client
    // walking the volume.
    const buf = sharedPool.get(Math.min(span, MAX_POOLED_BYTES));
    try {
      for (let base = 0; base < span; base += buf.length) {
        const n = Math.min(buf.length, span - base);
        const piece = n === buf.length ? buf : buf.subarray(0, n);
        await this.volume.read(piece, offset + base);
        // Blocks follow absolute 64 KiB boundaries, so the answer does not depend on how the client slices its queries.
        for (let at = 0; at < n; ) {
          const end = Math.min(n, at + STATUS_BLOCK - ((offset + base + at) % STATUS_BLOCK));
          const flags = piece.subarray(at, end).equals(ZEROS.subarray(0, end - at)) ? STATE_HOLE_ZERO : 0;
          const last = out[out.length - 1];
          if (last && last.flags === flags) last.length += end - at;
          else out.push({ length: end - at, flags });
          at = end;
        }
      }
    } finally {
      sharedPool.put(buf);
    }
    return out;
  }
}
