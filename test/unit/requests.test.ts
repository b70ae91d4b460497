// protocol/requests.ts on its own: every refusal validate() makes and the NBD error
// value it carries, then what execute() hands the backend and makes of its failures.
import t from 'tap';
import * as C from '../../protocol/constants.js';
import { validate, execute, clampExtents, type RequestContext } from '../../protocol/requests.js';
import { NbdRequestError } from '../../protocol/errors.js';
import { BufferPool } from '../../protocol/buffer-pool.js';
import { silentLogger } from '../../protocol/logger.js';
import { ALL_CAPABILITIES, type Backend, type ExportInfo, type Extent, type KeepPayload, type ZeroFlags } from '../../protocol/backend.js';
import type { Request } from '../../protocol/wire.js';

const SIZE = 1 << 20;

/** A backend that records each call and fails when told to. */
class Recorder implements Backend {
  readonly info: ExportInfo;
  calls: Array<[string, ...unknown[]]> = [];
  fail?: unknown;
  extentList: Extent[] = [{ length: SIZE, flags: 0 }];

  constructor(over: Partial<ExportInfo> = {}) {
    this.info = {
      name: 'e',
      description: '',
      size: SIZE,
      readOnly: false,
      ...ALL_CAPABILITIES,
      ...over,
    };
  }

  private async call(name: string, ...args: unknown[]): Promise<void> {
    this.calls.push([name, ...args]);
    if (this.fail !== undefined) throw this.fail;
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    await this.call('pread', buf.length, offset);
    buf.fill(0xab);
  }
  pwrite(buf: Buffer, offset: number, fua: boolean, keep?: KeepPayload): Promise<void> {
    return this.call('pwrite', buf.toString('hex'), offset, fua, keep);
  }
  flush(): Promise<void> {
    return this.call('flush');
  }
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.call('trim', offset, length, fua);
  }
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.call('zero', offset, length, flags);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.call('cache', offset, length);
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    await this.call('extents', offset, length);
    return this.extentList.map((e) => ({ ...e }));
  }
}

function ctx(backend: Backend, over: Partial<RequestContext> = {}): RequestContext {
  return { backend, structured: true, baseAllocation: true, pool: new BufferPool(), log: silentLogger, ...over };
}

const req = (type: number, offset: number | bigint, length: number, flags = 0): Request => ({
  type,
  flags,
  cookieHi: 0,
  cookieLo: 1,
  offset: BigInt(offset),
  length,
});

const errorOf = (r: Request, c: RequestContext): number | undefined => validate(r, c)?.error;

t.test('valid requests of every command pass', async (t) => {
  const c = ctx(new Recorder());
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS]) {
    t.equal(validate(req(type, 0, 4096), c), undefined, `${C.COMMAND_NAMES[type]} at 0`);
    t.equal(validate(req(type, SIZE - 1, 1), c), undefined, `${C.COMMAND_NAMES[type]} of the last byte`);
    t.equal(validate(req(type, 0, SIZE), c), undefined, `${C.COMMAND_NAMES[type]} of the whole export`);
  }
  t.equal(validate(req(C.NBD_CMD_FLUSH, 0, 0), c), undefined, 'flush with offset and length 0');
  t.equal(validate(req(C.NBD_CMD_DISC, 0, 0), c)?.error, C.NBD_EINVAL, 'disc reaching validate is a zero-length request');
  // No alignment is required: the advertised minimum block size is 1.
  t.equal(C.BLOCK_SIZE_MIN, 1);
  t.equal(validate(req(C.NBD_CMD_READ, 1, 3), c), undefined, 'unaligned offset and length');
  t.equal(validate(req(C.NBD_CMD_WRITE, 4095, 2), c), undefined, 'a write across a 4 KiB boundary');
});

t.test('an unknown command is EINVAL and named in the message', async (t) => {
  const c = ctx(new Recorder());
  for (const type of [8, 9, 0xffff]) {
    const out = validate(req(type, 0, 512), c);
    t.equal(out?.error, C.NBD_EINVAL, `command ${type}`);
    t.match(out?.message, `unknown command ${type}`);
  }
});

t.test('each command accepts exactly its flags (NBD_CMD_FLAG_*), others are EINVAL', async (t) => {
  const c = ctx(new Recorder());
  const allFlags = [
    C.NBD_CMD_FLAG_FUA,
    C.NBD_CMD_FLAG_NO_HOLE,
    C.NBD_CMD_FLAG_DF,
    C.NBD_CMD_FLAG_REQ_ONE,
    C.NBD_CMD_FLAG_FAST_ZERO,
    1 << 5,
    1 << 15,
  ];
  const allowed: Record<number, number[]> = {
    [C.NBD_CMD_READ]: [C.NBD_CMD_FLAG_DF],
    [C.NBD_CMD_WRITE]: [C.NBD_CMD_FLAG_FUA],
    [C.NBD_CMD_TRIM]: [C.NBD_CMD_FLAG_FUA],
    [C.NBD_CMD_CACHE]: [],
    [C.NBD_CMD_WRITE_ZEROES]: [C.NBD_CMD_FLAG_FUA, C.NBD_CMD_FLAG_NO_HOLE, C.NBD_CMD_FLAG_FAST_ZERO],
    [C.NBD_CMD_BLOCK_STATUS]: [C.NBD_CMD_FLAG_REQ_ONE],
    [C.NBD_CMD_FLUSH]: [],
    [C.NBD_CMD_DISC]: [],
  };
  for (const [typeKey, ok] of Object.entries(allowed)) {
    const type = Number(typeKey);
    const flush = type === C.NBD_CMD_FLUSH || type === C.NBD_CMD_DISC;
    for (const f of allFlags) {
      const out = validate(req(type, 0, flush ? 0 : 512, f), c);
      if (ok.includes(f)) t.equal(out, undefined, `${C.COMMAND_NAMES[type]} accepts 0x${f.toString(16)}`);
      else {
        t.equal(out?.error, C.NBD_EINVAL, `${C.COMMAND_NAMES[type]} refuses 0x${f.toString(16)}`);
        t.match(out?.message, `invalid flags 0x${f.toString(16)} for ${C.COMMAND_NAMES[type]}`);
      }
    }
  }
  t.equal(errorOf(req(C.NBD_CMD_WRITE_ZEROES, 0, 512, C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE), c), undefined, 'allowed flags combine');
  t.equal(errorOf(req(C.NBD_CMD_WRITE, 0, 512, C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_DF), c), C.NBD_EINVAL, 'one bad flag among good ones');
});

t.test('a read-only export refuses WRITE, TRIM and WRITE_ZEROES with EPERM, not reads', async (t) => {
  const c = ctx(new Recorder({ readOnly: true }));
  for (const type of [C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES]) {
    const out = validate(req(type, 0, 512), c);
    t.equal(out?.error, C.NBD_EPERM, C.COMMAND_NAMES[type] ?? String(type));
    t.match(out?.message, 'read-only');
  }
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_CACHE, C.NBD_CMD_BLOCK_STATUS]) {
    t.equal(validate(req(type, 0, 512), c), undefined, `${C.COMMAND_NAMES[type]} allowed`);
  }
  t.equal(validate(req(C.NBD_CMD_FLUSH, 0, 0), c), undefined, 'flush allowed');
  // Order: the permission check comes before the range check.
  t.equal(errorOf(req(C.NBD_CMD_WRITE, SIZE, 512), c), C.NBD_EPERM, 'a read-only write past the end is EPERM');
  // ... and after the flags check.
  t.equal(errorOf(req(C.NBD_CMD_WRITE, 0, 512, C.NBD_CMD_FLAG_DF), c), C.NBD_EINVAL, 'bad flags before permission');
});

t.test('flush must have offset and length 0', async (t) => {
  const c = ctx(new Recorder());
  t.equal(errorOf(req(C.NBD_CMD_FLUSH, 512, 0), c), C.NBD_EINVAL, 'offset');
  t.equal(errorOf(req(C.NBD_CMD_FLUSH, 0, 512), c), C.NBD_EINVAL, 'length');
  t.match(validate(req(C.NBD_CMD_FLUSH, 0, 1), c)?.message, 'flush with non-zero');
  t.equal(errorOf(req(C.NBD_CMD_FLUSH, SIZE * 2, 0), c), C.NBD_EINVAL, 'an offset past the end is still the flush refusal');
});

t.test('READ and WRITE over MAX_REQUEST_SIZE: EOVERFLOW structured, EINVAL simple', async (t) => {
  const big = C.MAX_REQUEST_SIZE + 1;
  const huge = new Recorder({ size: 4 * C.MAX_REQUEST_SIZE });
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE]) {
    t.equal(errorOf(req(type, 0, big), ctx(huge, { structured: true })), C.NBD_EOVERFLOW, `${C.COMMAND_NAMES[type]}, structured`);
    t.equal(errorOf(req(type, 0, big), ctx(huge, { structured: false })), C.NBD_EINVAL, `${C.COMMAND_NAMES[type]}, simple`);
    t.equal(validate(req(type, 0, C.MAX_REQUEST_SIZE), ctx(huge)), undefined, `${C.COMMAND_NAMES[type]} of exactly the limit`);
    t.match(validate(req(type, 0, big), ctx(huge))?.message, `exceeds ${C.MAX_REQUEST_SIZE}`);
  }
  // Commands without a payload have no such limit.
  for (const type of [C.NBD_CMD_TRIM, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_CACHE, C.NBD_CMD_BLOCK_STATUS]) {
    t.equal(validate(req(type, 0, big), ctx(huge)), undefined, `${C.COMMAND_NAMES[type]} over the limit`);
  }
});

t.test('BLOCK_STATUS without base:allocation negotiated is EINVAL', async (t) => {
  const out = validate(req(C.NBD_CMD_BLOCK_STATUS, 0, 512), ctx(new Recorder(), { baseAllocation: false }));
  t.equal(out?.error, C.NBD_EINVAL);
  t.match(out?.message, 'meta context');
  t.equal(validate(req(C.NBD_CMD_READ, 0, 512), ctx(new Recorder(), { baseAllocation: false })), undefined, 'reads do not care');
});

t.test('FAST_ZERO on an export that cannot is ENOTSUP', async (t) => {
  const slow = ctx(new Recorder({ canFastZero: false }));
  const out = validate(req(C.NBD_CMD_WRITE_ZEROES, 0, 512, C.NBD_CMD_FLAG_FAST_ZERO), slow);
  t.equal(out?.error, C.NBD_ENOTSUP);
  t.match(out?.message, 'fast zero');
  t.equal(validate(req(C.NBD_CMD_WRITE_ZEROES, 0, 512), slow), undefined, 'without the flag');
  t.equal(validate(req(C.NBD_CMD_WRITE_ZEROES, 0, 512, C.NBD_CMD_FLAG_FAST_ZERO), ctx(new Recorder())), undefined, 'on an export that can');
});

t.test('zero-length requests other than flush are EINVAL', async (t) => {
  const c = ctx(new Recorder());
  for (const type of [C.NBD_CMD_READ, C.NBD_CMD_WRITE, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_BLOCK_STATUS]) {
    const out = validate(req(type, 0, 0), c);
    t.equal(out?.error, C.NBD_EINVAL, C.COMMAND_NAMES[type] ?? String(type));
    t.match(out?.message, 'zero-length');
  }
});

t.test('out of range: ENOSPC for writes and zeroes, EINVAL for the rest', async (t) => {
  const c = ctx(new Recorder());
  const pastEnd = [
    [SIZE, 1],
    [SIZE - 511, 512],
    [0, SIZE + 1],
  ] as const;
  for (const [off, len] of pastEnd) {
    for (const type of [C.NBD_CMD_WRITE, C.NBD_CMD_WRITE_ZEROES]) {
      const out = validate(req(type, off, len), c);
      t.equal(out?.error, C.NBD_ENOSPC, `${C.COMMAND_NAMES[type]} ${off}+${len}`);
      t.match(out?.message, `outside the export (${SIZE} bytes)`);
    }
    for (const type of [C.NBD_CMD_READ, C.NBD_CMD_TRIM, C.NBD_CMD_CACHE, C.NBD_CMD_BLOCK_STATUS]) {
      t.equal(errorOf(req(type, off, len), c), C.NBD_EINVAL, `${C.COMMAND_NAMES[type]} ${off}+${len}`);
    }
  }
  // Offsets beyond 2^53 cannot be a Number: refused before any arithmetic.
  t.equal(errorOf(req(C.NBD_CMD_READ, 0xffffffffffffffffn, 1), c), C.NBD_EINVAL, 'u64 max offset, read');
  t.equal(errorOf(req(C.NBD_CMD_WRITE, 2n ** 53n, 1), c), C.NBD_ENOSPC, '2^53 offset, write');
  const bigExport = ctx(new Recorder({ size: Number.MAX_SAFE_INTEGER }));
  t.equal(
    validate(req(C.NBD_CMD_READ, BigInt(Number.MAX_SAFE_INTEGER) - 1n, 1), bigExport),
    undefined,
    'largest safe offset of a huge export',
  );
  t.equal(errorOf(req(C.NBD_CMD_READ, BigInt(Number.MAX_SAFE_INTEGER) + 1n, 1), bigExport), C.NBD_EINVAL, 'just past safe integers');
});

t.test('execute: each command reaches the backend with its arguments', async (t) => {
  const b = new Recorder();
  const c = ctx(b);
  const read = await execute(req(C.NBD_CMD_READ, 4096, 100), undefined, c);
  t.equal(read.error, 0);
  t.equal(read.data?.length, 100);
  t.ok(
    read.data?.every((x) => x === 0xab),
    'read data is what the backend wrote',
  );
  const keep: KeepPayload = () => () => {};
  t.same(await execute(req(C.NBD_CMD_WRITE, 8, 2, C.NBD_CMD_FLAG_FUA), Buffer.from([1, 2]), c, keep), { error: 0 });
  t.same(await execute(req(C.NBD_CMD_WRITE, 8, 2), Buffer.from([3, 4]), c), { error: 0 });
  t.same(await execute(req(C.NBD_CMD_FLUSH, 0, 0), undefined, c), { error: 0 });
  t.same(await execute(req(C.NBD_CMD_TRIM, 512, 1024, C.NBD_CMD_FLAG_FUA), undefined, c), { error: 0 });
  t.same(await execute(req(C.NBD_CMD_TRIM, 512, 1024), undefined, c), { error: 0 });
  await execute(req(C.NBD_CMD_WRITE_ZEROES, 0, 4096), undefined, c);
  await execute(req(C.NBD_CMD_WRITE_ZEROES, 0, 4096, C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO), undefined, c);
  await execute(req(C.NBD_CMD_CACHE, 100, 200), undefined, c);
  t.same(b.calls, [
    ['pread', 100, 4096],
    ['pwrite', '0102', 8, true, keep],
    ['pwrite', '0304', 8, false, undefined],
    ['flush'],
    ['trim', 512, 1024, true],
    ['trim', 512, 1024, false],
    ['zero', 0, 4096, { fua: false, mayTrim: true, fast: false }],
    ['zero', 0, 4096, { fua: true, mayTrim: false, fast: true }],
    ['cache', 100, 200],
  ]);
});

t.test('execute: block status is clamped to the request; REQ_ONE keeps one extent', async (t) => {
  const b = new Recorder();
  b.extentList = [
    { length: 1000, flags: 0 },
    { length: 1000, flags: 3 },
    { length: 5000, flags: 0 },
  ];
  const c = ctx(b);
  const all = await execute(req(C.NBD_CMD_BLOCK_STATUS, 0, 2500), undefined, c);
  t.same(all, {
    error: 0,
    extents: [
      { length: 1000, flags: 0 },
      { length: 1000, flags: 3 },
      { length: 500, flags: 0 },
    ],
  });
  const one = await execute(req(C.NBD_CMD_BLOCK_STATUS, 0, 2500, C.NBD_CMD_FLAG_REQ_ONE), undefined, c);
  t.same(one.extents, [{ length: 1000, flags: 0 }]);
  b.extentList = [];
  const none = await execute(req(C.NBD_CMD_BLOCK_STATUS, 0, 2500), undefined, c);
  t.equal(none.error, C.NBD_EIO, 'a backend giving no extents is EIO');
  t.match(none.message, 'no extents');
});

t.test('execute: failures become NBD errors; a failed read returns its buffer to the pool', async (t) => {
  const b = new Recorder();
  const pool = new BufferPool();
  const c = ctx(b, { pool });
  const codes: Array<[string, number]> = [
    ['EIO', C.NBD_EIO],
    ['ENOSPC', C.NBD_ENOSPC],
    ['EPERM', C.NBD_EPERM],
    ['EROFS', C.NBD_EPERM],
    ['EDQUOT', C.NBD_ENOSPC],
    ['ENOTSUP', C.NBD_ENOTSUP],
    ['EWHATEVER', C.NBD_EIO],
  ];
  for (const [code, nbd] of codes) {
    b.fail = Object.assign(new Error(`boom ${code}`), { code });
    const out = await execute(req(C.NBD_CMD_WRITE, 0, 1), Buffer.from([0]), c);
    t.equal(out.error, nbd, code);
    t.equal(out.message, `boom ${code}`);
    t.equal(out.errorOffset, undefined, 'no offset unless the error has one');
  }
  b.fail = Object.assign(new Error('bad sector'), { code: 'EIO', offset: 12345 });
  const before = pool.freeBytes;
  const read = await execute(req(C.NBD_CMD_READ, 0, 8192), undefined, c);
  t.same(read, { error: C.NBD_EIO, message: 'bad sector', errorOffset: 12345 }, 'no data, the failing offset kept');
  t.equal(pool.freeBytes, before + 8192, 'the read buffer went back to the pool');
  b.fail = 'a string';
  const str = await execute(req(C.NBD_CMD_FLUSH, 0, 0), undefined, c);
  t.same(str, { error: C.NBD_EIO, message: 'a string', errorOffset: undefined }, 'a thrown non-Error');
  b.fail = new NbdRequestError(C.NBD_ENOTSUP, 'not here');
  t.equal((await execute(req(C.NBD_CMD_CACHE, 0, 1), undefined, c)).error, C.NBD_ENOTSUP, 'NbdRequestError keeps its value');
  b.fail = undefined;
  const unknown = await execute(req(42, 0, 1), undefined, c);
  t.equal(unknown.error, C.NBD_EINVAL, 'an unknown command reaching execute is EINVAL');
  t.match(unknown.message, 'unknown command 42');
});

t.test('clampExtents', async (t) => {
  t.same(
    clampExtents(
      [
        { length: 10, flags: 1 },
        { length: 10, flags: 1 },
        { length: 10, flags: 2 },
      ],
      25,
      false,
    ),
    [
      { length: 20, flags: 1 },
      { length: 5, flags: 2 },
    ],
    'equal neighbours merge, the last is cut',
  );
  t.same(
    clampExtents(
      [
        { length: 10, flags: 1 },
        { length: 10, flags: 1 },
      ],
      25,
      true,
    ),
    [{ length: 10, flags: 1 }],
    'REQ_ONE: the first only',
  );
  t.same(clampExtents([{ length: 100, flags: 0 }], 10, false), [{ length: 10, flags: 0 }], 'longer than the request');
  t.same(
    clampExtents(
      [
        { length: 5, flags: 0 },
        { length: 0, flags: 3 },
        { length: 5, flags: 3 },
      ],
      20,
      false,
    ),
    [{ length: 5, flags: 0 }],
    'stops at an empty extent',
  );
  t.same(clampExtents([{ length: 5, flags: 0 }], 20, false), [{ length: 5, flags: 0 }], 'short of the request: as given');
  t.throws(() => clampExtents([], 10, false), { code: 'EIO' });
  t.throws(() => clampExtents([{ length: 0, flags: 0 }], 10, false), { code: 'EIO' }, 'only empty extents');
});
