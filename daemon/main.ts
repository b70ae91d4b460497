// The cowbd command line (yargs). Every command has --help and --json.
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createLogger, type LogFormat } from './logger.js';
import { isCowbdError } from './errors.js';
import { isBackupError } from '../backup/errors.js';
import { NbdClientError, ProtocolError } from '../protocol/errors.js';
import { loadConfig } from './config.js';
import { parseSizeNumber } from './sizes.js';
import { checkName } from './names.js';
import { ExportAccess } from './access.js';
import { parseTlsMode } from './tls.js';
import * as cmd from './commands.js';
import { backupCommands } from './backup-cli.js';
import { repoAccessOptions } from './repo-access.js';
import { nameKind, namesFor } from './completion.js';

const DEFAULT_DATA_DIR = process.env.COWBD_DATA_DIR ?? join(homedir(), '.local', 'share', 'cowbd');

function common<T>(y: Argv<T>) {
  return y
    .option('data-dir', {
      type: 'string',
      default: DEFAULT_DATA_DIR,
      describe: 'directory holding volumes and snapshot stores (env COWBD_DATA_DIR)',
    })
    .option('json', { type: 'boolean', default: false, describe: 'print JSON for scripts' });
}

function fail(err: unknown): never {
  // Errors the program describes itself need no stack: the message says what happened.
  if (isCowbdError(err) || isBackupError(err) || err instanceof ProtocolError || err instanceof NbdClientError) {
    process.stderr.write(`cowbd: ${err.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`cowbd: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  process.exit(1);
}

/** Wraps a handler so errors print one clear line and exit non-zero. */
function run<A>(f: (a: A) => Promise<void>): (a: A) => Promise<void> {
  return async (a) => {
    try {
      await f(a);
    } catch (err) {
      fail(err);
    }
  };
}

function serveCommand(y: Argv) {
  return repoAccessOptions(
    common(y)
      .config('config', 'JSON or YAML file of options (long names); flags win', loadConfig)
      .option('listen', { type: 'string', array: true, describe: 'TCP address HOST:PORT (default 127.0.0.1:10809); repeatable' })
      .option('socket', { type: 'string', describe: 'also (or only) listen on this unix socket' })
      .option('read-only', { type: 'boolean', default: false, describe: 'serve every export read-only' })
      .option('default-volume', {
        type: 'string',
        default: 'default',
        describe: 'volume served for the empty export name, created when the data directory has none',
      })
      .option('default-size', { type: 'string', default: '1G', describe: 'size of the default volume when it is created' })
      .option('metrics-listen', {
        type: 'string',
        default: '127.0.0.1:9810',
        describe: 'HOST:PORT serving Prometheus /metrics; "off" to disable',
      })
      .option('autoextend-threshold', {
        type: 'number',
        default: 100,
        describe: 'grow a snapshot when its usage reaches this percent (100: never), as lvm.conf snapshot_autoextend_threshold',
      })
      .option('autoextend-percent', {
        type: 'number',
        default: 20,
        describe: 'grow by this percent of its size, as snapshot_autoextend_percent',
      })
      .option('autoextend-max', { type: 'string', describe: 'largest size auto-extend may grow a snapshot to (default: free disk)' })
      .option('max-connections', { type: 'number', default: 1024, describe: 'NBD connections at once' })
      .option('max-connections-per-export', {
        type: 'number',
        default: 0,
        describe: 'NBD connections to one export at once, 0 for no limit; more are refused at NBD_OPT_GO (NBD_REP_ERR_POLICY)',
      })
      .option('max-bytes-in-flight', {
        type: 'string',
        default: '256M',
        describe:
          'write payloads, read buffers and unsent read replies held across all connections before reading pauses (a connection holding under 512K always proceeds); 0 for no limit',
      })
      .option('threadpool-send', {
        type: 'string',
        default: '128K',
        describe:
          'replies batched to at least this size are written to plain sockets from the threadpool, off the event loop; 0: every reply from the event loop',
      })
      .option('write-behind', {
        type: 'string',
        default: 'auto',
        describe:
          'origin writes each origin acknowledges while their chunks are copied, held in memory until the copies are durable; auto: 1/16 of RAM, at most 1G; 0: writes wait for their copies',
      })
      .option('handshake-timeout', { type: 'number', default: 30, describe: 'seconds a client has to finish the handshake' })
      .option('reply-timeout', {
        type: 'number',
        default: 0,
        describe: 'close a connection whose read replies have not moved for this many seconds while some wait unsent; 0: never',
      })
      .option('tls', {
        type: 'string',
        default: 'off',
        coerce: parseTlsMode,
        describe: "STARTTLS: off, on (client chooses) or require (nbdkit's modes)",
      })
      .option('tls-certificates', { type: 'string', describe: 'directory with ca-cert.pem, server-cert.pem, server-key.pem' })
      .option('tls-verify-peer', { type: 'boolean', default: false, describe: 'require client certificates signed by ca-cert.pem' })
      .option('exports', {
        type: 'string',
        describe: "per-export rules as JSON (allow, readOnly, allowUnix); usually the config file's exports section",
      })
      .option('repo', {
        type: 'string',
        array: true,
        describe: 'serve every backup in this repository (a directory or s3://BUCKET/PREFIX) as a read-only export VOLUME@ID; repeatable',
      })
      .option('log-level', { type: 'string', default: 'info', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] })
      .option('log-format', {
        type: 'string',
        default: 'auto',
        choices: ['auto', 'json', 'pretty'],
        describe: 'auto: readable lines on a terminal, JSON lines otherwise',
      }),
  );
}

// A rejection nobody awaited (a connection lost under requests in flight) ends the command as any failure does.
process.on('unhandledRejection', (err) => fail(err));

const REPEATABLE = new Set(['listen', 'repo', 'volumes']);

await yargs(hideBin(process.argv))
  // A flag given twice means its last value, as in most CLIs; only flags declared as arrays repeat.
  .middleware((argv) => {
    for (const [k, v] of Object.entries(argv)) if (Array.isArray(v) && !REPEATABLE.has(k) && k !== '_') argv[k] = v[v.length - 1];
  }, true)
  .scriptName('cowbd')
  .usage('$0 <command> [options]')
  .command('volume', 'manage origin volumes', (y) =>
    y
      .command(
        'create <name>',
        'create a volume, sparse unless --preallocate (live when a daemon runs)',
        (y) =>
          common(y)
            .positional('name', { type: 'string', demandOption: true })
            .option('size', { type: 'string', demandOption: true, describe: 'size with K/M/G/T suffix (1024-based)' })
            .option('preallocate', {
              type: 'boolean',
              default: false,
              describe: "allocate the volume's blocks now, so its writes never find the disk full; fails if they do not fit",
            }),
        run((a) => cmd.volumeCreate({ dataDir: a['data-dir'], json: a.json, name: a.name, size: a.size, preallocate: a.preallocate })),
      )
      .command(
        'list',
        'list volumes',
        (y) => common(y),
        run((a) => cmd.volumeList({ dataDir: a['data-dir'], json: a.json })),
      )
      .command(
        'remove <name>',
        'remove a volume; refused while it has snapshots',
        (y) => common(y).positional('name', { type: 'string', demandOption: true }),
        run((a) => cmd.volumeRemove({ dataDir: a['data-dir'], json: a.json, name: a.name })),
      )
      .demandCommand(1, 'name a volume command'),
  )
  .command('snapshot', 'manage snapshots of origin volumes', (y) =>
    y
      .command(
        'create <name>',
        'take a snapshot, like lvcreate --snapshot',
        (y) =>
          common(y)
            .positional('name', { type: 'string', demandOption: true })
            .option('origin', { type: 'string', demandOption: true, describe: 'origin volume' })
            .option('size', {
              type: 'string',
              demandOption: true,
              describe: 'exception store size, metadata included; reserved on disk unless --sparse',
            })
            .option('chunk-size', { type: 'string', default: '64K', describe: 'power of two from 4K to 1M' })
            .option('policy', {
              type: 'string',
              default: 'invalidate',
              choices: ['invalidate', 'overflow'],
              describe: 'what a full store does',
            })
            .option('transient', { type: 'boolean', default: false, describe: 'keep in memory only; gone on restart' })
            .option('read-only', { type: 'boolean', default: false })
            .option('sparse', {
              type: 'boolean',
              default: false,
              describe:
                'reserve nothing on disk (a thin pool: overcommits, and the snapshot may be invalidated when the file system fills)',
            }),
        run((a) =>
          cmd.snapshotCreate({
            dataDir: a['data-dir'],
            json: a.json,
            name: a.name,
            origin: a.origin,
            size: a.size,
            chunkSize: a['chunk-size'],
            policy: a.policy,
            transient: a.transient,
            readOnly: a['read-only'],
            sparse: a.sparse,
          }),
        ),
      )
      .command(
        'list',
        'list snapshots',
        (y) => common(y),
        run((a) => cmd.snapshotList({ dataDir: a['data-dir'], json: a.json })),
      )
      .command(
        'extend <name>',
        'grow a snapshot store, like lvextend',
        (y) =>
          common(y)
            .positional('name', { type: 'string', demandOption: true })
            .option('size', { type: 'string', demandOption: true, describe: '+SIZE to add, or the new total SIZE' }),
        run((a) => cmd.snapshotExtend({ dataDir: a['data-dir'], json: a.json, name: a.name, size: a.size })),
      )
      .command(
        'merge <name>',
        'merge a snapshot back into its origin, like lvconvert --merge: the origin becomes the snapshot, which then goes',
        (y) =>
          common(y)
            .positional('name', { type: 'string', demandOption: true })
            .option('now', {
              type: 'boolean',
              default: false,
              describe: 'refuse rather than wait while the origin has NBD clients connected',
            })
            .option('rate', {
              type: 'string',
              describe:
                'bytes a second the background copy may take, e.g. 64M; 0 for no bound (default 64M); on a running merge, changes it',
            }),
        run((a) => cmd.snapshotMerge({ dataDir: a['data-dir'], json: a.json, name: a.name, now: a.now, rate: a.rate })),
      )
      .command(
        'remove <name>',
        'remove a snapshot and free its space',
        (y) => common(y).positional('name', { type: 'string', demandOption: true }),
        run((a) => cmd.snapshotRemove({ dataDir: a['data-dir'], json: a.json, name: a.name })),
      )
      .demandCommand(1, 'name a snapshot command'),
  )
  .command('backup', 'back up volumes to a repository, and list, verify, restore and prune backups', (y) => backupCommands(y, common, run))
  .command(
    'status',
    'every volume and snapshot, like lvs',
    (y) =>
      common(y).option('watch', {
        type: 'string',
        coerce: (v: string) => (v === '' ? 2 : Number(v)),
        describe: "redraw every SECONDS (default 2) with each snapshot's fill rate and time to full, like watch lvs",
      }),
    run((a) =>
      a.watch === undefined
        ? cmd.status({ dataDir: a['data-dir'], json: a.json })
        : cmd.statusWatch({ dataDir: a['data-dir'], json: a.json, intervalSeconds: cmd.requirePositive(a.watch, '--watch') }),
    ),
  )
  .command('serve', 'serve every volume and snapshot over NBD', serveCommand, async (a) => {
    const log = createLogger(a['log-level'], a['log-format'] as LogFormat);
    try {
      // Loaded here: the server, metrics and TLS are the daemon's alone, not every command's.
      const { startServe } = await import('./serve.js');
      const metrics = a['metrics-listen'];
      const d = await startServe(
        {
          dataDir: a['data-dir'],
          listen: a.listen,
          socket: a.socket,
          readOnly: a['read-only'],
          defaultVolume: checkName(a['default-volume']),
          defaultSize: parseSizeNumber(a['default-size'], 512),
          maxConnections: cmd.requirePositive(a['max-connections'], '--max-connections'),
          maxConnectionsPerExport: cmd.requirePositive(a['max-connections-per-export'], '--max-connections-per-export'),
          maxTotalBytesInFlight: a['max-bytes-in-flight'] === '0' ? 0 : parseSizeNumber(a['max-bytes-in-flight']),
          threadpoolSendBytes: a['threadpool-send'] === '0' ? 0 : parseSizeNumber(a['threadpool-send']),
          repos: a.repo,
          repoAccess: { encryption: a.encryption, s3Endpoint: a['s3-endpoint'], s3Region: a['s3-region'], s3PathStyle: a['s3-path-style'] },
          writeBehindBytes: a['write-behind'] === 'auto' ? undefined : a['write-behind'] === '0' ? 0 : parseSizeNumber(a['write-behind']),
          handshakeTimeoutMs: cmd.requirePositive(a['handshake-timeout'], '--handshake-timeout') * 1000,
          replyTimeoutMs: cmd.requirePositive(a['reply-timeout'], '--reply-timeout') * 1000,
          tls: { mode: a.tls, certificates: a['tls-certificates'], verifyPeer: a['tls-verify-peer'] },
          exports: ExportAccess.parse(a.exports),
          metricsListen: metrics && metrics !== 'off' ? metrics : undefined,
          autoExtend: {
            threshold: cmd.requirePositive(a['autoextend-threshold'], '--autoextend-threshold'),
            percent: cmd.requirePositive(a['autoextend-percent'], '--autoextend-percent'),
            maxBytes: a['autoextend-max'] ? parseSizeNumber(a['autoextend-max']) : 0,
          },
        },
        log,
      );
      let stopping = false;
      const shutdown = (signal: string) => {
        // A second signal during shutdown is ignored rather than killing us mid-flush.
        if (stopping) return;
        stopping = true;
        log.info({ signal }, 'shutting down: finishing requests in flight');
        d.stop().then(
          () => {
            log.info('stopped');
            log.flush();
            process.exit(0);
          },
          (err: unknown) => {
            log.error({ err }, 'shutdown failed');
            log.flush();
            process.exit(1);
          },
        );
      };
      process.on('SIGTERM', () => shutdown('SIGTERM'));
      process.on('SIGINT', () => shutdown('SIGINT'));
    } catch (err) {
      log.error({ err }, 'failed to start');
      log.flush();
      fail(err);
    }
  })
  .completion(
    'completion',
    'print a bash or zsh completion script: cowbd completion >> ~/.bashrc',
    (
      current: string,
      argv: Record<string, unknown>,
      defaults: (done: (err: unknown, list?: string[]) => void) => void,
      done: (list: string[]) => void,
    ) => {
      // yargs passes no raw words, and the one before the current tells an option's value (--origin).
      const words = process.argv.slice(process.argv.indexOf('--get-yargs-completions') + 1);
      const kind = current.startsWith('-') ? null : nameKind((argv._ as (string | number)[]) ?? [], current, words[words.length - 2]);
      if (!kind) return defaults((_err, list) => done(list ?? []));
      const dataDir = typeof argv['data-dir'] === 'string' ? argv['data-dir'] : DEFAULT_DATA_DIR;
      namesFor(kind, dataDir).then(done, () => done([]));
    },
  )
  .demandCommand(1, 'name a command; see --help')
  .strict()
  .help()
  .parseAsync();
