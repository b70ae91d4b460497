// Runs test/clients/libnbd_checks.py (python3-libnbd) against a read-write and
// a read-only server and turns each line it prints into a tap assertion.
import t from 'tap';
import { join } from 'node:path';
import { ROOT } from '../helpers/daemon.js';
import { run, sizeBytes, startTarget } from './target.js';

// Debian's python3-libnbd is only importable by the system interpreter.
const PYTHON = '/usr/bin/python3';
const SCRIPT = join(ROOT, 'test', 'clients', 'libnbd_checks.py');
const SIZE = '128M';

t.test('libnbd checks', async (t) => {
  const [rw, ro] = await Promise.all([
    startTarget({ volumes: [{ name: 'vol0', size: SIZE }] }),
    startTarget({ volumes: [{ name: 'vol0', size: SIZE }], readOnly: true }),
  ]);
  t.teardown(() => Promise.all([rw.stop(), ro.stop()]));

  const r = await run(
    PYTHON,
    [SCRIPT, '--rw', rw.uri('vol0'), '--ro', ro.uri('vol0'), '--size', String(sizeBytes(SIZE)), '--target', rw.kind],
    60_000,
  );
  const lines = r.stdout.split('\n').filter((l) => /^(not )?ok - /.test(l));
  t.ok(lines.length >= 20, `the script reported its checks (${lines.length} lines)`);
  for (const line of lines) {
    const m = /^(not )?ok - (.*)$/.exec(line)!;
    t.ok(!m[1], m[2]!);
  }
  t.equal(r.code, 0, `script exit code${r.code ? `; stderr: ${r.stderr.slice(-2000)}` : ''}`);
});
