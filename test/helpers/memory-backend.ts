// An in-memory Backend and registry for protocol tests: no files involved.
import {
  ALL_CAPABILITIES,
  type Backend,
  type ExportInfo,
  type ExportRegistry,
  type Extent,
  type KeepPayload,
  type ZeroFlags,
} from '../../protocol/backend.js';

export class MemoryBackend implements Backend {
  readonly info: ExportInfo;
  readonly data: Buffer;
  flushes = 0;
  /** Set to an errno code to make the next operations fail. */
  failWith?: string;

  constructor(name: string, size: number, readOnly = false) {
    this.data = Buffer.alloc(size);
    this.info = {
      name,
      description: `memory ${name}`,
      size,
      readOnly,
      ...ALL_CAPABILITIES,
    };
  }

  private check(): void {
    if (this.failWith) throw Object.assign(new Error(`injected ${this.failWith}`), { code: this.failWith });
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.check();
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  async pwrite(buf: Buffer, offset: number, _fua?: boolean, _keep?: KeepPayload): Promise<void> {
    this.check();
    buf.copy(this.data, offset);
  }
  async flush(): Promise<void> {
    this.check();
    this.flushes++;
  }
  async trim(offset: number, length: number): Promise<void> {
    this.check();
    this.data.fill(0, offset, offset + length);
  }
  async zero(offset: number, length: number, _flags: ZeroFlags): Promise<void> {
    this.check();
    this.data.fill(0, offset, offset + length);
  }
  async cache(): Promise<void> {
    this.check();
  }
  async extents(_offset: number, length: number): Promise<Extent[]> {
    this.check();
    const half = Math.max(1, Math.floor(length / 2));
    return [
      { length: half, flags: 0 },
      { length: length - half, flags: 3 },
    ].filter((e) => e.length > 0);
  }
}

export class MemoryRegistry implements ExportRegistry {
  constructor(readonly backends: MemoryBackend[]) {}
  list(): ExportInfo[] {
    return this.backends.map((b) => b.info);
  }
  info(name: string): ExportInfo | undefined {
    return this.find(name)?.info;
  }
  open(name: string): Backend | undefined {
    return this.find(name);
  }
  private find(name: string): MemoryBackend | undefined {
    return name === '' ? this.backends[0] : this.backends.find((b) => b.info.name === name);
  }
}
