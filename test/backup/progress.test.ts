// What a user watching a backup sees: a live bar on a terminal, one JSON line a second
// with --json (done, total, rate, ETA, new and deduplicated bytes), nothing otherwise.
import t from 'tap';
import { PassThrough } from 'node:stream';
import { progress } from '../../backup/progress.js';

const MiB = 1 << 20;
const figures = { done: 256 * MiB, total: 1024 * MiB, read: 200 * MiB, newBytes: 150 * MiB, dedupBytes: 50 * MiB };

t.test('--json: one progress line a second', async (t) => {
  const lines: string[] = [];
  const write = process.stdout.write;
  process.stdout.write = ((chunk: string) => {
    lines.push(String(chunk));
    return true;
  }) as typeof process.stdout.write;
  try {
    const p = progress('json', 'backup');
    p.update(figures);
    await new Promise((r) => setTimeout(r, 2300));
    p.stop();
  } finally {
    process.stdout.write = write;
  }
  t.ok(lines.length >= 2 && lines.length <= 3, `${lines.length} lines in 2.3 s`);
  const l = JSON.parse(lines[0]!) as Record<string, number | string | null>;
  t.match(l, {
    type: 'progress',
    what: 'backup',
    done: figures.done,
    total: figures.total,
    newBytes: figures.newBytes,
    dedupBytes: figures.dedupBytes,
  });
  t.ok(typeof l.bytesPerSecond === 'number' && l.bytesPerSecond > 0, 'a rate');
  t.ok(typeof l.etaSeconds === 'number' && l.etaSeconds > 0, 'an ETA');
});

t.test('on a terminal: a bar with done, total, rate, ETA, new and dedup', async (t) => {
  const out = new PassThrough() as PassThrough & { isTTY: boolean; columns: number; cursorTo(): boolean; clearLine(): boolean };
  out.isTTY = true;
  out.columns = 200;
  out.cursorTo = () => true;
  out.clearLine = () => true;
  let text = '';
  out.on('data', (b: Buffer) => {
    text += b.toString();
  });
  const p = progress('bar', 'backup', out as unknown as NodeJS.WriteStream);
  p.update(figures);
  await new Promise((r) => setTimeout(r, 300));
  p.update({ ...figures, done: 512 * MiB });
  p.stop();
  t.match(text, /backup \[#+\.+\] \d+% \| 512\.0 MiB of 1024\.0 MiB \| [\d.]+ MiB\/s \| ETA \S+ \| new 150\.0 MiB, dedup 50\.0 MiB/);
});

t.test('none: silent', async (t) => {
  const p = progress('none', 'backup');
  p.update(figures);
  p.stop();
  t.pass('no output, no timer left behind');
});
