// kill -9 under load, with snapshots live: the engine of scripts/soak.ts and
// test/daemon/soak.test.ts.
//
// Each cycle: restart the daemon on the same data directory (timing spawn to
// "serving"), check everything, take snapshots with the writers paused (so each
// snapshot's content is known exactly: the model at that instant), run writers on
// the origin (random 4 KiB-block runs, a mix of FUA writes, plain writes, FLUSHes
// and verified reads) plus a verified reader of a snapshot, then SIGKILL the daemon
// at a random moment, sometimes in the middle of a snapshot creation.
//
// What must hold after each restart:
//  - origin: each block holds the last write known durable (acknowledged with FUA, or
//    acknowledged before a FLUSH that was then acknowledged, on any connection: the
//    daemon advertises CAN_MULTI_CONN; or before an acknowledged snapshot creation,
//    which flushes the origin) or one issued after it. Blocks never tear: they are
//    4 KiB, page-aligned, and a SIGKILLed process's writes are in the page cache.
//  - every snapshot whose creation was acknowledged exists and, unless it was small
//    enough to fill up, is valid and equals, block for block, the model at its creation;
//    a small one may have been invalidated, and once seen invalid stays invalid;
//  - a snapshot being created at the kill either exists, valid and exact, or does not;
//  - no other snapshot exists.
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { call } from '../../daemon/control-client.js';
import { startDaemon, type Daemon } from './daemon.js';
import { NbdClient, NbdError } from './nbd-client.js';
import { fillTagged, rng32, taggedId } from '../cow/helpers.js';

export { rng32 };

export interface SoakOptions {
  dataDir: string;
  cycles: number;
  seed: number;
  /** Origin size in bytes (a multiple of 1 MiB). */
  size: number;
  /** Writer connections on the origin, and requests each keeps in flight. */
  clients: number;
  depth: number;
  /** Load time before the kill, ms: uniform in [min, max]. */
  loadMs: [number, number];
  /** Snapshots kept at most (the oldest are removed at the start of a cycle). */
  maxSnapshots: number;
  log?: (line: string) => void;
  /** Every daemon log line, for diagnosis. */
  daemonLog?: (rec: Record<string, unknown>) => void;
  /** Stops at the first cycle that fails, leaving the data directory as the check found it. */
  stopOnFailure?: boolean;
}

export interface SoakResult {
  cycles: number;
  failures: string[];
  /** Writes acknowledged, and of those made durable (FUA, flush, creation) before a kill and verified after it. */
  writesAcked: number;
  durableVerified: number;
  blocksChecked: number;
  readsVerified: number;
  snapshotReadsVerified: number;
  flushes: number;
  snapshotsCreated: number;
  /** Snapshot contents compared block for block after restarts. */
  snapshotChecks: number;
  /** Kills during a creation: acknowledged before the kill, or not and found afterwards, or not and absent. */
  killsDuringCreate: number;
  createAckedBeforeKill: number;
  createdDuringKill: number;
  createAbsentAfterKill: number;
  /** Small snapshots seen invalid before a kill and found invalid after it. */
  invalidKept: number;
  restartMs: number[];
  errorLogs: string[];
}

const BLOCK = 4096;
const MiB = 1 << 20;
const CHUNKS = ['64K', '32K', '128K', '16K'];

interface Hist {
  id: number;
  /** Logical clock at acknowledgement; Infinity until then. */
  ack: number;
}

/** What each origin block may hold after a crash. */
class OriginModel {
  /** Last write known durable per block. */
  readonly durable: Uint32Array;
  /** Whether that durable write was made durable in this cycle (for the figures). */
  readonly durableThisCycle: Uint8Array;
  /** Writes issued after it, in issue order (one in flight per block at a time). */
  readonly hist: Hist[][];
  /** Last acknowledged write per block: what a read must return when nothing is in flight. */
  readonly current: Uint32Array;
  clock = 0;

  constructor(readonly blocks: number) {
    this.durable = new Uint32Array(blocks);
    this.durableThisCycle = new Uint8Array(blocks);
    this.current = new Uint32Array(blocks);
    this.hist = Array.from({ length: blocks }, () => []);
  }

  issue(b: number, id: number): Hist {
    const h = { id, ack: Infinity };
    this.hist[b]!.push(h);
    return h;
  }

  acked(b: number, h: Hist, fua: boolean): void {
    h.ack = ++this.clock;
    this.current[b] = h.id;
    if (fua) this.makeDurable(b, h);
  }

  private makeDurable(b: number, h: Hist): void {
    const list = this.hist[b]!;
    const i = list.indexOf(h);
    if (i < 0) return;
    this.durable[b] = h.id;
    this.durableThisCycle[b] = 1;
    list.splice(0, i + 1);
  }

  /** A FLUSH (or a snapshot creation) sent at clock `start` was acknowledged. */
  flushed(start: number): void {
    for (let b = 0; b < this.blocks; b++) {
      const list = this.hist[b]!;
      let last: Hist | undefined;
      for (const h of list) if (h.ack <= start) last = h;
      if (last) this.makeDurable(b, last);
    }
  }

  allowed(b: number): number[] {
    return [this.durable[b]!, ...this.hist[b]!.map((h) => h.id)];
  }

  /** After a restart the disk is the truth again. */
  reset(b: number, id: number): void {
    this.durable[b] = id;
    this.current[b] = id;
    this.durableThisCycle[b] = 0;
    this.hist[b] = [];
  }
}

interface SnapInfo {
  name: string;
  /** Block ids at creation. */
  expect: Uint32Array;
  /** Small enough to be invalidated by the load. */
  small: boolean;
  seenInvalid: boolean;
  createdCycle: number;
  chunk: string;
  /** Created with the writers paused at a cycle's start, or during the kill. */
  how: 'start' | 'kill';
}

async function readAll(c: NbdClient, size: number, each: (buf: Buffer, firstBlock: number) => void): Promise<void> {
  const step = 4 * MiB;
  for (let off = 0; off < size; off += step) {
    const n = Math.min(step, size - off);
    each(await c.read(off, n), off / BLOCK);
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function runSoak(o: SoakOptions): Promise<SoakResult> {
  const log = o.log ?? (() => {});
  const rnd = rng32(o.seed);
  const blocks = o.size / BLOCK;
  const model = new OriginModel(blocks);
  const r: SoakResult = {
    cycles: 0,
    failures: [],
    writesAcked: 0,
    durableVerified: 0,
    blocksChecked: 0,
    readsVerified: 0,
    snapshotReadsVerified: 0,
    flushes: 0,
    snapshotsCreated: 0,
    snapshotChecks: 0,
    killsDuringCreate: 0,
    createAckedBeforeKill: 0,
    createdDuringKill: 0,
    createAbsentAfterKill: 0,
    invalidKept: 0,
    restartMs: [],
    errorLogs: [],
  };
  const fail = (msg: string) => {
    if (r.failures.length < 50) r.failures.push(msg);
    log(`FAIL: ${msg}`);
  };
  const snaps = new Map<string, SnapInfo>();
  let pendingCreate: SnapInfo | undefined;
  let nextId = 1;
  let nextSnap = 1;
  const keepLog = (rec: Record<string, unknown>) => {
    o.daemonLog?.(rec);
    if (Number(rec.level) >= 50 && rec.snapshot === undefined && r.errorLogs.length < 20)
      r.errorLogs.push(JSON.stringify(rec).slice(0, 600));
    return false;
  };

  let d: Daemon | undefined;
  const start = async (first: boolean): Promise<Daemon> => {
    const t0 = performance.now();
    const dm = await startDaemon({
      dataDir: o.dataDir,
      logLevel: 'info',
      keepLog,
      volumes: first ? [{ name: 'vol', size: String(o.size) }] : undefined,
    });
    if (!first) r.restartMs.push(performance.now() - t0);
    return dm;
  };

  try {
    d = await start(true);
    for (let cycle = 1; cycle <= o.cycles; cycle++) {
      // ---- check what the kill left (not before the first cycle) -----------------------
      if (cycle > 1) {
        const t0 = performance.now();
        d = await start(false);
        const restart = performance.now() - t0;
        await checkOrigin(d);
        await checkSnapshots(d);
        log(`cycle ${cycle - 1}: restarted in ${restart.toFixed(0)} ms; origin and ${snaps.size} snapshot(s) verified`);
        if (o.stopOnFailure && r.failures.length) {
          await d.stop();
          return r;
        }
      }
      r.cycles = cycle;

      // ---- snapshots at known points (writers idle: the model is exact) -----------------
      const names = [...snaps.keys()];
      while (snaps.size >= o.maxSnapshots) {
        const victim = names.shift()!;
        await call(d.dataDir, 'DELETE', `/v1/snapshots/${victim}`);
        snaps.delete(victim);
      }
      await createSnapshot(d, false);
      if (rnd() < 0.5 && snaps.size < o.maxSnapshots) await createSnapshot(d, true);

      // ---- load, then the kill -------------------------------------------------------
      const killDuringCreate = cycle % 3 === 0;
      await loadAndKill(d, cycle, killDuringCreate);
    }
    // A last restart and check, so the last kill is verified too.
    d = await start(false);
    await checkOrigin(d);
    await checkSnapshots(d);
    log(`cycle ${o.cycles}: restarted; origin and ${snaps.size} snapshot(s) verified`);
    if ((await d.stop()) !== 0) fail('the daemon did not stop cleanly after the soak');
  } catch (e) {
    fail(`aborted: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
    if (d && d.proc.exitCode === null) d.proc.kill('SIGKILL');
  }
  return r;

  async function createSnapshot(dm: Daemon, small: boolean): Promise<void> {
    const name = `s${nextSnap++}${small ? 'tiny' : ''}`;
    const chunk = CHUNKS[Math.floor(rnd() * CHUNKS.length)]!;
    // Big ones hold a copy of every chunk; small ones fill up after a couple of copies.
    const size = small ? String(4 * parseInt(chunk, 10) * 1024) : String(o.size + 2 * MiB);
    const start = model.clock;
    await call(dm.dataDir, 'POST', '/v1/snapshots', { name, origin: 'vol', size, chunkSize: chunk });
    model.flushed(start); // creation flushes the origin
    snaps.set(name, {
      name,
      expect: Uint32Array.from(model.current),
      small,
      seenInvalid: false,
      createdCycle: r.cycles,
      chunk,
      how: 'start',
    });
    r.snapshotsCreated++;
  }

  async function checkOrigin(dm: Daemon): Promise<void> {
    const c = await NbdClient.connect({ port: dm.port, exportName: 'vol' });
    let bad = 0;
    await readAll(c, o.size, (buf, first) => {
      for (let i = 0; i < buf.length / BLOCK; i++) {
        const b = first + i;
        const id = taggedId(buf, i * BLOCK, BLOCK, b);
        const allowed = model.allowed(b);
        r.blocksChecked++;
        if (!allowed.includes(id)) {
          if (bad++ < 5)
            fail(`origin block ${b} holds write ${id}, allowed ${allowed.slice(0, 8).join(',')}${allowed.length > 8 ? ',...' : ''}`);
        } else if (model.durableThisCycle[b]) r.durableVerified++;
        model.reset(b, Math.max(0, id));
      }
    });
    await c.disconnect();
  }

  async function checkSnapshots(dm: Daemon): Promise<void> {
    const present = new Map(
      (await call<{ name: string; state: string }[]>(dm.dataDir, 'GET', '/v1/snapshots')).map((s) => [s.name, s.state]),
    );
    if (pendingCreate) {
      if (present.has(pendingCreate.name)) {
        r.createdDuringKill++;
        r.snapshotsCreated++;
        snaps.set(pendingCreate.name, pendingCreate);
      } else r.createAbsentAfterKill++;
      pendingCreate = undefined;
    }
    for (const name of present.keys()) if (!snaps.has(name)) fail(`snapshot ${name} exists but was never acknowledged`);
    for (const s of snaps.values()) {
      const st = present.get(s.name);
      if (st === undefined) {
        fail(`snapshot ${s.name} (acknowledged in cycle ${s.createdCycle}) is gone`);
        snaps.delete(s.name);
        continue;
      }
      if (s.seenInvalid) {
        if (st !== 'invalid') fail(`snapshot ${s.name} was invalid before the kill and is ${st} after it`);
        else r.invalidKept++;
        continue;
      }
      if (st === 'invalid') {
        if (!s.small) fail(`snapshot ${s.name} is invalid, but it has room for every chunk`);
        s.seenInvalid = true;
        continue;
      }
      const c = await NbdClient.connect({ port: dm.port, exportName: s.name });
      let bad = 0;
      await readAll(c, o.size, (buf, first) => {
        for (let i = 0; i < buf.length / BLOCK; i++) {
          const b = first + i;
          const id = taggedId(buf, i * BLOCK, BLOCK, b);
          if (id !== s.expect[b] && bad++ < 5) {
            fail(
              `snapshot ${s.name} (chunk ${s.chunk}, created in cycle ${s.createdCycle} at ${s.how === 'kill' ? 'a kill' : 'its start'}) block ${b} holds write ${id}, expected ${s.expect[b]}`,
            );
          }
        }
      }).catch((e: unknown) => {
        // A small snapshot may go invalid between the listing and the read? Not without writes; anything else is a failure.
        fail(`snapshot ${s.name}: reading it failed: ${String(e)}`);
      });
      await c.disconnect().catch(() => undefined);
      r.snapshotChecks++;
    }
  }

  async function loadAndKill(dm: Daemon, cycle: number, duringCreate: boolean): Promise<void> {
    let stop = false;
    let paused = false;
    let resume: (() => void) | undefined;
    let resumed = Promise.resolve();
    const inflight = new Uint8Array(blocks);
    let active = 0;
    let drained: (() => void) | undefined;
    const per = Math.floor(blocks / o.clients);

    const writer = async (k: number, c: NbdClient, lane: number) => {
      const lo = k * per;
      const hi = k === o.clients - 1 ? blocks : lo + per;
      const rand = rng32(o.seed * 7919 + cycle * 104729 + k * 131 + lane);
      while (!stop) {
        if (paused) {
          await resumed;
          continue;
        }
        const p = rand();
        if (p < 0.05) {
          const start = model.clock;
          active++;
          try {
            await c.flush();
            r.flushes++;
            model.flushed(start);
          } catch (e) {
            if (!stop && e instanceof NbdError) fail(`FLUSH failed: ${e.message}`);
            return;
          } finally {
            if (--active === 0) drained?.();
          }
          continue;
        }
        const n = 1 + Math.floor(rand() * 4);
        const b0 = lo + Math.floor(rand() * (hi - lo - n));
        let free = true;
        for (let b = b0; b < b0 + n; b++) free &&= !inflight[b];
        if (!free) {
          await new Promise((res) => setImmediate(res));
          continue;
        }
        for (let b = b0; b < b0 + n; b++) inflight[b] = 1;
        active++;
        try {
          if (p < 0.3) {
            // A verified read: nothing of ours is in flight on these blocks.
            const buf = await c.read(b0 * BLOCK, n * BLOCK);
            for (let i = 0; i < n; i++) {
              const id = taggedId(buf, i * BLOCK, BLOCK, b0 + i);
              if (id !== model.current[b0 + i])
                fail(`read of origin block ${b0 + i} returned write ${id}, last acknowledged ${model.current[b0 + i]}`);
            }
            r.readsVerified += n;
          } else {
            const fua = p > 0.75;
            const buf = Buffer.allocUnsafe(n * BLOCK);
            const hs: Hist[] = [];
            for (let i = 0; i < n; i++) {
              const id = nextId++;
              fillTagged(buf, i * BLOCK, BLOCK, id, b0 + i);
              hs.push(model.issue(b0 + i, id));
            }
            await c.write(b0 * BLOCK, buf, fua);
            for (let i = 0; i < n; i++) model.acked(b0 + i, hs[i]!, fua);
            r.writesAcked++;
          }
        } catch (e) {
          if (!stop && e instanceof NbdError) fail(`origin I/O failed: ${e.message}`);
          return; // the connection is gone (the kill) or broken
        } finally {
          for (let b = b0; b < b0 + n; b++) inflight[b] = 0;
          if (--active === 0) drained?.();
        }
      }
    };

    // A reader of one big snapshot, verifying every block against its creation.
    const snapReader = async (s: SnapInfo, c: NbdClient) => {
      const rand = rng32(o.seed + cycle);
      while (!stop) {
        const b0 = Math.floor(rand() * (blocks - 16));
        try {
          const buf = await c.read(b0 * BLOCK, 16 * BLOCK);
          for (let i = 0; i < 16; i++) {
            const id = taggedId(buf, i * BLOCK, BLOCK, b0 + i);
            if (id !== s.expect[b0 + i])
              fail(`read of snapshot ${s.name} block ${b0 + i} returned write ${id}, expected ${s.expect[b0 + i]}`);
          }
          r.snapshotReadsVerified += 16;
        } catch (e) {
          if (!stop && e instanceof NbdError) fail(`snapshot ${s.name} read failed: ${e.message}`);
          return;
        }
      }
    };

    const conns: NbdClient[] = [];
    const loops: Promise<void>[] = [];
    for (let k = 0; k < o.clients; k++) {
      const c = await NbdClient.connect({ port: dm.port, exportName: 'vol' });
      conns.push(c);
      for (let lane = 0; lane < o.depth; lane++) loops.push(writer(k, c, lane));
    }
    const big = [...snaps.values()].filter((s) => !s.small && !s.seenInvalid);
    if (big.length) {
      const s = big[Math.floor(rnd() * big.length)]!;
      const c = await NbdClient.connect({ port: dm.port, exportName: s.name });
      conns.push(c);
      loops.push(snapReader(s, c));
    }

    const loadFor = o.loadMs[0] + rnd() * (o.loadMs[1] - o.loadMs[0]);
    await sleep(loadFor);
    if (duringCreate) {
      // Pause the writers and let them drain, so the new snapshot's content is exact.
      paused = true;
      resumed = new Promise((res) => (resume = res));
      if (active > 0) await new Promise<void>((res) => (drained = res));
      drained = undefined;
      const small = rnd() < 0.3;
      const name = `s${nextSnap++}${small ? 'tiny' : ''}`;
      const chunk = CHUNKS[Math.floor(rnd() * CHUNKS.length)]!;
      const size = small ? String(4 * parseInt(chunk, 10) * 1024) : String(o.size + 2 * MiB);
      pendingCreate = { name, expect: Uint32Array.from(model.current), small, seenInvalid: false, createdCycle: cycle, chunk, how: 'kill' };
      const start = model.clock;
      const created = call(dm.dataDir, 'POST', '/v1/snapshots', { name, origin: 'vol', size, chunkSize: chunk }).then(
        () => true,
        () => false,
      );
      // Anywhere from before the request is read to after the reply (a creation takes a few
      // ms): 0-12 ms, spun on setImmediate for sub-millisecond resolution.
      const until = performance.now() + rnd() * 12;
      while (performance.now() < until) await new Promise((res) => setImmediate(res));
      dm.proc.kill('SIGKILL');
      r.killsDuringCreate++;
      if (await created) {
        r.createAckedBeforeKill++;
        // Acknowledged before it died: it must exist.
        model.flushed(start);
        snaps.set(name, pendingCreate);
        pendingCreate = undefined;
        r.snapshotsCreated++;
      }
      stop = true;
      resume?.();
    } else {
      // Before the kill, note the small snapshots already invalid: they must stay so.
      for (const s of await call<{ name: string; state: string }[]>(dm.dataDir, 'GET', '/v1/snapshots')) {
        const info = snaps.get(s.name);
        if (info && s.state === 'invalid') info.seenInvalid = true;
      }
      await sleep(rnd() * 50);
      dm.proc.kill('SIGKILL');
      stop = true;
    }
    await new Promise<void>((res) =>
      dm.proc.exitCode !== null || dm.proc.signalCode !== null ? res() : dm.proc.once('exit', () => res()),
    );
    await Promise.all(loops);
    for (const c of conns) c.destroy();
    log(
      `cycle ${cycle}: killed after ${loadFor.toFixed(0)} ms of load${duringCreate ? ', during a snapshot creation' : ''}; ` +
        `${r.writesAcked} writes acknowledged so far`,
    );
  }
}

/** The snapshot store files in DATA/cow (for the report); the change trackers beside them are not stores. */
export async function storeFiles(dataDir: string): Promise<string[]> {
  return (await readdir(join(dataDir, 'cow')).catch(() => [] as string[])).filter((f) => !f.endsWith('.cbt')).sort();
}

export function describeSoak(r: SoakResult): string[] {
  const ms = [...r.restartMs].sort((a, b) => a - b);
  const at = (p: number) => (ms.length ? ms[Math.min(ms.length - 1, Math.floor(p * ms.length))]!.toFixed(0) : '-');
  return [
    `${r.cycles} kill -9 cycles; ${r.writesAcked} writes acknowledged, ${r.flushes} flushes; ` +
      `${r.blocksChecked} origin blocks checked after restarts; ${r.durableVerified} of them had a write made durable (FUA, flush or creation) before the kill, and held it or a later one`,
    `${r.readsVerified} origin blocks and ${r.snapshotReadsVerified} snapshot blocks read and verified under load`,
    `${r.snapshotsCreated} snapshots created; ${r.snapshotChecks} full snapshot comparisons after restarts; ` +
      `${r.killsDuringCreate} kills during a creation (${r.createAckedBeforeKill} acknowledged first; of the others ${r.createdDuringKill} existed complete afterwards, ${r.createAbsentAfterKill} did not exist); ` +
      `${r.invalidKept} invalid snapshots found still invalid`,
    `restart to serving: median ${at(0.5)} ms, max ${ms.length ? ms[ms.length - 1]!.toFixed(0) : '-'} ms over ${ms.length} restarts`,
  ];
}
