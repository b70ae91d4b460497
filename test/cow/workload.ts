// A seeded random workload over an origin and its snapshots, run concurrently against
// the engine and a VolumeModel per volume. Used by the model test (live reads checked
// exactly) and the crash test (crash images captured at random device I/Os).
import { Snapshot } from '../../cow/snapshot.js';
import type { Volume } from '../../cow/volume.js';
import type { OverflowPolicy } from '../../cow/format.js';
import { SECTOR, VolumeModel, checkSectors, int, pattern, pick, rng32, type Rig } from './helpers.js';

export interface SnapInfo {
  name: string;
  model: VolumeModel;
  createIssue: number;
  createAck: number;
  removeIssue: number;
  removeAck: number;
  vol: Snapshot | undefined;
  invalid: boolean;
  policy: OverflowPolicy;
}

export interface CrashPoint {
  t: number;
  originImg: Buffer;
  storeImg: Buffer;
}

export interface WorkloadOptions {
  seed: number;
  ops: number;
  chunkSize: number;
  concurrency: number;
  maxSnaps: number;
  /** Snapshot capacity in chunks: a [min, max] range picked per snapshot. */
  capacity: [number, number];
  checkLive: boolean;
  crashProb?: number;
  maxCrashPoints?: number;
}

export class Workload {
  clock = 0;
  nextId = 2;
  readonly origin: VolumeModel;
  readonly snaps: SnapInfo[] = [];
  readonly crashes: CrashPoint[] = [];
  readonly errors: string[] = [];
  private readonly r: () => number;
  private readonly crashR: () => number;
  private readonly busy = new Map<string, Array<[number, number]>>();
  private readonly inflight = new Set<Promise<void>>();
  private snapCounter = 0;
  stats = { ops: 0, reads: 0, writes: 0, invalidations: 0, enospc: 0 };

  constructor(
    readonly rig: Rig,
    readonly o: WorkloadOptions,
  ) {
    this.r = rng32(o.seed);
    this.crashR = rng32(o.seed ^ 0x5eed);
    this.origin = new VolumeModel(
      'origin',
      Array.from({ length: rig.origin.size / SECTOR }, () => 1),
    );
    if (o.crashProb) {
      const hook = (): void => {
        if (this.crashes.length < (o.maxCrashPoints ?? Infinity) && this.crashR() < o.crashProb!) this.capture();
      };
      rig.originDev.onIo = hook;
      rig.storeDev.onIo = hook;
    }
  }

  capture(): void {
    this.crashes.push({
      t: ++this.clock,
      originImg: this.rig.originDev.crashImage(this.crashR),
      storeImg: this.rig.storeDev.crashImage(this.crashR),
    });
  }

  private fail(msg: string): void {
    this.errors.push(`seed ${this.o.seed}: ${msg}`);
  }

  private claim(vol: string, a: number, b: number): boolean {
    const list = this.busy.get(vol) ?? [];
    if (list.some(([x, y]) => a < y && x < b)) return false;
    list.push([a, b]);
    this.busy.set(vol, list);
    return true;
  }

  private unclaim(vol: string, a: number): void {
    const list = this.busy.get(vol)!;
    list.splice(
      list.findIndex(([x]) => x === a),
      1,
    );
  }

  private launch(p: Promise<void>): void {
    const q = p.catch((e: unknown) => this.fail(`unexpected: ${(e as Error).stack ?? String(e)}`)).finally(() => this.inflight.delete(q));
    this.inflight.add(q);
  }

  private async drain(): Promise<void> {
    while (this.inflight.size) await Promise.all([...this.inflight]);
  }

  private liveSnaps(): SnapInfo[] {
    return this.snaps.filter((s) => s.vol && s.removeIssue === Infinity);
  }

  async run(): Promise<void> {
    const r = this.r;
    for (let i = 0; i < this.o.ops; i++) {
      this.stats.ops++;
      while (this.inflight.size >= this.o.concurrency) await Promise.race(this.inflight);
      const live = this.liveSnaps();
      const x = r();
      if (x < 0.06 && live.length < this.o.maxSnaps) {
        await this.drain();
        await this.create();
      } else if (x < 0.08 && live.length > 0) {
        // No I/O of its own in flight, but origin writes go on while it is removed.
        await this.drain();
        this.launch(this.remove(pick(r, live)));
      } else if (x < 0.12) {
        const target = live.length && r() < 0.5 ? pick(r, live) : undefined;
        this.launch(this.flush(target));
      } else {
        const target = live.length && r() < 0.5 ? pick(r, live) : undefined;
        const model = target ? target.model : this.origin;
        const cs = this.o.chunkSize / SECTOR;
        const whole = r() < 0.3;
        const first = whole ? int(r, 0, model.sectors / cs - 1) * cs : int(r, 0, model.sectors - 1);
        const count = Math.min(model.sectors - first, whole ? cs * int(r, 1, 3) : int(r, 1, cs * 2));
        const volName = target ? target.name : 'origin';
        if (!this.claim(volName, first, first + count)) continue;
        const y = r();
        const op = y < 0.35 ? 'read' : y < 0.9 ? 'write' : 'zero';
        this.launch(this.io(op, target, first, count, r() < 0.2).finally(() => this.unclaim(volName, first)));
      }
    }
    await this.drain();
  }

  private async create(): Promise<void> {
    const name = `s${this.snapCounter++}`;
    const base = this.origin.current();
    const [lo, hi] = this.o.capacity;
    const capacityChunks = int(this.r, lo, hi);
    const policy: OverflowPolicy = this.r() < 0.5 ? 'invalidate' : 'overflow';
    const at = ++this.clock;
    // Creation does not flush the origin: after a crash, the snapshot's base is what
    // the origin itself may hold of the writes issued before the creation.
    const origin = this.origin;
    const model = new VolumeModel(name, base, (s, t) => origin.crashAllowed(s, t, at));
    const info: SnapInfo = {
      name,
      model,
      createIssue: at,
      createAck: Infinity,
      removeIssue: Infinity,
      removeAck: Infinity,
      vol: undefined,
      invalid: false,
      policy,
    };
    this.snaps.push(info);
    const rec = await this.rig.origin.quiesced(() => this.rig.pool.createSnapshot({ name, capacityChunks, policy, readOnly: false }));
    info.createAck = ++this.clock;
    info.vol = new Snapshot(this.rig.origin, this.rig.pool, rec);
  }

  private async remove(s: SnapInfo): Promise<void> {
    s.removeIssue = ++this.clock;
    await this.rig.pool.remove(s.vol!.record);
    s.removeAck = ++this.clock;
    s.vol = undefined;
  }

  private async flush(target: SnapInfo | undefined): Promise<void> {
    const model = target ? target.model : this.origin;
    const vol: Volume | undefined = target ? target.vol : this.rig.origin;
    const f = { issue: ++this.clock, ack: Infinity };
    try {
      await vol!.flush();
    } catch (e) {
      if (target && this.explain(target, e)) return;
      throw e;
    }
    f.ack = ++this.clock;
    model.flushes.push(f);
  }

  /** Expected failures: invalid snapshots (EIO) and full overflow-policy ones (ENOSPC). */
  private explain(target: SnapInfo, e: unknown): boolean {
    const code = (e as { code?: string }).code;
    if (code === 'EIO' && target.vol?.state === 'invalid') {
      if (!target.invalid) this.stats.invalidations++;
      target.invalid = true;
      return true;
    }
    // The state may have moved on to invalid by the time the rejection arrives.
    if (code === 'ENOSPC' && target.policy === 'overflow' && target.vol?.state !== 'valid') {
      this.stats.enospc++;
      return true;
    }
    return false;
  }

  private async io(op: 'read' | 'write' | 'zero', target: SnapInfo | undefined, first: number, count: number, fua: boolean): Promise<void> {
    const model = target ? target.model : this.origin;
    const vol: Volume = target ? target.vol! : this.rig.origin;
    const off = first * SECTOR;
    if (op === 'read') {
      this.stats.reads++;
      const buf = Buffer.alloc(count * SECTOR);
      ++this.clock;
      try {
        await vol.read(buf, off);
      } catch (e) {
        if (target && this.explain(target, e)) return;
        throw e;
      }
      if (this.o.checkLive && !target?.invalid) {
        const err = checkSectors(buf, first, (s) => model.liveAllowed(s));
        if (err) this.fail(`${model.name} read [${first}, +${count}): ${err}`);
      }
      return;
    }
    this.stats.writes++;
    const id = op === 'zero' ? 0 : this.nextId++;
    const recs = model.issueWrite(first, count, id, fua, ++this.clock);
    try {
      if (op === 'zero') await vol.writeZeroes(off, count * SECTOR, fua);
      else await vol.write(pattern(first, count, id), off, fua);
    } catch (e) {
      for (const rec of recs) rec.failed = true;
      if (target && this.explain(target, e)) return;
      throw e;
    }
    const t = ++this.clock;
    for (const rec of recs) rec.ack = t;
  }

  /** Which snapshots must, may, or must not exist after a crash at t. */
  expectedAt(t: number): Array<{ info: SnapInfo; must: boolean }> {
    const out: Array<{ info: SnapInfo; must: boolean }> = [];
    for (const s of this.snaps) {
      if (s.createIssue > t) continue;
      if (s.removeAck < t) continue;
      out.push({ info: s, must: s.createAck < t && s.removeIssue > t });
    }
    return out;
  }
}
