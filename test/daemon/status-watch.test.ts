import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { CLI, cowbd, startDaemon } from '../helpers/daemon.js';
import { NbdClient } from '../helpers/nbd-client.js';

// Starts a daemon and CLI processes and watches for seconds; a loaded machine makes that slow.
t.setTimeout(120_000);

const CLEAR = '\x1b[H\x1b[2J';
const HIDE_CURSOR = '\x1b[?25l';
const SHOW_CURSOR = '\x1b[?25h';
const HEADER = /^Every 1s: cowbd status {2}\d\d:\d\d:\d\d$/gm;

/**
 * Runs a command, collecting stdout, until `enough` says so; then interrupts it: `interrupt`,
 * or SIGINT to its process group.
 */
async function runUntil(proc: ChildProcess, enough: (out: string) => boolean, during?: () => Promise<void>, interrupt?: () => void) {
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString('utf8')));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  let done = false;
  const busy = (async () => {
    while (!done && proc.exitCode === null) await (during?.() ?? new Promise((r) => setTimeout(r, 50)));
  })();
  const end = Date.now() + 30_000;
  while (!enough(out) && proc.exitCode === null && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
  done = true;
  await busy;
  if (proc.exitCode === null) interrupt ? interrupt() : process.kill(-proc.pid!, 'SIGINT');
  return { code: await exited, out };
}

t.test('status --watch prints a table per interval with the fill rate and time to full', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '64M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  const client = await NbdClient.connect({ port: d.port, exportName: 'vol0' });
  t.teardown(() => client.disconnect());
  // Chunks the origin never wrote need no copy: give it data first, so overwrites fill the store.
  for (let at = 0; at < 8 * 1024 * 1024; at += 1024 * 1024) await client.write(at, Buffer.alloc(1024 * 1024, 1));
  await client.flush();
  await cowbd(['snapshot', 'create', 'busy', '--origin', 'vol0', '--size', '16M', '--data-dir', d.dataDir]);
  const chunk = Buffer.alloc(64 * 1024, 0xab);
  let offset = 0;
  // Each write lands on a chunk not yet copied, so the store grows steadily.
  const write = async () => {
    await client.write(offset, chunk);
    offset = (offset + chunk.length) % (8 * 1024 * 1024);
    await new Promise((r) => setTimeout(r, 40));
  };

  const watch = spawn(process.execPath, [CLI, 'status', '--watch', '1', '--data-dir', d.dataDir], { detached: true });
  const { code, out } = await runUntil(watch, (o) => (o.match(HEADER) ?? []).length >= 4, write);
  t.equal(code, 0, 'SIGINT ends it with 0');
  const tables = out.split(/\n\n(?=Every )/);
  t.ok(tables.length >= 3, `${tables.length} tables`);
  t.notOk(out.includes('\x1b['), 'no escapes off a terminal');
  t.match(tables[0], /^busy .* -\s+-$/m, 'the first table has no rate yet');
  const last = tables[tables.length - 2]!;
  t.match(last, /FILL\/MIN\s+TO FULL/);
  const busy = last.split('\n').find((l) => l.startsWith('busy '));
  t.match(busy, /valid\s+[\d.]+[KM]iB \([\d.]+%\)\s+(\d+[smhd]\d*[smh]?)$/, 'a rate and a time to full');
  t.notMatch(busy, /\s0B \(/, 'the rate is not zero');

  // Writes stopped: the rate falls to zero and there is no time to full.
  const json = spawn(process.execPath, [CLI, 'status', '--watch', '1', '--json', '--data-dir', d.dataDir], { detached: true });
  const j = await runUntil(json, (o) => o.split('\n').filter(Boolean).length >= 2);
  t.equal(j.code, 0);
  const docs = j.out
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  t.ok(docs.length >= 2, 'one JSON document per line per interval');
  const row = docs[docs.length - 1].rows.find((r: { name: string }) => r.name === 'busy');
  t.match(row, { kind: 'snapshot', fillBytesPerMinute: 0, secondsToFull: null });
  t.equal(docs[0].rows.find((r: { name: string }) => r.name === 'busy').fillBytesPerMinute, null, 'no rate on the first');
});

t.test('on a terminal the table is redrawn in place and Ctrl-C restores the cursor', async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '16M' }], logLevel: 'info' });
  t.teardown(() => d.stop());
  // exec: a shell left waiting (dash, CI's /bin/sh) would die of the same SIGINT and set the status.
  const cmd = `exec '${process.execPath}' '${CLI}' status --watch 1 --data-dir '${d.dataDir}'`;
  const proc = spawn('script', ['-qfec', cmd, '/dev/null'], { detached: true });
  t.teardown(() => {
    if (proc.exitCode === null) process.kill(-proc.pid!, 'SIGKILL');
  });
  // Ctrl-C typed on the terminal: its line discipline sends SIGINT to the command.
  const { code, out } = await runUntil(
    proc,
    (o) => o.split(CLEAR).length > 2,
    undefined,
    () => proc.stdin!.write('\x03'),
  );
  t.equal(code, 0);
  t.ok(out.startsWith(`${HIDE_CURSOR}${CLEAR}`), 'cursor hidden, screen cleared');
  const frames = out.split(CLEAR).slice(1);
  t.ok(frames.length >= 2, 'redrawn');
  t.match(frames[0], /^Every 1s: cowbd status +\d\d:\d\d:\d\d\r?\n\r?\nNAME /, 'a header, then the table');
  t.ok(out.trimEnd().endsWith(SHOW_CURSOR), 'the cursor is shown again');
});
