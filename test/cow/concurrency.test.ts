// Races on one chunk: concurrent origin writes copy once, snapshot reads never see a
// torn mix, commits are grouped, copies in flight are capped.
import t from 'tap';
import { MemDevice } from '../../cow/mem-device.js';
import { SnapshotPool } from '../../cow/snapshot-pool.js';
import { Snapshot } from '../../cow/snapshot.js';
import { copyBuffers } from '../../cow/buffer-pool.js';
import { makeRig, originOf, sectorId, type Rig } from './helpers.js';

async function snap(rig: Rig, name: string): Promise<Snapshot> {
  const rec = await rig.origin.quiesced(() =>
    rig.pool.createSnapshot({ name, capacityChunks: 10000, policy: 'invalidate', readOnly: false }),
  );
  return new Snapshot(rig.origin, rig.pool, rec);
}

t.test('concurrent origin writes to one chunk wait for one copy', async (t) => {
  const rig = await makeRig(1024, 65536);
  rig.originDev.yieldTurns = 2;
  rig.storeDev.yieldTurns = 2;
  const snaps = [await snap(rig, 'a'), await snap(rig, 'b'), await snap(rig, 'c')];
  await Promise.all(Array.from({ length: 20 }, (_v, i) => rig.origin.write(Buffer.alloc(4096, 10 + i), (i % 16) * 4096, false)));
  await rig.origin.settle();
  t.equal(rig.pool.stats.copies, 1, 'one copy for 20 writers and 3 snapshots');
  for (const s of snaps) {
    const b = Buffer.alloc(65536);
    await s.read(b, 0);
    t.ok(sectorId(b, 0, 0) === 1 && sectorId(b, 65024, 127) === 1, `${s.name} reads the original chunk`);
    t.equal(s.usage().usedChunks, 3);
  }
});

t.test('snapshot reads racing origin writes on the same chunk are never torn', async (t) => {
  const size = 8 * 65536;
  const originDev = new MemDevice(size, Buffer.alloc(size, 0xaa));
  originDev.yieldTurns = 3;
  const storeDev = new MemDevice(0);
  storeDev.yieldTurns = 1;
  const { origin, pools } = originOf(originDev);
  const pool = await SnapshotPool.create(storeDev, origin, { chunkSize: 65536, originSize: size, originName: 'o' });
  pools.add(pool);
  const rec = await origin.quiesced(() => pool.createSnapshot({ name: 's', capacityChunks: 1000, policy: 'invalidate', readOnly: false }));
  const s = new Snapshot(origin, pool, rec);
  let torn = 0;
  let reads = 0;
  const ops: Promise<void>[] = [];
  for (let round = 0; round < 30; round++) {
    for (let c = 0; c < 8; c++) {
      ops.push(
        (async () => {
          const b = Buffer.alloc(65536);
          await s.read(b, c * 65536);
          reads++;
          if (!b.equals(Buffer.alloc(65536, 0xaa))) torn++;
        })(),
      );
      if (round % 3 === 0) ops.push(origin.write(Buffer.alloc(65536, round & 0xff), c * 65536, false));
    }
  }
  await Promise.all(ops);
  t.equal(torn, 0, `${reads} racing reads all returned the snapshot's data`);
});

t.test('snapshot writes racing origin writes and each other on one chunk', async (t) => {
  const rig = await makeRig(256, 65536);
  rig.originDev.yieldTurns = 2;
  rig.storeDev.yieldTurns = 2;
  const a = await snap(rig, 'a');
  const b = await snap(rig, 'b');
  const ops: Promise<void>[] = [];
  for (let i = 0; i < 16; i++) {
    ops.push(a.write(Buffer.alloc(512, 0x10 + i), i * 4096, false));
    ops.push(b.write(Buffer.alloc(512, 0x40 + i), i * 4096 + 512, false));
    ops.push(rig.origin.write(Buffer.alloc(512, 0x80 + i), i * 4096 + 1024, false));
  }
  await Promise.all(ops);
  const ba = Buffer.alloc(65536);
  const bb = Buffer.alloc(65536);
  const bo = Buffer.alloc(65536);
  await a.read(ba, 0);
  await b.read(bb, 0);
  await rig.origin.read(bo, 0);
  let bad = 0;
  for (let i = 0; i < 16; i++) {
    if (ba[i * 4096] !== 0x10 + i || bb[i * 4096 + 512] !== 0x40 + i || bo[i * 4096 + 1024] !== 0x80 + i) bad++;
    if (ba[i * 4096 + 512] === 0x40 + i || ba[i * 4096 + 1024] === 0x80 + i) bad++; // a sees neither b's nor the origin's writes
    if (bb[i * 4096] === 0x10 + i || bb[i * 4096 + 1024] === 0x80 + i) bad++;
  }
  t.equal(bad, 0);
  t.ok(rig.pool.stats.copies <= 2, `at most one origin copy plus one divergence copy (${rig.pool.stats.copies})`);
});

t.test('group commit: concurrent exceptions share syncs', async (t) => {
  const rig = await makeRig(8192, 4096); // 4 MiB, 1024 chunks
  rig.storeDev.yieldTurns = 1;
  await snap(rig, 'a');
  let syncs = 0;
  const orig = rig.storeDev.sync.bind(rig.storeDev);
  rig.storeDev.sync = () => {
    syncs++;
    return orig();
  };
  await Promise.all(Array.from({ length: 256 }, (_v, i) => rig.origin.write(Buffer.alloc(4096, 1), i * 4096 * 4, false)));
  await rig.origin.settle();
  t.equal(rig.pool.stats.exceptions, 256);
  t.ok(syncs < 256 / 4, `${syncs} syncs for 256 exceptions in ${rig.pool.stats.commits} commits`);
});

t.test('copies in flight are capped', async (t) => {
  const size = 64 * 8192;
  const originDev = new MemDevice(size, Buffer.alloc(size, 3));
  const storeDev = new MemDevice(0);
  storeDev.yieldTurns = 3;
  const { origin, pools } = originOf(originDev);
  const store = await SnapshotPool.create(storeDev, origin, { chunkSize: 8192, originSize: size, originName: 'o', maxCopies: 2 });
  pools.add(store);
  await origin.quiesced(() => store.createSnapshot({ name: 's', capacityChunks: 1000, policy: 'invalidate', readOnly: false }));
  let active = 0;
  let peak = 0;
  let peakBuffers = 0;
  const orig = storeDev.write.bind(storeDev);
  storeDev.write = async (b, o) => {
    if (b.length === 8192) {
      peak = Math.max(peak, ++active);
      peakBuffers = Math.max(peakBuffers, copyBuffers.lent);
      try {
        return await orig(b, o);
      } finally {
        active--;
      }
    }
    return orig(b, o);
  };
  // Non-adjacent chunks so nothing coalesces into one copy.
  await Promise.all(Array.from({ length: 32 }, (_v, i) => origin.write(Buffer.alloc(512, 9), i * 2 * 8192, false)));
  await origin.settle();
  t.ok(peak <= 2, `peak ${peak} concurrent chunk copies`);
  t.ok(peakBuffers <= 2, `copies waiting for the cap hold no buffer (peak ${peakBuffers} lent)`);
  t.equal(copyBuffers.lent, 0, 'every copy buffer is back');
  t.equal(store.stats.copies, 32);
});

t.test('an origin write needing no copy still waits for a snapshot read of its chunk from the origin', async (t) => {
  const rig = await makeRig(64, 4096);
  const s = await snap(rig, 's');
  // The snapshot's read of the origin stays in flight until released.
  const realRead = rig.originDev.read.bind(rig.originDev);
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  rig.originDev.read = async (b, o) => {
    await realRead(b, o);
    await gate;
  };
  const got = Buffer.alloc(512);
  const reading = s.read(got, 0);
  await new Promise<void>((r) => setImmediate(r));
  rig.originDev.read = realRead;
  // The snapshot's own whole-chunk write makes chunk 0 an exception: the origin write below needs no copy.
  await s.write(Buffer.alloc(4096, 0x55), 0, false);
  t.equal(rig.pool.copy.needsCopy(0, 512), false, 'chunk 0 needs no copy any more');
  t.equal(rig.pool.copy.readsDone(0, 512) !== undefined, true, 'the snapshot read is still reading it from the origin');
  let written = false;
  const writing = rig.origin.write(Buffer.alloc(512, 0x77), 0, false).then(() => (written = true));
  await new Promise<void>((r) => setImmediate(r));
  t.equal(written, false, 'the origin write waits for that read');
  release();
  await reading;
  await writing;
  t.equal(sectorId(got, 0, 0), 1, 'the read saw the origin as it was');
  const now = Buffer.alloc(512);
  await rig.origin.read(now, 0);
  t.equal(now[0], 0x77, 'and the write then landed');
});
