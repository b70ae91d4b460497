// An invalidated snapshot's mark must be durable before any origin write it lacks a
// copy for lands: otherwise a crash (or a restart after the mark failed to write)
// brings the snapshot back valid, reading the origin's new data. Each case captures
// the store's durable image at the instant every origin write is issued, reopens it,
// and checks the snapshot is invalid there or holds its own copy of that chunk.
import t from 'tap';
import { Snapshot } from '../../cow/snapshot.js';
import { ABSENT } from '../../cow/chunk-map.js';
import { makeRig, pattern, reopenRig, SECTOR, type Rig } from './helpers.js';

const CS = 4096;
const SPC = CS / SECTOR;

async function snap(rig: Rig, name: string, capacityChunks: number): Promise<Snapshot> {
  const rec = await rig.origin.quiesced(() => rig.pool.createSnapshot({ name, capacityChunks, policy: 'invalidate', readOnly: false }));
  return new Snapshot(rig.origin, rig.pool, rec);
}

/** Records, for each origin write, the chunk and the store's durable image at that instant. */
function captureOriginWrites(rig: Rig): Array<{ chunk: number; store: Buffer; origin: Buffer }> {
  const seen: Array<{ chunk: number; store: Buffer; origin: Buffer }> = [];
  const write = rig.originDev.write.bind(rig.originDev);
  rig.originDev.write = (b, o) => {
    seen.push({ chunk: Math.floor(o / CS), store: rig.storeDev.durableImage(), origin: rig.originDev.durableImage() });
    return write(b, o);
  };
  return seen;
}

/** Empty when, in every captured image, `name` is invalid or has an exception for the chunk written. */
async function violations(seen: Array<{ chunk: number; store: Buffer; origin: Buffer }>, name: string): Promise<string[]> {
  const bad: string[] = [];
  for (const s of seen) {
    const re = await reopenRig(s.origin, s.store);
    const rec = re.pool.records.find((r) => r?.name === name);
    if (rec && rec.state === 'valid' && rec.map.get(s.chunk) === ABSENT)
      bad.push(`origin write to chunk ${s.chunk} issued while ${name} reads valid without a copy of it`);
  }
  return bad;
}

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => 'ok',
    (e: { code?: string }) => e.code ?? String(e),
  );

t.test('a write racing the invalidation of a full snapshot waits for its mark', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  rig.originDev.yieldTurns = 2;
  rig.storeDev.yieldTurns = 2;
  const s = await snap(rig, 'small', 4); // 2 metadata + 2 data chunks
  await rig.origin.write(pattern(0, 2 * SPC, 10), 0, false);
  const seen = captureOriginWrites(rig);
  let racer: Promise<void> | undefined;
  (rig.pool as unknown as { events: { onInvalidated: () => void } }).events.onInvalidated = () => {
    // The instant the snapshot goes invalid in memory, another write to a chunk it lacks.
    racer ??= rig.origin.write(pattern(5 * SPC, SPC, 12), 5 * CS, false);
  };
  await rig.origin.write(pattern(2 * SPC, SPC, 11), 2 * CS, false);
  t.ok(racer, 'the third chunk did not fit');
  await racer;
  t.equal(s.state, 'invalid');
  t.same(await violations(seen, 'small'), []);
});

t.test('a snapshot invalidated by its own write: origin writes wait for the mark', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  rig.storeDev.yieldTurns = 2;
  const s = await snap(rig, 'small', 3); // 2 metadata + 1 data chunk
  await s.write(pattern(0, SPC, 20), 0, false);
  const seen = captureOriginWrites(rig);
  t.equal(await codeOf(s.write(pattern(SPC, SPC, 21), CS, false)), 'EIO', 'the second chunk does not fit: invalid');
  // Issued at once, while the mark may still be on its way to the store.
  await rig.origin.write(pattern(7 * SPC, SPC, 22), 7 * CS, false);
  t.equal(s.state, 'invalid');
  t.same(await violations(seen, 'small'), []);
});

t.test('a failed copy: the mark is written (even past a failed committer) before the origin write', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  const s = await snap(rig, 'a', 32);
  const seen = captureOriginWrites(rig);
  // The copy's data sync fails: the committer gives up for good; the mark goes in directly.
  const sync = rig.storeDev.sync.bind(rig.storeDev);
  let failSyncs = 1;
  rig.storeDev.sync = () => (failSyncs-- > 0 ? Promise.reject(Object.assign(new Error('EIO: injected'), { code: 'EIO' })) : sync());
  await rig.origin.write(pattern(3 * SPC, SPC, 30), 3 * CS, false);
  await rig.origin.flush();
  t.equal(s.state, 'invalid', 'invalidated');
  t.same(await violations(seen, 'a'), []);
  const re = await reopenRig(rig.originDev.durableImage(), rig.storeDev.durableImage());
  t.equal(re.pool.records.find((r) => r?.name === 'a')?.state, 'invalid', 'durably');
});

t.test('a store that takes no writes at all: origin writes needing the mark fail until it does', async (t) => {
  const rig = await makeRig(64 * SPC, CS);
  const s = await snap(rig, 'a', 32);
  const seen = captureOriginWrites(rig);
  rig.storeDev.failWrites = true;
  // Acknowledged while its copy is made (write-behind): the failure comes with the flush.
  t.equal(await codeOf(rig.origin.write(pattern(3 * SPC, SPC, 40), 3 * CS, false)), 'ok', 'held');
  t.equal(await codeOf(rig.origin.flush()), 'EIO', 'the copy and the mark both fail: the write never lands, the flush says so');
  t.equal(s.state, 'invalid');
  t.equal(await codeOf(rig.origin.write(pattern(9 * SPC, SPC, 41), 9 * CS, false)), 'EIO', 'and every write to a chunk it lacks');
  rig.storeDev.failWrites = false;
  t.equal(
    await codeOf(rig.origin.write(pattern(9 * SPC, SPC, 42), 9 * CS, false)),
    'ok',
    'the store recovers: the mark goes in, the write lands',
  );
  t.equal(await codeOf(rig.origin.write(pattern(10 * SPC, SPC, 43), 10 * CS, false)), 'ok', 'later writes no longer wait for it');
  t.equal(await codeOf(rig.origin.flush()), 'ok', 'the flush after the recovery is clean');
  t.same(await violations(seen, 'a'), []);
  const re = await reopenRig(rig.originDev.durableImage(), rig.storeDev.durableImage());
  t.equal(re.pool.records.find((r) => r?.name === 'a')?.state, 'invalid', 'durably invalid');
});
