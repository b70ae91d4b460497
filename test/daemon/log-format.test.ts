import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI } from '../helpers/daemon.js';

const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * Runs `cowbd serve` until it logs 'serving', under a pseudo-terminal (util-linux script) or
 * with stdout a pipe, and returns what it printed.
 */
async function serveOutput(dir: string, tty: boolean, extra: string[] = []): Promise<string> {
  const args = [CLI, 'serve', '--data-dir', dir, '--listen', '127.0.0.1:0', '--metrics-listen', 'off', '--log-level', 'info', ...extra];
  const env: NodeJS.ProcessEnv = { ...process.env, NO_COLOR: '1' };
  delete env.FORCE_COLOR;
  const proc = tty
    ? spawn('script', ['-qfec', [process.execPath, ...args].map(quote).join(' '), '/dev/null'], { env, detached: true })
    : spawn(process.execPath, args, { env, detached: true });
  let out = '';
  try {
    await new Promise<void>((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`no 'serving' line in:\n${out}`)), 10_000);
      proc.stdout!.on('data', (d: Buffer) => {
        out += d.toString('utf8');
        if (/serving/.test(out)) {
          clearTimeout(timer);
          res();
        }
      });
      proc.once('exit', (code) => rej(new Error(`exited ${code}:\n${out}`)));
    });
  } finally {
    const exited = new Promise((r) => proc.once('exit', r));
    // The group holds script and the daemon under it.
    process.kill(-proc.pid!, 'SIGTERM');
    await exited;
  }
  return out;
}

t.test('serve on a terminal logs readable lines; through a pipe, JSON lines', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-logfmt-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));

  const pretty = (await serveOutput(dir, true)).split(/\r?\n/).filter(Boolean);
  const listening = pretty.find((l) => / listening /.test(l));
  t.match(listening, /^\d\d:\d\d:\d\d\.\d{3} INFO {2}listening address=127\.0\.0\.1 port=\d+$/, 'a pretty line');
  t.notOk(
    pretty.some((l) => l.startsWith('{')),
    'no JSON on a terminal',
  );
  t.notOk(
    pretty.some((l) => l.includes('\x1b[')),
    'NO_COLOR: no escapes',
  );

  const json = (await serveOutput(dir, false)).split('\n').filter(Boolean);
  t.ok(json.length > 0);
  for (const l of json) t.match(JSON.parse(l), { level: 30, msg: String }, 'a JSON line');

  const forcedJson = (await serveOutput(dir, true, ['--log-format', 'json'])).split(/\r?\n/).filter(Boolean);
  t.match(JSON.parse(forcedJson.find((l) => l.includes('"listening"'))!), { msg: 'listening' }, '--log-format json on a terminal');
  const forcedPretty = (await serveOutput(dir, false, ['--log-format', 'pretty'])).split('\n').filter(Boolean);
  t.match(
    forcedPretty.find((l) => / serving /.test(l)),
    /^\d\d:\d\d:\d\d\.\d{3} INFO {2}serving /,
    '--log-format pretty through a pipe',
  );
});
