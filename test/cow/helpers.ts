// Shared by the cow tests: seeded RNG, sector tags and a reference model that knows,
// for every sector of every volume, what a read may return now and after a crash.
import { MemDevice } from '../../cow/mem-device.js';
import { OriginPools } from '../../cow/origin-copy.js';
import { SnapshotPool } from '../../cow/snapshot-pool.js';
import type { BlockDevice } from '../../cow/device.js';
import { Origin, type OriginOptions } from '../../cow/origin.js';
import { Snapshot } from '../../cow/snapshot.js';

export const SECTOR = 512;

export function rng32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const pick = <T>(r: () => number, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
export const int = (r: () => number, lo: number, hi: number): number => lo + Math.floor(r() * (hi - lo + 1));

/** Block content: id and block number, then a fill byte derived from both. id 0 is all zeros. */
export function fillTagged(buf: Buffer, at: number, size: number, id: number, block: number): void {
  if (id === 0) {
    buf.fill(0, at, at + size);
    return;
  }
  buf.fill((id * 31 + block * 7) & 0xff, at, at + size);
  buf.writeUInt32LE(id, at);
  buf.writeUInt32LE(block, at + 4);
}

/** The id a block of fillTagged holds, or -1 for content no write produced (torn or foreign). */
export function taggedId(buf: Buffer, at: number, size: number, block: number): number {
  const id = buf.readUInt32LE(at);
  if (id === 0) {
    for (let i = at; i < at + size; i++) if (buf[i] !== 0) return -1;
    return 0;
  }
  if (buf.readUInt32LE(at + 4) !== block) return -1;
  const f = (id * 31 + block * 7) & 0xff;
  for (let i = at + 8; i < at + size; i++) if (buf[i] !== f) return -1;
  return id;
}

export const fillSector = (buf: Buffer, at: number, id: number, sector: number): void => fillTagged(buf, at, SECTOR, id, sector);
export const sectorId = (buf: Buffer, at: number, sector: number): number => taggedId(buf, at, SECTOR, sector);

export function pattern(firstSector: number, count: number, id: number): Buffer {
  const b = Buffer.alloc(count * SECTOR);
  for (let i = 0; i < count; i++) fillSector(b, i * SECTOR, id, firstSector + i);
  return b;
}

interface Rec {
  id: number;
  issue: number;
  ack: number; // Infinity until acknowledged
  fua: boolean;
  failed: boolean;
}

/** Per-sector write history of one volume, with flushes, on a logical clock. */
export class VolumeModel {
  readonly hist: Rec[][];
  readonly flushes: Array<{ issue: number; ack: number }> = [];
  /** Sectors whose live content is unknown (a failed multi-chunk write): any of these ids. */
  constructor(
    readonly name: string,
    readonly base: number[],
    /** After a crash at t, what the base may read as (default: exactly base). */
    readonly crashBase?: (s: number, t: number) => number[],
  ) {
    this.hist = base.map(() => []);
  }

  get sectors(): number {
    return this.base.length;
  }

  issueWrite(first: number, count: number, id: number, fua: boolean, now: number): Rec[] {
    const recs: Rec[] = [];
    for (let s = first; s < first + count; s++) {
      const r: Rec = { id, issue: now, ack: Infinity, fua, failed: false };
      this.hist[s]!.push(r);
      recs.push(r);
    }
    return recs;
  }

  /** What a read may return now: the last acknowledged write, plus any failed or in-flight one after it. */
  liveAllowed(s: number): number[] {
    const h = this.hist[s]!;
    const out: number[] = [];
    let i = h.length - 1;
    for (; i >= 0; i--) {
      const r = h[i]!;
      out.push(r.id);
      if (r.ack !== Infinity && !r.failed) return out;
    }
    out.push(this.base[s]!);
    return out;
  }

  /**
   * What a read may return after a crash at time t, counting only writes issued before
   * `before` (a snapshot's creation: flushes acknowledged up to t still make them durable).
   */
  crashAllowed(s: number, t: number, before = t): number[] {
    const h = this.hist[s]!;
    let d = -1;
    for (let i = h.length - 1; i >= 0 && d < 0; i--) {
      const r = h[i]!;
      if (r.issue >= before || r.failed || r.ack >= t) continue;
      if (r.fua || this.flushes.some((f) => f.issue > r.ack && f.ack < t)) d = i;
    }
    const out = d >= 0 ? [h[d]!.id] : this.crashBase ? this.crashBase(s, t) : [this.base[s]!];
    for (let i = d + 1; i < h.length; i++) if (h[i]!.issue < before) out.push(h[i]!.id);
    return out;
  }

  /** Current acknowledged id per sector, for a snapshot's base. Only meaningful with no write in flight. */
  current(): number[] {
    return this.base.map((_b, s) => this.liveAllowed(s)[0]!);
  }
}

export function checkSectors(buf: Buffer, firstSector: number, allowed: (s: number) => number[]): string | undefined {
  for (let i = 0; i < buf.length / SECTOR; i++) {
    const s = firstSector + i;
    const got = sectorId(buf, i * SECTOR, s);
    const ok = allowed(s);
    if (!ok.includes(got)) return `sector ${s}: read id ${got}, allowed ${JSON.stringify(ok.slice(0, 8))}`;
  }
  return undefined;
}

export interface Rig {
  originDev: MemDevice;
  storeDev: MemDevice;
  origin: Origin;
  pool: SnapshotPool;
}

export async function makeRig(originSectors: number, chunkSize: number, initialId = 1, originOpts?: OriginOptions): Promise<Rig> {
  const img = Buffer.alloc(originSectors * SECTOR);
  for (let s = 0; s < originSectors; s++) fillSector(img, s * SECTOR, initialId, s);
  const originDev = new MemDevice(img.length, img);
  const storeDev = new MemDevice(0);
  const { origin, pools } = originOf(originDev, originOpts);
  const pool = await SnapshotPool.create(storeDev, origin, { chunkSize, originSize: img.length, originName: 'o' });
  pools.add(pool);
  return { originDev, storeDev, origin, pool };
}

export async function reopenRig(originImg: Buffer, storeImg: Buffer): Promise<Rig> {
  const originDev = new MemDevice(originImg.length, originImg);
  const storeDev = new MemDevice(storeImg.length, storeImg);
  const { origin, pools } = originOf(originDev);
  const pool = await SnapshotPool.open(storeDev, origin);
  pools.add(pool);
  return { originDev, storeDev, origin, pool };
}

/** An origin named 'o' with no pools yet, and the set its pools go into. */
export function originOf(dev: MemDevice | BlockDevice, opts?: OriginOptions): { origin: Origin; pools: OriginPools } {
  const pools = new OriginPools();
  return { origin: new Origin('o', dev, pools, opts), pools };
}

/** Seeds for randomized tests: COWBD_SEED pins one, else a fresh base per run. */
export function seeds(n: number): number[] {
  const pinned = process.env.COWBD_SEED;
  if (pinned) return [Number(pinned)];
  const base = Math.floor(Math.random() * 1e9);
  return Array.from({ length: n }, (_v, i) => base + i);
}

/** Creates a snapshot in the rig's store, as the manager does (origin quiesced). */
export async function snap(
  rig: Rig,
  name: string,
  capacityChunks: number,
  policy: 'invalidate' | 'overflow' = 'invalidate',
  readOnly = false,
): Promise<Snapshot> {
  const claim = await rig.pool.claim(capacityChunks, `snapshot ${name}`);
  try {
    const rec = await rig.origin.quiesced(() => rig.pool.createSnapshot({ name, capacityChunks, policy, readOnly }));
    return new Snapshot(rig.origin, rig.pool, rec);
  } finally {
    claim.done();
  }
}

/** The tag of the sector a volume reads at that sector number. */
export async function idAt(v: { read(b: Buffer, o: number): Promise<void> }, sector: number): Promise<number> {
  const b = Buffer.alloc(SECTOR);
  await v.read(b, sector * SECTOR);
  return sectorId(b, 0, sector);
}

/** makeRig, with an origin built with the given options over the same devices and store. */
export function makeRigWith(opts: OriginOptions, originSectors: number, chunkSize: number, initialId = 1): Promise<Rig> {
  return makeRig(originSectors, chunkSize, initialId, opts);
}
