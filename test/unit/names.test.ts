// One rule for names in both layers: a name the daemon accepts is never refused by cow/
// (which turns names into file names), and the daemon's message states that rule.
import t, { type Test } from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CowManager, isCowError, validName } from '../../cow/index.js';
import { NAME_RULE, isValidName as cowIsValid } from '../../cow/names.js';
import { checkName, isValidName as daemonIsValid } from '../../daemon/names.js';
import { Errors, isCowbdError } from '../../daemon/errors.js';

/** Whether checkName refuses, and with the table's error naming the rule. */
function daemonRefuses(t: Test, name: string): boolean {
  try {
    checkName(name);
    return false;
  } catch (err) {
    t.ok(isCowbdError(err, Errors.invalidName), `${JSON.stringify(name)}: COWBD_INVALID_NAME`);
    t.match((err as Error).message, NAME_RULE, 'the message states the rule');
    return true;
  }
}

t.test('names once refused by cow/ alone are now refused by the daemon too', async (t) => {
  // Passed the daemon's old pattern, then failed in cow/ with EINVAL.
  for (const name of ['a..b', '_x', 'x..', '_']) {
    t.notOk(validName(name), `cow refuses ${name}`);
    t.ok(daemonRefuses(t, name), `the daemon refuses ${name}`);
  }
});

t.test('names once valid in one layer alone now get one answer from both', async (t) => {
  // Passed cow's old pattern (up to 128 characters) and not the daemon's.
  for (const name of ['x'.repeat(65), 'x'.repeat(128)]) {
    t.notOk(validName(name), `cow refuses ${name.slice(0, 20)}`);
    t.ok(daemonRefuses(t, name), `the daemon refuses ${name.slice(0, 20)}`);
  }
  // cow accepted '+' (names with it may be on disk), the daemon refused it: both accept it now.
  for (const name of ['a+b', 'v1+snap']) {
    t.ok(validName(name), `cow accepts ${name}`);
    t.equal(checkName(name), name, `the daemon accepts ${name}`);
  }
});

t.test('both layers agree, name by name', async (t) => {
  const accepted = ['a', 'A', '0', 'vol0', 'a-b_c.d-1', 'a-b_c.d+1', 'snap.1', 'x'.repeat(64), 'a.b.c', 'a_', 'a-'];
  const refused = ['', '.', '..', '.hidden', '-x', '_x', 'a..b', 'a/b', '../x', 'a\0b', 'a b', 'é', '+a', 'x'.repeat(65)];
  for (const name of accepted) {
    t.ok(cowIsValid(name) && validName(name) && daemonIsValid(name), `accepted: ${name.slice(0, 20)}`);
    t.equal(checkName(name), name);
  }
  for (const name of refused) {
    t.notOk(cowIsValid(name) || validName(name) || daemonIsValid(name), `refused: ${JSON.stringify(name.slice(0, 20))}`);
  }
});

t.test('the engine refuses what the rule refuses, with COW_INVALID_NAME', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-names-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const cow = await CowManager.open(dir);
  t.teardown(() => cow.close());
  for (const name of ['+a', '_x', 'a..b']) {
    const err = await cow.attachOrigin(name).then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(isCowError(err) && err.id === 'COW_INVALID_NAME', `attachOrigin(${name}) is refused before any file is opened`);
  }
});
