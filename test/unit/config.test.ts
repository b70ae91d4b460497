import t from 'tap';
import { writeFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseYaml, loadConfig } from '../../daemon/config.js';

t.test('YAML subset', async (t) => {
  t.same(
    parseYaml(`
# cowbd config
data-dir: /var/lib/cowbd   # comment
listen:
  - 127.0.0.1:10809
  - "[::1]:10809"
read-only: false
max-connections: 64
autoextend:
  threshold: 70
  percent: 20
tags: [a, 'b c']
`),
    {
      'data-dir': '/var/lib/cowbd',
      listen: ['127.0.0.1:10809', '[::1]:10809'],
      'read-only': false,
      'max-connections': 64,
      autoextend: { threshold: 70, percent: 20 },
      tags: ['a', 'b c'],
    },
  );
  t.throws(() => parseYaml('a: 1\n   b: 2\n'), { code: 'COWBD_BAD_CONFIG' });
  t.throws(() => parseYaml('just text\n'), { code: 'COWBD_BAD_CONFIG' });
});

t.test('JSON and YAML files', async (t) => {
  const d = mkdtempSync(join(tmpdir(), 'cowbd-cfg-'));
  writeFileSync(join(d, 'c.json'), '{"log-level": "debug"}');
  writeFileSync(join(d, 'c.yaml'), 'log-level: warn\n');
  writeFileSync(join(d, 'bad.json'), '{');
  t.same(loadConfig(join(d, 'c.json')), { 'log-level': 'debug' });
  t.same(loadConfig(join(d, 'c.yaml')), { 'log-level': 'warn' });
  t.throws(() => loadConfig(join(d, 'bad.json')), { code: 'COWBD_BAD_CONFIG' });
  t.throws(() => loadConfig(join(d, 'missing.yaml')), { code: 'COWBD_BAD_CONFIG' });
});
