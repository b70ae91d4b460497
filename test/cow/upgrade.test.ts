// A data directory written before snapshots reserved their space (test/fixtures/datadir-v0):
// its store opens as a reserved one, is reserved at its first attach, and its snapshot
// reads exactly as it did.
import t from 'tap';
import { cp, mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CowManager } from '../../cow/index.js';

const FIXTURE = fileURLToPath(new URL('../fixtures/datadir-v0', import.meta.url));
const KiB = 1024;

t.test('an old store is reserved at its first attach and reads as before', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-upgrade-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await cp(FIXTURE, dir, { recursive: true });
  const store = join(dir, 'cow', 'old.64k.cows');
  const before = await stat(store);
  const cow = await CowManager.open(dir);
  t.teardown(() => cow.close());
  await cow.attachOrigin('old');
  const s = cow.snapshot('oldsnap')!;
  const u = s.usage();
  t.match(u, { state: 'valid', sparse: false, reservedBytes: 1024 * KiB, invalid: null });
  const [space] = cow.stores();
  t.equal(space?.reservedBytes, space?.neededBytes, 'the whole promise is kept');
  const after = await stat(store);
  t.ok(after.size > before.size, `the file grew from ${before.size} to ${after.size} bytes`);
  t.ok(after.blocks * 512 >= space!.neededBytes, 'and its blocks are allocated');
  // The fixture's README: 0x11 over 0-256k and 0x22 at 1M were written before the snapshot, 0x33 and 0x44 after.
  const buf = Buffer.alloc(2048 * KiB);
  await s.read(buf, 0);
  t.ok(
    buf.subarray(0, 256 * KiB).every((b) => b === 0x11),
    'the snapshot reads its point in time',
  );
  t.ok(buf.subarray(1024 * KiB, 1088 * KiB).every((b) => b === 0x22));
  t.ok(
    buf.subarray(1536 * KiB, 1600 * KiB).every((b) => b === 0),
    'not what the origin got later',
  );
  const o = Buffer.alloc(128 * KiB);
  await cow.origin('old')!.read(o, 0);
  t.ok(
    o.every((b) => b === 0x33),
    'while the origin reads what it got',
  );
});
