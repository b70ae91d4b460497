// A plain volume file as an NBD backend: the storage operations table that
// protocol/ drives, like nbdkit's file plugin.
import { open, close, fstat } from 'node:fs';
import { promisify } from 'node:util';
import type { Backend, Extent, ExportInfo, ZeroFlags } from '../protocol/backend.js';
import { datasync, fallocate, preadFull, pwriteFull } from './fileio.js';
import { GroupSync } from './group-sync.js';

const openP = promisify(open);
const closeP = promisify(close);
const fstatP = promisify(fstat);

/** Below this, zeroing by writing is cheaper than spawning fallocate. */
const FALLOCATE_MIN = 1024 * 1024;
const ZERO_CHUNK = Buffer.alloc(1024 * 1024);
const CACHE_CHUNK = 4 * 1024 * 1024;

export interface FileVolumeOptions {
  name: string;
  description: string;
  readOnly: boolean;
}

export class FileVolume implements Backend {
  readonly info: ExportInfo;
  private readonly syncer: GroupSync;
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    size: number,
    opts: FileVolumeOptions,
  ) {
    this.info = {
      name: opts.name,
      description: opts.description,
      size,
      readOnly: opts.readOnly,
      canFlush: true,
      canFua: true,
      canTrim: true,
      canZero: true,
      canFastZero: true,
      canCache: true,
      canMultiConn: true,
    };
    this.syncer = new GroupSync(() => datasync(fd));
  }

  static async open(path: string, opts: FileVolumeOptions): Promise<FileVolume> {
    const fd = await openP(path, opts.readOnly ? 'r' : 'r+');
    try {
      const st = await fstatP(fd);
      return new FileVolume(path, fd, st.size, opts);
    } catch (err) {
      await closeP(fd);
      throw err;
    }
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return preadFull(this.fd, buf, offset);
  }

  async pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    await pwriteFull(this.fd, buf, offset);
    if (fua) await this.syncer.sync();
  }

  flush(): Promise<void> {
    return this.syncer.sync();
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    // A trimmed range may read back as old data or zeros, so small trims are simply ignored.
    if (length >= FALLOCATE_MIN) await fallocate(this.path, 'punch', offset, length).catch(() => undefined);
    if (fua) await this.syncer.sync();
  }

  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    let done = false;
    if (flags.fast || length >= FALLOCATE_MIN) {
      try {
        await fallocate(this.path, flags.mayTrim ? 'punch' : 'zero', offset, length);
        done = true;
      } catch (err) {
        if (flags.fast) throw err;
      }
    }
    if (!done) {
      for (let at = 0; at < length; at += ZERO_CHUNK.length) {
        const n = Math.min(ZERO_CHUNK.length, length - at);
        await pwriteFull(this.fd, n === ZERO_CHUNK.length ? ZERO_CHUNK : ZERO_CHUNK.subarray(0, n), offset + at);
      }
    }
    if (flags.fua) await this.syncer.sync();
  }

  async cache(offset: number, length: number): Promise<void> {
    // Reading pulls the range into the page cache, which is what a client asks of CACHE.
    const buf = Buffer.allocUnsafe(Math.min(CACHE_CHUNK, length));
    for (let at = 0; at < length; at += buf.length) {
      const n = Math.min(buf.length, length - at);
      await preadFull(this.fd, n === buf.length ? buf : buf.subarray(0, n), offset + at);
    }
  }

  async extents(_offset: number, length: number): Promise<Extent[]> {
    // Without lseek(SEEK_HOLE) in Node we cannot see holes: everything is reported
    // as data, which the spec allows (it is always a safe answer).
    return [{ length, flags: 0 }];
  }

  /** Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await closeP(this.fd);
  }
}
