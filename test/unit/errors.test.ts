// protocol/errors.ts: the one place where storage errors become NBD error values, and
// how loudly each is logged. Errors are shaped as Node's fs calls and the COW engine
// throw them (code, errno, syscall).
// Then daemon/errors.ts, the daemon's table: codes, HTTP statuses, and how engine errors map to it.
import t from 'tap';
import * as C from '../../protocol/constants.js';
import { NbdRequestError, toNbdError } from '../../protocol/errors.js';
import type { Logger, LogFn } from '../../protocol/logger.js';
import { CowErrors } from '../../cow/errors.js';
import { injectedError } from '../../cow/fault-device.js';
import { type CowbdError, Errors, isCowbdError } from '../../daemon/errors.js';
import { toCowbdError } from '../../daemon/service.js';

function recorder(): { log: Logger; lines: { level: string; obj: Record<string, unknown> }[] } {
  const lines: { level: string; obj: Record<string, unknown> }[] = [];
  const at = (level: string): LogFn =>
    ((obj: unknown) => {
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

t.test('daemon/errors.ts: every daemon error comes from the table, with its code and HTTP status', async (t) => {
  const cases: [CowbdError, string, number][] = [
    [Errors.noRoute('GET', '/x'), 'COWBD_NOT_FOUND', 404],
    [Errors.bodyTooLarge(), 'COWBD_BAD_REQUEST', 413],
    [Errors.missingField('name'), 'COWBD_BAD_REQUEST', 400],
    [Errors.readOnly(), 'COWBD_READ_ONLY', 409],
    [Errors.cannotShrink('s', '8 MiB'), 'COWBD_INVALID_SIZE', 400],
    [Errors.badExports('x'), 'COWBD_BAD_CONFIG', 400],
    [Errors.badTls('x'), 'COWBD_BAD_TLS', 400],
    [Errors.internal('boom'), 'COWBD_INTERNAL', 500],
    [Errors.noDaemon('/d'), 'COWBD_NO_DAEMON', 503],
    [Errors.badReply(200), 'COWBD_BAD_REPLY', 502],
  ];
  for (const [e, code, status] of cases) {
    t.ok(isCowbdError(e), code);
    t.equal(e.code, code);
    t.equal(e.statusCode, status, `${code}: HTTP ${status}`);
  }
  t.equal(Errors.badExports('bad').message, 'exports: bad');
  t.ok(isCowbdError(Errors.noDaemon('/d'), Errors.noDaemon), "isCowbdError tells one factory's errors");
  t.notOk(isCowbdError(Errors.badReply(200), Errors.noDaemon), "from another's");
  t.notOk(isCowbdError(new Error('x')), 'and from plain errors');
});

t.test('daemon/errors.ts: a control API reply becomes an error with the code the daemon sent', async (t) => {
  const e = Errors.fromReply('COWBD_SOMETHING_NEW', 'a message', 418);
  t.same([e.code, e.message, e.statusCode], ['COWBD_SOMETHING_NEW', 'a message', 418]);
  const bare = Errors.fromReply(undefined, undefined, 502);
  t.same([bare.code, bare.message, bare.statusCode], ['COWBD_ERROR', 'HTTP 502', 502], 'a reply without an error body');
});

t.test('daemon/errors.ts: refusing a fast zero is NBD_ENOTSUP, logged as a refusal', async (t) => {
  const { log, lines } = recorder();
  const e = Errors.zeroNotFast();
  t.equal(toNbdError(e, log, {}), C.NBD_ENOTSUP);
  t.equal(e.message, 'zeroing is not fast here', 'the message the client is sent');
  t.same(
    lines.map((l) => l.level),
    ['debug'],
  );
});

t.test("toCowbdError: engine errors become the daemon's by id, refusals by kind", async (t) => {
  const what = { volume: 'vol', snapshot: 'snap' };
  const map = (e: unknown) => toCowbdError(e, what) as CowbdError;
  t.same(
    [map(CowErrors.unknownSnapshot('snap')).code, map(CowErrors.unknownSnapshot('snap')).message],
    ['COWBD_UNKNOWN_SNAPSHOT', 'no snapshot named "snap"'],
  );
  t.equal(map(CowErrors.unknownOrigin('vol')).code, 'COWBD_UNKNOWN_VOLUME');
  t.equal(map(CowErrors.nameTaken('snap')).code, 'COWBD_NAME_TAKEN');
  t.equal(map(CowErrors.fileExists('/d/snap.cow')).message, 'name "snap" is already used by a volume or snapshot');
  const full = map(CowErrors.storeSlotsFull(64));
  t.same([full.code, full.statusCode, full.message], ['COWBD_INVALID_REQUEST', 400, CowErrors.storeSlotsFull(64).message]);
  t.equal(map(CowErrors.badChunkSize(3)).code, 'COWBD_INVALID_REQUEST');
  const io = CowErrors.snapshotInvalid('snap');
  t.equal(toCowbdError(io, what), io, 'an I/O error passes through');
  const os = new Error('plain');
  t.equal(toCowbdError(os, what), os, 'so does anything not from the engine');
});
