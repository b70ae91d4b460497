// What libnbd's nbdinfo sees of the handshake: flags, size, the export list
// with descriptions, block sizes and the base:allocation context.
import t from 'tap';
import { run, startTarget, TARGET, type Target } from './target.js';

// Starting a daemon costs a second or two here, so the whole file shares one
// read-write and one read-only server, each subtest on its own volumes.
let srv: Target;
let ro: Target;
let bare: Target | undefined;
t.before(async () => {
  [srv, ro, bare] = await Promise.all([
    startTarget({
      volumes: [
        { name: 'vol0', size: '64M' },
        { name: 'vol1', size: '3M' },
        { name: 'alpha', size: '8M' },
        { name: 'beta', size: '16M' },
        { name: 'mapped', size: '16M' },
      ],
    }),
    startTarget({ volumes: [{ name: 'vol0', size: '8M' }], readOnly: true }),
    // cowbd creates and serves a default volume when it finds none; nbdkit's file plugin has no such thing.
    TARGET === 'cowbd' ? startTarget({ volumes: [] }) : undefined,
  ]);
});
t.teardown(() => Promise.all([srv?.stop(), ro?.stop(), bare?.stop()]));

interface InfoExport {
  'export-name': string;
  description?: string;
  contexts?: string[];
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
  'export-size': number;
}

interface InfoJson {
  protocol: string;
  structured: boolean;
  exports: InfoExport[];
}

async function info(args: string[]): Promise<InfoJson> {
  const r = await run('nbdinfo', ['--json', '--no-content', ...args]);
  if (r.code !== 0) throw new Error(`nbdinfo ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as InfoJson;
}

const MiB = 1024 * 1024;

t.test('read-write export', async (t) => {
  const j = await info([srv.uri('vol0')]);
  t.equal(j.protocol, 'newstyle-fixed');
  t.equal(j.structured, true, 'structured replies negotiated');
  t.equal(j.exports.length, 1);
  const e = j.exports[0]!;
  t.equal(e['export-name'], 'vol0');
  t.equal(e['export-size'], 64 * MiB);
  t.same(e.contexts, ['base:allocation'], 'base:allocation is the only meta context');
  t.equal(e.is_read_only, false);
  t.equal(e.can_flush, true, 'SEND_FLUSH');
  t.equal(e.can_fua, true, 'SEND_FUA');
  t.equal(e.can_trim, true, 'SEND_TRIM');
  t.equal(e.can_zero, true, 'SEND_WRITE_ZEROES');
  t.equal(e.can_cache, true, 'SEND_CACHE');
  t.equal(e.can_multi_conn, true, 'CAN_MULTI_CONN');
  if (srv.kind === 'cowbd') {
    // nbdkit's file plugin does not offer these, so they are checked on cowbd only.
    t.equal(e.can_fast_zero, true, 'SEND_FAST_ZERO');
    t.equal(e.block_size_minimum, 1);
    t.equal(e.block_size_preferred, 4096);
    t.equal(e.block_size_maximum, 32 * MiB);
  }

  const small = await info([srv.uri('vol1')]);
  t.equal(small.exports[0]!['export-size'], 3 * MiB, 'each export has its own size');
});

t.test('export list', async (t) => {
  const j = await info(['--list', srv.uri('')]);
  const byName = new Map(j.exports.map((e) => [e['export-name'], e]));
  const names = [...byName.keys()].sort();
  t.same(names, ['alpha', 'beta', 'mapped', 'vol0', 'vol1'], 'every volume is listed');
  t.equal(byName.get('alpha')?.['export-size'], 8 * MiB);
  t.equal(byName.get('beta')?.['export-size'], 16 * MiB);
  for (const [name, e] of byName) {
    t.same(e.contexts, ['base:allocation'], `${name}: base:allocation listed`);
    if (srv.kind === 'cowbd') {
      t.type(e.description, 'string', `${name}: has a description`);
      t.ok((e.description ?? '').length > 0, `${name}: description is not empty`);
    }
  }
});

t.test('--can and --map', async (t) => {
  const uri = srv.uri('mapped');
  for (const what of [
    'connect',
    'structured-reply',
    'flush',
    'fua',
    'trim',
    'zero',
    'cache',
    'multi-conn',
    'df',
    ...(srv.kind === 'cowbd' ? ['fast-zero'] : []),
  ]) {
    const r = await run('nbdinfo', ['--can', what, uri]);
    t.equal(r.code, 0, `--can ${what}`);
  }
  t.equal((await run('nbdinfo', ['--is', 'read-only', uri])).code, 2, 'not read-only');

  // A fresh sparse volume is all hole+zero; after writing 1 MiB at 4 MiB that range is data.
  const fresh = await run('nbdinfo', ['--map', '--json', uri]);
  t.equal(fresh.code, 0, fresh.stderr);
  const extents = JSON.parse(fresh.stdout) as { offset: number; length: number; type: number }[];
  const total = extents.reduce((n, e) => n + e.length, 0);
  t.equal(total, 16 * MiB, 'map covers the whole export');
  t.ok(
    extents.every((e) => (e.type & 2) === 2),
    'fresh sparse volume is mapped as zero everywhere',
  );

  const w = await run('qemu-io', ['-f', 'raw', uri, '-c', `write -P 0x5a ${4 * MiB} ${MiB}`]);
  t.equal(w.code, 0, w.stderr);
  const after = JSON.parse((await run('nbdinfo', ['--map', '--json', uri])).stdout) as typeof extents;
  const at4 = after.find((e) => e.offset <= 4 * MiB && e.offset + e.length > 4 * MiB);
  t.ok(at4, 'an extent covers the written range');
  t.equal(at4!.type, 0, 'written range is allocated data');
  t.ok(at4!.offset + at4!.length >= 5 * MiB, 'the data extent spans the whole write');
  t.equal(
    after.reduce((n, e) => n + e.length, 0),
    16 * MiB,
  );
});

t.test('read-only export', async (t) => {
  const e = (await info([ro.uri('vol0')])).exports[0]!;
  t.equal(e.is_read_only, true, 'READ_ONLY flag');
  t.equal(e.can_trim, false, 'no TRIM on a read-only export');
  t.equal(e.can_zero, false, 'no WRITE_ZEROES on a read-only export');
  t.equal((await run('nbdinfo', ['--is', 'read-only', ro.uri('vol0')])).code, 0);
});

t.test('unknown export', async (t) => {
  const r = await run('nbdinfo', ['--json', srv.uri('nosuch')]);
  t.not(r.code, 0, 'nbdinfo fails');
  // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
  t.match(r.stderr, /No such file or directory/, 'refused with NBD_REP_ERR_UNKNOWN');
  t.equal((await run('nbdinfo', ['--can', 'connect', srv.uri('vol0')])).code, 0, 'server still serves');
});

t.test('the empty export name selects the default volume', { skip: TARGET !== 'cowbd' && 'cowbd only' }, async (t) => {
  const j = await info([bare!.uri('')]);
  t.equal(j.exports.length, 1);
  t.equal(j.exports[0]!['export-size'], 1024 * MiB, 'the default volume is 1 GiB');
  t.equal(j.exports[0]!.is_read_only, false);
  const list = await info(['--list', bare!.uri('')]);
  t.same(
    list.exports.map((e) => e['export-name']),
    ['default'],
    'LIST shows the created default volume',
  );
  const named = await info([bare!.uri('default')]);
  t.equal(named.exports[0]!['export-size'], 1024 * MiB, 'and it is also reachable by name');
});
