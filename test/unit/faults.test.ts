// The test-only fault injection itself: which operations a rule fails, what the error
// looks like, and the daemon's hook that re-reads its rules file when it changes.
import t from 'tap';
import { mkdtemp, rm, writeFile, rename } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { FaultDevice, FaultPlan } from '../../cow/fault-device.js';
import { FileDevice } from '../../cow/device.js';
import { MemDevice } from '../../cow/mem-device.js';
import { testFaults } from '../../daemon/test-faults.js';

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => 'ok',
    (e: { code?: string }) => e.code ?? String(e),
  );

t.test('rules: file, operation, range, count, errno', async (t) => {
  const plan = new FaultPlan([
    { file: 'vol0.vol', op: 'read', from: 4096, to: 8192 },
    { file: '.cows', op: ['write', 'sync'], errno: 'ENOSPC', times: 2 },
  ]);
  t.equal(plan.check('/d/vol0.vol', 'read', 0, 4096), undefined, 'a read before the range passes');
  t.equal(plan.check('/d/vol0.vol', 'read', 8192, 4096), undefined, 'and one after it');
  const e = plan.check('/d/vol0.vol', 'read', 6000, 10);
  t.match(e, { code: 'EIO', errno: -5, syscall: 'read', path: '/d/vol0.vol' }, 'one inside fails like a failing syscall');
  t.equal(plan.check('/d/vol0.vol', 'read', 0, 4097)?.code, 'EIO', 'so does one overlapping it by a byte');
  t.equal(plan.check('/d/vol0.vol', 'write', 6000, 10), undefined, 'other operations pass');
  t.equal(plan.check('/d/vol1.vol', 'read', 6000, 10), undefined, 'other files pass');
  t.equal(plan.check('/d/cow/vol0.64k.cows', 'sync')?.code, 'ENOSPC', 'syncs match without a range');
  t.equal(plan.check('/d/cow/vol0.64k.cows', 'write', 0, 512)?.syscall, 'write');
  t.equal(plan.check('/d/cow/vol0.64k.cows', 'write', 0, 512), undefined, 'times: 2 fails twice, then passes');
  t.equal(plan.injected, 4);
  plan.set([]);
  t.equal(plan.check('/d/vol0.vol', 'read', 6000, 10), undefined, 'an empty plan fails nothing');
});

t.test('FaultDevice fails what the plan says and passes the rest through', async (t) => {
  const inner = new MemDevice(64 * 1024);
  const plan = new FaultPlan([{ file: 'x.vol', op: 'write', from: 0, to: 4096 }]);
  const dev = new FaultDevice(inner, '/d/x.vol', () => plan);
  t.equal(await codeOf(dev.write(Buffer.alloc(512, 1), 0)), 'EIO');
  const b = Buffer.alloc(512, 9);
  await dev.read(b, 0);
  t.same(b, Buffer.alloc(512), 'a failed write wrote nothing');
  await dev.write(Buffer.alloc(512, 2), 8192);
  await dev.read(b, 8192);
  t.same(b, Buffer.alloc(512, 2), 'writes elsewhere land');
  await dev.sync();
  await dev.truncate(16384);
  t.equal(dev.size, 16384, 'truncate and size pass through');
  await dev.punchHole(8192, 4096);
  await dev.read(b, 8192);
  t.same(b, Buffer.alloc(512), 'and hole punching');
  await dev.close();
});

t.test('the daemon hook: off without COWBD_TEST_FAULTS, re-reads its file when it changes', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-faultsunit-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const lines: Record<string, unknown>[] = [];
  const log = pino({ level: 'info' }, { write: (s: string) => void lines.push(JSON.parse(s)) });
  t.equal(testFaults(log, {}), undefined, 'no variable, no hook');
  const rules = join(dir, 'rules.json');
  const wrap = testFaults(log, { COWBD_TEST_FAULTS: rules })!;
  t.ok(
    lines.some((l) => l.level === 40 && String(l.msg).includes('TEST-ONLY')),
    'a loud warning when on',
  );
  const path = join(dir, 'v.vol');
  await writeFile(path, Buffer.alloc(8192));
  const dev = wrap(await FileDevice.open(path));
  t.equal(await codeOf(dev.read(Buffer.alloc(512), 0)), 'ok', 'a missing rules file injects nothing');
  const set = async (r: unknown) => {
    await writeFile(`${rules}.tmp`, typeof r === 'string' ? r : JSON.stringify(r));
    await rename(`${rules}.tmp`, rules);
  };
  await set([{ file: 'v.vol', op: 'read' }]);
  t.equal(await codeOf(dev.read(Buffer.alloc(512), 0)), 'EIO', 'armed by writing the file');
  await set([]);
  t.equal(await codeOf(dev.read(Buffer.alloc(512), 0)), 'ok', 'disarmed the same way');
  await set('{not json');
  t.equal(await codeOf(dev.read(Buffer.alloc(512), 0)), 'ok', 'an unreadable file injects nothing');
  t.ok(
    lines.some((l) => l.level === 50 && l.msg === 'test faults: unreadable rules file; injecting nothing'),
    'and says so',
  );
  await dev.close();
});
