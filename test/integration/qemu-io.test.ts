// QEMU's own NBD client (block/nbd.c): patterned and unaligned I/O, zeroes,
// discard, FUA, and its refusal to write to a read-only export.
import t, { type Test } from 'tap';
import { run, startTarget, type RunResult } from './target.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** One qemu-io process running the given commands in order against `uri`. */
function qemuIo(uri: string, cmds: string[], readOnly = false): Promise<RunResult> {
  const args = ['-f', 'raw'];
  if (readOnly) args.push('-r');
  args.push(uri);
  for (const c of cmds) args.push('-c', c);
  return run('qemu-io', args);
}

/**
 * qemu-io keeps going after a failed command, so a good exit code alone does
 * not prove every pattern check held; the output is checked too.
 */
function assertClean(t: Test, r: RunResult, what: string): void {
  t.equal(r.code, 0, `${what}: exit 0${r.code ? ` (stderr: ${r.stderr.trim()})` : ''}`);
  t.notMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, `${what}: no failure reported`);
}

t.test('read-write export', async (t) => {
  const srv = await startTarget({ volumes: [{ name: 'vol0', size: '64M' }] });
  t.teardown(() => srv.stop());
  const uri = srv.uri('vol0');

  assertClean(
    t,
    await qemuIo(uri, [
      'write -P 0xab 0 1M',
      'read -P 0xab 0 1M',
      'write -P 0xcd 1M 1M',
      'read -P 0xab 0 1M',
      'read -P 0xcd 1M 1M',
      'read -P 0 2M 1M',
    ]),
    'aligned 1 MiB patterns',
  );

  // Unaligned at both ends: neighbours on either side must stay as they were.
  assertClean(
    t,
    await qemuIo(uri, [
      'write -P 0x11 4M 64k',
      'write -P 0x22 4195538 5555', // 4M + 1234
      'read -P 0x11 4M 1234',
      'read -P 0x22 4195538 5555',
      'read -P 0x11 4201093 58747', // the rest of the 64k after 4M+1234+5555
      'read -P 0 4259840 4096',
    ]),
    'unaligned write at offset 1234 length 5555',
  );

  assertClean(
    t,
    await qemuIo(uri, [
      'write -P 0x33 1 1',
      'read -P 0xab 0 1',
      'read -P 0x33 1 1',
      'read -P 0xab 2 4094',
      'write -P 0x44 4095 2',
      'read -P 0x44 4095 2',
      'read -P 0xab 4097 4095',
    ]),
    'single bytes and a write straddling a 4 KiB boundary',
  );

  assertClean(
    t,
    await qemuIo(uri, [`write -P 0x77 ${SIZE - 100} 100`, `read -P 0x77 ${SIZE - 100} 100`, `read -P 0 ${SIZE - 4096} ${4096 - 100}`]),
    'last bytes of the export',
  );

  assertClean(
    t,
    await qemuIo(uri, [
      'write -P 0x55 8M 2M',
      'write -z 8M 512k',
      'write -z -u 8704k 512k', // may punch a hole
      'read -P 0 8M 1M',
      'read -P 0x55 9M 1M',
    ]),
    'write zeroes, with and without unmap',
  );

  assertClean(
    t,
    await qemuIo(uri, ['write -P 0x66 12M 1M', 'discard 12M 1M', 'write -P 0x67 12M 4k', 'read -P 0x67 12M 4k']),
    'discard then rewrite',
  );

  assertClean(
    t,
    await qemuIo(uri, [
      'write -f -P 0x88 16M 256k',
      'read -P 0x88 16M 256k',
      'aio_write -P 0x91 17M 64k',
      'aio_write -P 0x92 18M 64k',
      'aio_write -P 0x93 19M 64k',
      'aio_flush',
      'read -P 0x91 17M 64k',
      'read -P 0x92 18M 64k',
      'read -P 0x93 19M 64k',
      'flush',
    ]),
    'FUA, concurrent writes and flush',
  );

  // A fresh connection sees everything the earlier ones wrote.
  assertClean(
    t,
    await qemuIo(
      uri,
      [
        'read -P 0xab 8k 1040384',
        'read -P 0xcd 1M 1M',
        'read -P 0x22 4195538 5555',
        'read -P 0x88 16M 256k',
        `read -P 0x77 ${SIZE - 100} 100`,
      ],
      true,
    ),
    'data persists across connections',
  );

  const past = await qemuIo(uri, [`write -P 0x99 ${SIZE - 512} 1024`]);
  t.match(past.stdout + past.stderr, /error|failed|Input\/output|No space|Invalid/i, 'a write past the end fails');
  assertClean(t, await qemuIo(uri, [`read -P 0x77 ${SIZE - 100} 100`]), 'the tail is untouched after the refused write');
});

t.test('read-only export', async (t) => {
  const srv = await startTarget({ volumes: [{ name: 'vol0', size: '64M' }], readOnly: true });
  t.teardown(() => srv.stop());
  const uri = srv.uri('vol0');

  const rw = await qemuIo(uri, ['write -P 0xab 0 1M']);
  t.not(rw.code, 0, 'opening read-write is refused');
  t.match(rw.stderr, /Permission denied|read-only/i, 'because the export is read-only');
  t.notMatch(rw.stdout, /wrote/, 'nothing was written');

  const ro = await qemuIo(uri, ['write -P 0xab 0 1M'], true);
  t.match(ro.stderr + ro.stdout, /read-only|Permission denied/i, 'writing through a read-only open is refused');

  assertClean(t, await qemuIo(uri, ['read -P 0 0 1M', 'read -P 0 63M 1M'], true), 'reads still work and saw no write');
});
