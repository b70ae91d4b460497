// A verified load: many connections with many requests in flight each, reads and
// writes on an origin and on snapshots taken and removed while it runs. Every read
// is checked against a model. Connections own disjoint block ranges, so the model
// is exact: a block holds the version last acknowledged on it, and a snapshot
// holds the origin's versions at its creation. Only writes in flight while a
// snapshot is being taken are ambiguous (they may land on either side of it); the
// model allows either version until a read settles it.
import { call } from '../../daemon/control-client.js';
import { NbdClient, NbdError, now, percentiles } from '../helpers/nbd-client.js';
import { mib, sample, type ProcSample } from '../helpers/proc.js';
import { Rng } from '../fuzz/fuzzer.js';

export const BLOCK = 4096;
const MAGIC = 0xc0ffee42;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Fill patterns for the body of a block, one per byte value. */
const BODIES = Array.from({ length: 256 }, (_, i) => Buffer.alloc(BLOCK - 16, i));
const ZERO_BLOCK = Buffer.alloc(BLOCK);

function fillOf(block: number, version: number): number {
  return (Math.imul(block, 31) + Math.imul(version, 17)) & 0xff;
}

/** The content of a block at a version; version 0 is never written: zeros. */
export function writeBlock(dst: Buffer, at: number, block: number, version: number): void {
  dst.writeUInt32BE(MAGIC, at);
  dst.writeUInt32BE(block >>> 0, at + 4);
  dst.writeUInt32BE(version >>> 0, at + 8);
  dst.writeUInt32BE((block ^ version ^ MAGIC) >>> 0, at + 12);
  BODIES[fillOf(block, version)]!.copy(dst, at + 16);
}

function blockMatches(buf: Buffer, at: number, block: number, version: number): boolean {
  if (version === 0) return buf.compare(ZERO_BLOCK, 0, BLOCK, at, at + BLOCK) === 0;
  return (
    buf.readUInt32BE(at) === MAGIC &&
    buf.readUInt32BE(at + 4) === block >>> 0 &&
    buf.readUInt32BE(at + 8) === version >>> 0 &&
    buf.compare(BODIES[fillOf(block, version)]!, 0, BLOCK - 16, at + 16, at + BLOCK) === 0
  );
}

function describeBlock(buf: Buffer, at: number): string {
  if (buf.compare(ZERO_BLOCK, 0, BLOCK, at, at + BLOCK) === 0) return 'zeros';
  if (buf.readUInt32BE(at) !== MAGIC) return `garbage ${buf.subarray(at, at + 8).toString('hex')}`;
  return `block ${buf.readUInt32BE(at + 4)} version ${buf.readUInt32BE(at + 8)}`;
}

/** Versions every block of one export holds, as far as acknowledged replies say. */
class ExportModel {
  readonly versions: Uint32Array;
  /** Blocks whose content may be any of several versions (writes racing a snapshot). */
  readonly alt = new Map<number, Set<number>>();
  /** Blocks with a request in flight, and the version a write in flight carries. */
  readonly busy: Uint8Array;
  readonly writing = new Map<number, number>();

  constructor(
    readonly name: string,
    blocks: number,
    from?: ExportModel,
  ) {
    this.versions = from ? from.versions.slice() : new Uint32Array(blocks);
    this.busy = new Uint8Array(blocks);
  }
}

export interface LoadOptions {
  host: string;
  port: number;
  dataDir: string;
  /** The daemon, for RSS and fd samples. */
  pid: number;
  origin: string;
  originSize: number;
  seconds: number;
  connections: number;
  depth: number;
  /** How many of the connections serve the current snapshot. */
  snapshotConnections: number;
  /** A new snapshot every this many ms; the previous one is removed. */
  snapshotEveryMs: number;
  seed?: number;
  log?: (line: string) => void;
}

export interface LoadResult {
  elapsedMs: number;
  ops: number;
  reads: number;
  writes: number;
  flushes: number;
  /** Reads of snapshots, each checked against the origin as it was when the snapshot was taken. */
  snapshotReads: number;
  /** Blocks written while a snapshot was taken whose content a read then settled. */
  ambiguousSettled: number;
  bytesRead: number;
  bytesWritten: number;
  /** Reads that returned data the model does not allow. */
  verifyFailures: string[];
  /** Error replies and connections lost unexpectedly. */
  errors: string[];
  snapshotsCreated: number;
  snapshotsRemoved: number;
  /** How long taking a snapshot took under the load (control API round trip). */
  snapshotCreateMs: ReturnType<typeof percentiles>;
  /** Blocks read back and checked after the run (origin and the last snapshot). */
  finalBlocksChecked: number;
  latency: { all: ReturnType<typeof percentiles>; read: ReturnType<typeof percentiles>; write: ReturnType<typeof percentiles> };
  samples: (ProcSample & { t: number; ops: number })[];
  before: ProcSample;
  after: ProcSample;
}

class Lat {
  private a = new Float64Array(1 << 16);
  n = 0;
  push(v: number): void {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = v;
  }
  values(): Float64Array {
    return this.a.subarray(0, this.n);
  }
}

export async function runLoad(o: LoadOptions): Promise<LoadResult> {
  const log = o.log ?? (() => undefined);
  const rng = new Rng(o.seed ?? 1, 0x10ad);
  const blocks = Math.floor(o.originSize / BLOCK);
  const origin = new ExportModel(o.origin, blocks);
  let version = 1;
  const stats = { ops: 0, reads: 0, writes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0, snapshotReads: 0, ambiguousSettled: 0 };
  const lat = { all: new Lat(), read: new Lat(), write: new Lat() };
  const verifyFailures: string[] = [];
  const errors: string[] = [];
  /** The snapshot being created: origin writes issued meanwhile are ambiguous in it. */
  let creating: ExportModel | undefined;

  const fail = (list: string[], msg: string) => {
    if (list.length < 50) list.push(msg);
    else if (list.length === 50) list.push('... (more)');
  };

  class Worker {
    stopping = false;
    private lanes: Promise<void>[] = [];
    private readonly r: Rng;
    constructor(
      readonly client: NbdClient,
      readonly model: ExportModel,
      readonly lo: number,
      readonly hi: number,
      seed: number,
    ) {
      this.r = new Rng(seed, 0x1a2e);
    }

    start(depth: number): void {
      this.lanes = Array.from({ length: depth }, () => this.lane());
    }

    /** Stops issuing; resolves once every request in flight is answered. */
    async stop(): Promise<void> {
      this.stopping = true;
      await Promise.all(this.lanes);
    }

    /** A free range of at most `len` blocks (shorter after collisions), or undefined. */
    private pick(len: number): { start: number; len: number } | undefined {
      const span = this.hi - this.lo;
      for (let tries = 0; tries < 8; tries++) {
        const n = Math.min(len, span);
        const start = this.lo + this.r.int(span - n + 1);
        let free = true;
        for (let b = start; b < start + n; b++)
          if (this.model.busy[b]) {
            free = false;
            break;
          }
        if (free) return { start, len: n };
        if (tries >= 3) len = Math.max(1, len >> 1);
      }
      return undefined;
    }

    private async lane(): Promise<void> {
      while (!this.stopping) {
        const kind = this.r.int(100);
        if (kind < 2) {
          await this.timed('flush', () => this.client.flush());
          stats.flushes++;
          continue;
        }
        const range = this.pick(this.r.pick([1, 1, 2, 4, 8, 16, 16, 32, 64]));
        if (!range) {
          await new Promise((r) => setImmediate(r));
          continue;
        }
        const { start, len } = range;
        const m = this.model;
        for (let b = start; b < start + len; b++) m.busy[b] = 1;
        try {
          if (kind < 52) await this.read(start, len);
          else await this.write(start, len, kind >= 97);
        } finally {
          for (let b = start; b < start + len; b++) m.busy[b] = 0;
        }
      }
    }

    private async timed<T>(what: 'read' | 'write' | 'flush', f: () => Promise<T>): Promise<T | undefined> {
      const t0 = now();
      try {
        const v = await f();
        const ms = now() - t0;
        lat.all.push(ms);
        if (what !== 'flush') lat[what].push(ms);
        stats.ops++;
        return v;
      } catch (err) {
        if (!(this.stopping && !(err instanceof NbdError))) fail(errors, `${this.model.name}: ${what}: ${String(err)}`);
        this.stopping = true;
        return undefined;
      }
    }

    async read(start: number, len: number): Promise<boolean> {
      const buf = await this.timed('read', () => this.client.read(start * BLOCK, len * BLOCK));
      if (!buf) return false;
      stats.reads++;
      stats.bytesRead += buf.length;
      const m = this.model;
      if (m !== origin) stats.snapshotReads++;
      for (let i = 0; i < len; i++) {
        const b = start + i;
        const alt = m.alt.get(b);
        if (alt) {
          const hit = [...alt].find((v) => blockMatches(buf, i * BLOCK, b, v));
          if (hit === undefined) {
            fail(
              verifyFailures,
              `${m.name}: block ${b}: found ${describeBlock(buf, i * BLOCK)}, expected one of versions ${[...alt].join(',')}`,
            );
          } else {
            m.versions[b] = hit;
            m.alt.delete(b);
            stats.ambiguousSettled++;
          }
        } else if (!blockMatches(buf, i * BLOCK, b, m.versions[b]!)) {
          fail(verifyFailures, `${m.name}: block ${b}: found ${describeBlock(buf, i * BLOCK)}, expected version ${m.versions[b]}`);
        }
      }
      return true;
    }

    private async write(start: number, len: number, fua: boolean): Promise<void> {
      const m = this.model;
      const buf = Buffer.allocUnsafe(len * BLOCK);
      const vs: number[] = [];
      for (let i = 0; i < len; i++) {
        const v = version++;
        vs.push(v);
        writeBlock(buf, i * BLOCK, start + i, v);
        m.writing.set(start + i, v);
        if (creating && m === origin) ambiguous(creating, start + i, v);
      }
      const ok = await this.timed('write', () => this.client.write(start * BLOCK, buf, fua).then(() => true));
      for (let i = 0; i < len; i++) m.writing.delete(start + i);
      if (!ok) return;
      stats.writes++;
      stats.bytesWritten += buf.length;
      for (let i = 0; i < len; i++) {
        m.versions[start + i] = vs[i]!;
        m.alt.delete(start + i);
      }
    }

    /** Reads back the whole range after the run. */
    async verifyAll(): Promise<number> {
      let checked = 0;
      for (let b = this.lo; b < this.hi && !this.stopping; b += 64) {
        const n = Math.min(64, this.hi - b);
        if (!(await this.read(b, n))) break;
        checked += n;
      }
      return checked;
    }
  }

  function ambiguous(snap: ExportModel, b: number, v: number): void {
    let set = snap.alt.get(b);
    if (!set) {
      set = new Set([snap.versions[b]!]);
      snap.alt.set(b, set);
    }
    set.add(v);
  }

  const connect = (name: string) => NbdClient.connect({ host: o.host, port: o.port, exportName: name });
  const partition = (n: number, i: number) => [Math.floor((blocks * i) / n), Math.floor((blocks * (i + 1)) / n)] as const;

  const before = sample(o.pid);
  const originConns = o.connections - o.snapshotConnections;
  const originWorkers: Worker[] = [];
  for (let i = 0; i < originConns; i++) {
    const [lo, hi] = partition(originConns, i);
    originWorkers.push(new Worker(await connect(o.origin), origin, lo, hi, rng.u32()));
  }

  let snapSerial = 0;
  let snapshotsCreated = 0;
  let snapshotsRemoved = 0;
  const createMs: number[] = [];
  let current: { name: string; model: ExportModel; workers: Worker[] } | undefined;

  async function createSnapshot(): Promise<{ name: string; model: ExportModel }> {
    const name = `${o.origin}-load-${++snapSerial}`;
    // The origin as of now; writes in flight (and those issued until the snapshot exists) may land on either side.
    const model = new ExportModel(name, blocks, origin);
    for (const [b, v] of origin.writing) ambiguous(model, b, v);
    creating = model;
    const c0 = now();
    try {
      await call(o.dataDir, 'POST', '/v1/snapshots', {
        name,
        origin: o.origin,
        size: String(Math.ceil((o.originSize * 1.25) / (1 << 20)) * (1 << 20) + 16 * (1 << 20)),
      });
    } finally {
      creating = undefined;
    }
    createMs.push(now() - c0);
    snapshotsCreated++;
    return { name, model };
  }

  async function startSnapshotWorkers(s: { name: string; model: ExportModel }): Promise<Worker[]> {
    const ws = await Promise.all(
      Array.from({ length: o.snapshotConnections }, async (_, i) => {
        const [lo, hi] = partition(o.snapshotConnections, i);
        return new Worker(await connect(s.name), s.model, lo, hi, rng.u32());
      }),
    );
    for (const w of ws) w.start(o.depth);
    return ws;
  }

  async function retire(s: { name: string; workers: Worker[] }): Promise<void> {
    await Promise.all(s.workers.map((w) => w.stop()));
    // Removed with its (idle) connections still open: the daemon closes them itself.
    await call(o.dataDir, 'DELETE', `/v1/snapshots/${encodeURIComponent(s.name)}`);
    const closed = await Promise.race([
      Promise.all(s.workers.map((w) => w.client.closed)).then(() => true),
      sleep(10_000).then(() => false),
    ]);
    if (!closed) fail(errors, `${s.name}: connections still open 10 s after the snapshot was removed`);
    snapshotsRemoved++;
  }

  const t0 = now();
  for (const w of originWorkers) w.start(o.depth);
  const samples: LoadResult['samples'] = [];
  let lastOps = 0;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      await sleep(1000);
      if (!sampling) break;
      const s = { ...sample(o.pid), t: (now() - t0) / 1000, ops: stats.ops - lastOps };
      lastOps = stats.ops;
      samples.push(s);
      log(
        `t=${s.t.toFixed(0)}s ${s.ops} ops/s, RSS ${mib(s.rssKiB)} MiB, ${s.fds} fds, snapshots ${snapshotsCreated} made ${snapshotsRemoved} removed, ` +
          `${verifyFailures.length} verify failures, ${errors.length} errors`,
      );
    }
  })();

  const end = t0 + o.seconds * 1000;
  try {
    if (o.snapshotConnections > 0) {
      while (now() < end - Math.min(o.snapshotEveryMs, 1000) && errors.length === 0) {
        const c0 = now();
        const s = await createSnapshot();
        const c1 = now();
        const next = { ...s, workers: await startSnapshotWorkers(s) };
        const c2 = now();
        if (current) await retire(current);
        log(
          `snapshot ${s.name}: created in ${Math.round(c1 - c0)} ms, its connections up in ${Math.round(c2 - c1)} ms` +
            (current ? `; ${current.name} drained and removed in ${Math.round(now() - c2)} ms` : ''),
        );
        current = next;
        await sleep(Math.max(0, Math.min(o.snapshotEveryMs, end - now())));
      }
    }
    while (now() < end && errors.length === 0) await sleep(50);
  } catch (err) {
    fail(errors, `snapshot rotation: ${String(err)}`);
  }
  await Promise.all(originWorkers.map((w) => w.stop()));
  if (current) await Promise.all(current.workers.map((w) => w.stop()));
  const elapsedMs = now() - t0;
  sampling = false;
  await sampler;

  // Read everything back: the origin, and the last snapshot before it goes.
  let finalBlocksChecked = 0;
  const again = (w: Worker) => new Worker(w.client, w.model, w.lo, w.hi, 1);
  if (errors.length === 0) {
    for (const n of await Promise.all(originWorkers.map((w) => again(w).verifyAll()))) finalBlocksChecked += n;
    if (current) for (const n of await Promise.all(current.workers.map((w) => again(w).verifyAll()))) finalBlocksChecked += n;
  }
  if (current) {
    await retire(current).catch((err) => fail(errors, `removing ${current!.name}: ${String(err)}`));
  }
  await Promise.all(originWorkers.map((w) => w.client.disconnect()));
  let after = sample(o.pid);
  for (let i = 0; i < 100 && after.fds > before.fds; i++) {
    await sleep(50);
    after = sample(o.pid);
  }
  return {
    elapsedMs,
    ...stats,
    verifyFailures,
    errors,
    snapshotsCreated,
    snapshotsRemoved,
    snapshotCreateMs: percentiles(createMs),
    finalBlocksChecked,
    latency: { all: percentiles(lat.all.values()), read: percentiles(lat.read.values()), write: percentiles(lat.write.values()) },
    samples,
    before,
    after,
  };
}

export function describeLoad(r: LoadResult): string[] {
  const f = (p: ReturnType<typeof percentiles>) =>
    `n=${p.n} p50 ${p.p50.toFixed(2)} p90 ${p.p90.toFixed(2)} p99 ${p.p99.toFixed(2)} max ${p.max.toFixed(2)} ms`;
  const secs = r.elapsedMs / 1000;
  const rss = r.samples.map((s) => s.rssKiB);
  const fds = r.samples.map((s) => s.fds);
  return [
    `${r.ops} ops in ${secs.toFixed(1)} s (${Math.round(r.ops / secs)} ops/s): ${r.reads} reads ${(r.bytesRead / secs / 1048576).toFixed(1)} MiB/s, ` +
      `${r.writes} writes ${(r.bytesWritten / secs / 1048576).toFixed(1)} MiB/s, ${r.flushes} flushes`,
    `latency all:   ${f(r.latency.all)}`,
    `latency read:  ${f(r.latency.read)}`,
    `latency write: ${f(r.latency.write)}`,
    `snapshots: ${r.snapshotsCreated} created (in ${r.snapshotCreateMs.p50.toFixed(0)} ms median, ${r.snapshotCreateMs.max.toFixed(0)} ms max), ${r.snapshotsRemoved} removed; ${r.snapshotReads} snapshot reads verified, ` +
      `${r.ambiguousSettled} blocks written during a snapshot's creation settled by a read; ${r.finalBlocksChecked} blocks read back after the run`,
    `daemon RSS: ${mib(r.before.rssKiB)} MiB before, ${rss.length ? `${mib(Math.min(...rss))}..${mib(Math.max(...rss))} MiB during, ` : ''}${mib(r.after.rssKiB)} MiB after`,
    `daemon fds: ${r.before.fds} before, ${fds.length ? `${Math.min(...fds)}..${Math.max(...fds)} during, ` : ''}${r.after.fds} after`,
    `verify failures: ${r.verifyFailures.length}, errors: ${r.errors.length}`,
  ];
}
