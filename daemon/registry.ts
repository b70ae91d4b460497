// The exports the daemon offers, keyed by name, with one shared backend per
// volume so that every connection (multi-conn) sees the same file and FLUSH
// on any of them covers writes acknowledged on all of them.
import type { Backend, ExportInfo, ExportRegistry } from '../protocol/backend.js';
import type { ClientInfo } from '../protocol/tls.js';

export interface AccessPolicy {
  authorize(exportName: string, client: ClientInfo): boolean;
}

export class Registry implements ExportRegistry {
  private readonly exports = new Map<string, Backend>();
  /** Per export, one listener per connection in transmission: their count is the export's connections. */
  private readonly goneListeners = new Map<string, Set<() => Promise<void> | void>>();
  private readonly closedListeners = new Set<(exportName: string, connections: number) => void>();
  // Only origins may be the default: a client asking for "" wants the disk, never a snapshot of it.
  private readonly defaultCandidates = new Set<string>();
  /** Per-export client allow-lists (the config file's `exports`); none: every client may. */
  access?: AccessPolicy;

  /** `preferred` is the configured default; when it is absent the first origin by name stands in. */
  constructor(private readonly preferred: string | undefined = undefined) {}

  get default(): string | undefined {
    if (this.preferred !== undefined && this.defaultCandidates.has(this.preferred)) return this.preferred;
    return [...this.defaultCandidates].sort()[0];
  }

  add(backend: Backend, opts: { defaultCandidate?: boolean } = {}): void {
    this.exports.set(backend.info.name, backend);
    if (opts.defaultCandidate) this.defaultCandidates.add(backend.info.name);
  }

  /** Removes an export; resolves once the connections using it have closed (requests in flight answered). */
  async remove(name: string): Promise<void> {
    this.exports.delete(name);
    this.defaultCandidates.delete(name);
    const listeners = this.goneListeners.get(name);
    this.goneListeners.delete(name);
    await Promise.all([...(listeners ?? [])].map((l) => l()));
  }

  /** Connections in transmission on an export. */
  connections(name: string): number {
    return this.goneListeners.get(name)?.size ?? 0;
  }

  /** Told whenever a connection on an export closes, with the connections left on it. */
  onConnectionClosed(listener: (exportName: string, connections: number) => void): () => void {
    this.closedListeners.add(listener);
    return () => this.closedListeners.delete(listener);
  }

  backends(): Backend[] {
    return [...this.exports.values()];
  }

  private resolve(name: string): Backend | undefined {
    return this.exports.get(name === '' ? (this.default ?? '') : name);
  }

  list(): ExportInfo[] {
    return [...this.exports.values()].map((b) => b.info).sort((a, b) => a.name.localeCompare(b.name));
  }

  authorize(exportName: string, client: ClientInfo): boolean {
    return this.access ? this.access.authorize(exportName, client) : true;
  }

  info(name: string): ExportInfo | undefined {
    return this.resolve(name)?.info;
  }

  metaContexts(exportName: string, query: string): string[] {
    return this.resolve(exportName)?.metaContexts?.(query) ?? [];
  }

  open(name: string): Backend | undefined {
    const b = this.resolve(name);
    if (!b) return undefined;
    const exportName = b.info.name;
    // Each connection gets a thin handle so it can subscribe to removal of its export.
    const handle: Backend = Object.create(b, {
      onGone: {
        value: (listener: () => Promise<void> | void) => {
          let set = this.goneListeners.get(exportName);
          if (!set) {
            set = new Set();
            this.goneListeners.set(exportName, set);
          }
          set.add(listener);
          return () => {
            if (!set!.delete(listener)) return;
            const left = this.connections(exportName);
            for (const l of this.closedListeners) l(exportName, left);
          };
        },
      },
    });
    return handle;
  }
}
