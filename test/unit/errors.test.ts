// protocol/errors.ts: the one place where storage errors become NBD error values, and
// how loudly each is logged. Errors are shaped as Node's fs calls and the COW engine
// throw them (code, errno, syscall).
import t from 'tap';
import * as C from '../../protocol/constants.js';
import { NbdRequestError, toNbdError } from '../../protocol/errors.js';
import type { Logger, LogFn } from '../../protocol/logger.js';
import { CowErrors } from '../../cow/errors.js';
import { injectedError } from '../../cow/fault-device.js';

function recorder(): { log: Logger; lines: { level: string; obj: Record<string, unknown> }[] } {
  const lines: { level: string; obj: Record<string, unknown> }[] = [];
  const at = (level: string): LogFn => ((obj: unknown) => {
    lines.push({ level, obj: typeof obj === 'object' && obj !== null ? (obj as Record<string, unknown>) : { msg: obj } });
  }) as LogFn;
  const log: Logger = { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug'), trace: at('trace'), child: () => log };
  return { log, lines };
}

const osError = (code: string) => injectedError(code, 'write', '/data/vol0.vol', 0);

t.test('errno to NBD error', async (t) => {
  const table: [string, number][] = [
    ['ENOSPC', C.NBD_ENOSPC],
    ['EDQUOT', C.NBD_ENOSPC],
    ['EFBIG', C.NBD_ENOSPC],
    ['EIO', C.NBD_EIO],
    ['EROFS', C.NBD_EPERM],
    ['EPERM', C.NBD_EPERM],
    ['EACCES', C.NBD_EPERM],
    ['ENOMEM', C.NBD_ENOMEM],
    ['EINVAL', C.NBD_EINVAL],
    ['EOVERFLOW', C.NBD_EOVERFLOW],
    ['ENOTSUP', C.NBD_ENOTSUP],
    ['EOPNOTSUPP', C.NBD_ENOTSUP],
    ['ESHUTDOWN', C.NBD_ESHUTDOWN],
    ['EBADF', C.NBD_EIO], // anything unknown is an I/O error
    ['ENXIO', C.NBD_EIO],
  ];
  for (const [code, nbd] of table) {
    const { log } = recorder();
    t.equal(toNbdError(osError(code), log, {}), nbd, `${code} -> ${C.NBD_EIO === nbd ? 'EIO' : nbd}`);
  }
  const { log } = recorder();
  t.equal(toNbdError(new Error('no code'), log, {}), C.NBD_EIO, 'an error without a code is EIO');
  t.equal(toNbdError('a string', log, {}), C.NBD_EIO, 'so is a thrown non-error');
  t.equal(toNbdError(null, log, {}), C.NBD_EIO, 'and null');
  t.equal(toNbdError(CowErrors.snapshotFull('s'), log, {}), C.NBD_ENOSPC, 'CowError codes map alike');
  t.equal(toNbdError(new NbdRequestError(C.NBD_EINVAL, 'bad'), log, {}), C.NBD_EINVAL, 'a chosen NBD error passes through');
});

t.test('how loudly: I/O errors at error, the OS refusing at warn, engine refusals at debug', async (t) => {
  const cases: [unknown, string][] = [
    [osError('EIO'), 'error'],
    [new Error('mystery'), 'error'],
    [osError('ENOSPC'), 'warn'], // a full file system is the operator's business
    [osError('EROFS'), 'warn'],
    [CowErrors.snapshotFull('s'), 'debug'], // an overflowed snapshot, logged once when it overflowed
    [CowErrors.snapshotReadOnly('s'), 'debug'],
    [CowErrors.snapshotInvalid('s'), 'error'],
  ];
  for (const [err, level] of cases) {
    const { log, lines } = recorder();
    toNbdError(err, log, { export: 'vol0', command: 'write' });
    t.equal(lines.length, 1);
    t.equal(lines[0]!.level, level, `${String((err as Error).message)}: ${level}`);
    t.equal(lines[0]!.obj.err, err, 'the real error is logged under err');
    t.equal(lines[0]!.obj.export, 'vol0', 'with the context given');
  }
});
