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
  /** Set: the backend offers EVEN_CONTEXT, chunks of this many bytes whose flags alternate. */
  contextChunk?: number;
  /** Set to an errno code to make EVEN_CONTEXT's extents fail (base:allocation still works). */
  contextFailWith?: string;

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

  metaContexts(query: string): string[] {
    if (this.contextChunk === undefined) return [];
    return query === '' || query === 'test:' || query === EVEN_CONTEXT ? [EVEN_CONTEXT] : [];
  }
  /** EVEN_CONTEXT: flag 1 on even-numbered chunks, 0 on odd ones. */
  async contextExtents(context: string, offset: number, length: number): Promise<Extent[]> {
    if (this.contextFailWith) throw Object.assign(new Error(`injected ${this.contextFailWith}`), { code: this.contextFailWith });
    if (context !== EVEN_CONTEXT || this.contextChunk === undefined)
      throw Object.assign(new Error(`no context ${context}`), { code: 'EINVAL' });
    const chunk = this.contextChunk;
    const out: Extent[] = [];
    for (let at = offset; at < offset + length; ) {
      const index = Math.floor(at / chunk);
      const end = Math.min((index + 1) * chunk, offset + length);
      out.push({ length: end - at, flags: index % 2 === 0 ? 1 : 0 });
      at = end;
    }
    return out;
  }
}

/** The meta context a MemoryBackend with contextChunk offers. */
export const EVEN_CONTEXT = 'test:even';

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
  metaContexts(exportName: string, query: string): string[] {
    return this.find(exportName)?.metaContexts(query) ?? [];
  }
  private find(name: string): MemoryBackend | undefined {
    return name === '' ? this.backends[0] : this.backends.find((b) => b.info.name === name);
  }
}
