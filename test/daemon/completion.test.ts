import t from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cowbd, startDaemon } from '../helpers/daemon.js';

// Each step starts a CLI process; a loaded machine makes that slow.
t.setTimeout(120_000);

/** What the completion script asks for: the words typed after `cowbd`, the last being completed. */
async function complete(words: string[], env?: NodeJS.ProcessEnv): Promise<string[]> {
  const { stdout } = await cowbd(['--get-yargs-completions', ...words], env);
  return stdout.split('\n').filter(Boolean);
}

t.test('cowbd completion prints a completion script for cowbd', async (t) => {
  const { stdout } = await cowbd(['completion']);
  t.match(stdout, /cowbd --get-yargs-completions/);
  t.match(stdout, /complete .* cowbd/);
});

t.test('commands and options complete', async (t) => {
  t.strictSame((await complete(['snapshot', ''])).sort(), ['create', 'extend', 'list', 'merge', 'remove']);
  t.ok((await complete([''])).includes('status'));
  t.ok((await complete(['snapshot', 'create', 'x', '--'])).includes('--origin'));
  t.ok((await complete(['serve', '--log-format', ''])).includes('auto'), 'choices of an option');
});

t.test('volume and snapshot names complete from the data directory and the daemon', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '16M' }] });
  t.teardown(() => d.stop());
  await cowbd(['snapshot', 'create', 'snap1', '--origin', 'vol0', '--size', '4M', '--data-dir', d.dataDir]);
  const env = { COWBD_DATA_DIR: d.dataDir };
  t.strictSame(await complete(['volume', 'remove', ''], env), ['vol0']);
  t.strictSame(await complete(['snapshot', 'remove', ''], env), ['snap1']);
  t.strictSame(await complete(['snapshot', 'extend', '--data-dir', d.dataDir, ''], env), ['snap1'], '--data-dir given');
  t.strictSame(await complete(['snapshot', 'create', 'snap2', '--origin', ''], env), ['vol0']);
  t.notOk((await complete(['snapshot', 'create', ''], env)).includes('snap1'), 'a new name is not completed');
});

t.test('with no daemon, volume names still complete and snapshot names are none', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-compl-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  await cowbd(['volume', 'create', 'data', '--size', '1M', '--data-dir', dir]);
  const env = { COWBD_DATA_DIR: dir };
  t.strictSame(await complete(['volume', 'remove', ''], env), ['data']);
  t.strictSame(await complete(['snapshot', 'remove', ''], env), []);
});
