import t from 'tap';
import type { Logger } from 'pino';
import { createLogger, formatPretty, resolveLogFormat, useColor, type LogFormat } from '../../daemon/logger.js';

/** A stdout stand-in that is, or is not, a terminal. */
function fakeStdout(isTTY: boolean) {
  const lines: string[] = [];
  const out = {
    isTTY,
    hasColors: () => false,
    write: (s: string) => {
      lines.push(s);
      return true;
    },
  };
  return { out: out as unknown as NodeJS.WriteStream, lines };
}

function logTo(format: LogFormat, isTTY: boolean): string {
  const { out, lines } = fakeStdout(isTTY);
  const log: Logger = createLogger('info', format, out);
  log.info({ port: 10809 }, 'listening');
  return lines.join('');
}

// The lines under test carry no color whatever the test runner's environment asks.
delete process.env.FORCE_COLOR;
delete process.env.NO_COLOR;

const PRETTY = /^\d\d:\d\d:\d\d\.\d{3} INFO {2}listening port=10809\n$/;

t.test('auto is pretty on a terminal and JSON lines elsewhere', async (t) => {
  t.equal(resolveLogFormat('auto', true), 'pretty');
  t.equal(resolveLogFormat('auto', false), 'json');
  t.equal(resolveLogFormat('auto', undefined), 'json');
  t.match(logTo('auto', true), PRETTY);
  t.match(JSON.parse(logTo('auto', false)), { level: 30, msg: 'listening', port: 10809 });
});

t.test('--log-format overrides the terminal check both ways', async (t) => {
  t.equal(resolveLogFormat('json', true), 'json');
  t.equal(resolveLogFormat('pretty', false), 'pretty');
  t.match(JSON.parse(logTo('json', true)), { msg: 'listening', port: 10809 });
  t.match(logTo('pretty', false), PRETTY);
});

t.test('a pretty line: local time, padded level, message, key=value fields', async (t) => {
  const at = new Date(2026, 0, 2, 3, 4, 5, 67).getTime();
  const line = formatPretty(
    { level: 40, time: at, pid: 1, msg: 'slow flush', export: 'vol0', ms: 12.5, peer: { ip: '::1' }, note: 'two words' },
    false,
  );
  t.equal(line, '03:04:05.067 WARN  slow flush export=vol0 ms=12.5 peer={"ip":"::1"} note="two words"\n');
  t.equal(formatPretty({ level: 30, time: at, msg: 'stopped' }, false), '03:04:05.067 INFO  stopped\n');
});

t.test('an error shows its message, then its stack indented on the lines after', async (t) => {
  const err = new Error('disk on fire');
  const { out, lines } = fakeStdout(true);
  createLogger('info', 'pretty', out).error({ err, volume: 'vol0' }, 'write failed');
  const [head, ...rest] = lines.join('').trimEnd().split('\n');
  t.match(head, /^\d\d:\d\d:\d\d\.\d{3} ERROR write failed err="disk on fire" volume=vol0$/);
  t.equal(rest[0], '    Error: disk on fire');
  t.ok(rest.length > 1 && rest.every((l) => l.startsWith('    at ') || l === rest[0]), 'stack frames indented');
});

t.test('color only when the terminal has it, NO_COLOR and FORCE_COLOR respected', async (t) => {
  t.equal(useColor({}, true, true), true);
  t.equal(useColor({}, true, false), false);
  t.equal(useColor({}, false, true), false);
  t.equal(useColor({ NO_COLOR: '1' }, true, true), false);
  t.equal(useColor({ NO_COLOR: '1', FORCE_COLOR: '1' }, true, true), false);
  t.equal(useColor({ FORCE_COLOR: '1' }, false, false), true);
  t.equal(useColor({ FORCE_COLOR: '0' }, true, true), false);
  const colored = formatPretty({ level: 50, time: 0, msg: 'boom', code: 5 }, true);
  t.ok(colored.endsWith('\x1b[31mERROR\x1b[0m boom \x1b[2mcode=\x1b[0m5\n'), 'level and keys colored');
  t.notOk(formatPretty({ level: 50, time: 0, msg: 'boom' }, false).includes('\x1b'), 'no escapes without color');
});
