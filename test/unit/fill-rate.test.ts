import t from 'tap';
import { fillEstimate, formatDuration, timeToFullCell, type FillSample } from '../../daemon/fill-rate.js';

const MiB = 1024 * 1024;
const sample = (atMs: number, usedBytes: number, o: Partial<FillSample> = {}): FillSample => ({
  atMs,
  usedBytes,
  capacityBytes: 8 * MiB,
  invalid: false,
  ...o,
});

t.test('no rate until two samples', async (t) => {
  const e = fillEstimate(undefined, sample(0, MiB));
  t.same(e, { bytesPerMinute: null, percentPerMinute: null, secondsToFull: null, state: 'steady' });
  t.equal(timeToFullCell(e), '-');
});

t.test('rate per minute and time to full from consecutive samples', async (t) => {
  // 1 MiB in 30 s is 2 MiB a minute; 6 MiB left fill in 3 minutes.
  const e = fillEstimate(sample(0, MiB), sample(30_000, 2 * MiB));
  t.equal(e.bytesPerMinute, 2 * MiB);
  t.equal(e.percentPerMinute, 25);
  t.equal(e.secondsToFull, 180);
  t.equal(e.state, 'filling');
  t.equal(timeToFullCell(e), '3m00s');
});

t.test('not filling, full, invalid', async (t) => {
  const steady = fillEstimate(sample(0, MiB), sample(2000, MiB));
  t.equal(steady.bytesPerMinute, 0);
  t.equal(steady.secondsToFull, null);
  t.equal(timeToFullCell(steady), '-');
  const full = fillEstimate(sample(0, 7 * MiB), sample(2000, 8 * MiB));
  t.equal(full.state, 'full');
  t.equal(timeToFullCell(full), 'full');
  const invalid = fillEstimate(sample(0, 7 * MiB), sample(2000, 7 * MiB, { invalid: true }));
  t.equal(timeToFullCell(invalid), 'invalid');
});

t.test('a store that shrank was replaced: no rate', async (t) => {
  const e = fillEstimate(sample(0, 4 * MiB), sample(2000, MiB));
  t.equal(e.bytesPerMinute, null);
  t.equal(timeToFullCell(e), '-');
  t.equal(fillEstimate(sample(1000, MiB), sample(1000, 2 * MiB)).bytesPerMinute, null, 'no time passed');
});

t.test('an extended store: time to full uses the new capacity', async (t) => {
  const e = fillEstimate(sample(0, 4 * MiB), sample(60_000, 5 * MiB, { capacityBytes: 16 * MiB }));
  t.equal(e.secondsToFull, 11 * 60);
});

t.test('durations', async (t) => {
  t.equal(formatDuration(0.4), '0s');
  t.equal(formatDuration(42), '42s');
  t.equal(formatDuration(200), '3m20s');
  t.equal(formatDuration(2 * 3600 + 5 * 60 + 9), '2h05m');
  t.equal(formatDuration(3 * 86_400 + 4 * 3600), '3d04h');
});
