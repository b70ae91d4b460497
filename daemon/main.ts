// The cowbd command line (yargs).
import yargs, { type Argv } from 'yargs';
import { hideBin } from 'yargs/helpers';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createLogger, type LogFormat } from './logger.js';
import { isCowbdError } from './errors.js';
import { parseSizeNumber, formatSize } from './sizes.js';
import { checkName } from './names.js';
import { createVolume, listVolumes } from './volumes.js';
import { startServe } from './serve.js';

const DEFAULT_DATA_DIR = process.env.COWBD_DATA_DIR ?? join(homedir(), '.local', 'share', 'cowbd');

function withDataDir<T>(y: Argv<T>) {
  return y.option('data-dir', {
    type: 'string',
    default: DEFAULT_DATA_DIR,
    describe: 'directory holding volumes and snapshot stores (env COWBD_DATA_DIR)',
  });
}

function fail(err: unknown): never {
  if (isCowbdError(err)) {
    process.stderr.write(`cowbd: ${err.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`cowbd: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exit(1);
}

await yargs(hideBin(process.argv))
  .scriptName('cowbd')
  .usage('$0 <command> [options]')
  .command('volume', 'manage origin volumes', (y) =>
    y
      .command(
        'create <name>',
        'create a sparse volume file in the data directory',
        (y) =>
          withDataDir(y)
            .positional('name', { type: 'string', demandOption: true, describe: 'volume name' })
            .option('size', { type: 'string', demandOption: true, describe: 'size with K/M/G/T suffix (1024-based)' })
            .option('json', { type: 'boolean', default: false, describe: 'print JSON' }),
        async (a) => {
          try {
            const size = parseSizeNumber(a.size, 512);
            const v = await createVolume(a['data-dir'], checkName(a.name), size);
            if (a.json) console.log(JSON.stringify(v));
            else console.log(`created volume ${v.name} (${formatSize(v.size)}) at ${v.path}`);
          } catch (err) {
            fail(err);
          }
        },
      )
      .command(
        'list',
        'list volumes',
        (y) => withDataDir(y).option('json', { type: 'boolean', default: false }),
        async (a) => {
          const vols = await listVolumes(a['data-dir']);
          if (a.json) console.log(JSON.stringify(vols));
          else {
            console.log('NAME'.padEnd(24) + 'SIZE');
            for (const v of vols) console.log(v.name.padEnd(24) + formatSize(v.size));
          }
        },
      )
      .demandCommand(1),
  )
  .command(
    'serve',
    'serve every volume in the data directory over NBD',
    (y) =>
      withDataDir(y)
        .option('listen', { type: 'string', array: true, describe: 'TCP address HOST:PORT (default 127.0.0.1:10809); repeatable' })
        .option('socket', { type: 'string', describe: 'also (or only) listen on this unix socket' })
        .option('read-only', { type: 'boolean', default: false, describe: 'serve every export read-only' })
        .option('default-volume', { type: 'string', default: 'default', describe: 'volume served for the empty export name, created if the data directory has none' })
        .option('default-size', { type: 'string', default: '1G', describe: 'size of the default volume when it is created' })
        .option('max-connections', { type: 'number', default: 1024 })
        .option('handshake-timeout', { type: 'number', default: 30, describe: 'seconds a client has to finish the handshake' })
        .option('log-level', { type: 'string', default: 'info', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] })
        .option('log-format', { type: 'string', default: 'json', choices: ['json', 'pretty'] }),
    async (a) => {
      const log = createLogger(a['log-level'], a['log-format'] as LogFormat);
      try {
        const d = await startServe(
          {
            dataDir: a['data-dir'],
            listen: a.listen,
            socket: a.socket,
            readOnly: a['read-only'],
            defaultVolume: checkName(a['default-volume']),
            defaultSize: parseSizeNumber(a['default-size'], 512),
            maxConnections: a['max-connections'],
            handshakeTimeoutMs: a['handshake-timeout'] * 1000,
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
            (err) => {
              log.error({ err }, 'shutdown failed');
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
    },
  )
  .demandCommand(1)
  .strict()
  .help()
  .parseAsync();
