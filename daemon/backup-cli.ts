// The `cowbd backup` command tree (yargs); the work is in backup-commands.ts, loaded only
// when a backup command runs (zstd, the NBD client), so other commands start faster.
import type { Argv } from 'yargs';
import { repoAccessFrom, repoAccessOptions } from './repo-access.js';

type Common = <T>(y: Argv<T>) => Argv<T & { 'data-dir': string; json: boolean }>;
type Run = <A>(f: (a: A) => Promise<void>) => (a: A) => Promise<void>;

export function backupCommands(y: Argv, common: Common, run: Run): Argv {
  const withRepo = <T>(y: Argv<T>) =>
    repoAccessOptions(
      common(y).option('repo', {
        type: 'string',
        demandOption: true,
        describe: 'backup repository: a directory (local disk or NFS) or s3://BUCKET/PREFIX',
      }),
    );
  const withProgress = <T>(y: Argv<T>) =>
    y.option('progress', { type: 'boolean', default: true, describe: 'a live progress bar on a terminal (--no-progress: none)' });
  return y
    .command(
      'init',
      'create an empty backup repository',
      (y) => withRepo(y),
      run(async (a) => (await import('./backup-commands.js')).backupInit({ dataDir: a['data-dir'], json: a.json, ...repoAccessFrom(a) })),
    )
    .command(
      'create <volumes..>',
      'back up volumes (several: one consistency group, snapshotted at one instant)',
      (y) =>
        withProgress(withRepo(y))
          .positional('volumes', { type: 'string', array: true, demandOption: true })
          .option('from-snapshot', { type: 'string', describe: 'back up this existing snapshot instead of taking one' })
          .option('keep-snapshot', { type: 'boolean', default: false, describe: 'keep the snapshot the backup read' })
          .option('snapshot-size', {
            type: 'string',
            describe: "exception store of the backup's snapshot (default a fifth of the volume, at least 64M)",
          })
          .option('freeze', { type: 'string', describe: 'freeze this mounted file system (fsfreeze) while the snapshot is taken' })
          .option('freeze-timeout', { type: 'number', default: 10, describe: 'seconds writers may be held frozen at most' })
          .option('nice', { type: 'number', default: 10, describe: 'CPU priority of the backup process (nice(1)); 0 keeps it' }),
      run(async (a) =>
        (await import('./backup-commands.js')).backupCreate({
          dataDir: a['data-dir'],
          json: a.json,
          ...repoAccessFrom(a),
          volumes: a.volumes as string[],
          fromSnapshot: a['from-snapshot'],
          keepSnapshot: a['keep-snapshot'],
          snapshotSize: a['snapshot-size'],
          freeze: a.freeze,
          freezeTimeout: a['freeze-timeout'],
          progress: a.progress,
          nice: a.nice,
        }),
      ),
    )
    .command(
      'list',
      'list the backups in a repository',
      (y) => withRepo(y).option('volume', { type: 'string', describe: 'only backups of this volume' }),
      run(async (a) =>
        (await import('./backup-commands.js')).backupList({ dataDir: a['data-dir'], json: a.json, ...repoAccessFrom(a), volume: a.volume }),
      ),
    )
    .command(
      'verify [id]',
      'check every manifest and chunk reference; --read-data also reads and hashes every chunk',
      (y) =>
        withRepo(y)
          .positional('id', { type: 'string', describe: 'only this backup (id or unique prefix)' })
          .option('read-data', { type: 'boolean', default: false }),
      run(async (a) =>
        (await import('./backup-commands.js')).backupVerify({
          dataDir: a['data-dir'],
          json: a.json,
          ...repoAccessFrom(a),
          id: a.id,
          readData: a['read-data'],
        }),
      ),
    )
    .command(
      'restore <id>',
      'write a backup back to a new volume or a file, every chunk checked against its hash',
      (y) =>
        withProgress(withRepo(y))
          .positional('id', { type: 'string', demandOption: true, describe: 'backup id or unique prefix' })
          .option('to-volume', { type: 'string', describe: 'a new volume of the running daemon' })
          .option('to-file', { type: 'string', describe: 'a new file (sparse where the backup is zero)' })
          .option('force', { type: 'boolean', default: false, describe: 'overwrite an existing --to-file' })
          .option('verify', {
            type: 'boolean',
            default: false,
            describe: 'then read every written chunk back from the target and check its hash (as restic restore --verify)',
          })
          .conflicts('to-volume', 'to-file')
          .check((a) => {
            if (!a['to-volume'] && !a['to-file']) throw new Error('name a target: --to-volume NEW or --to-file PATH');
            return true;
          }),
      run(async (a) =>
        (await import('./backup-commands.js')).backupRestore({
          dataDir: a['data-dir'],
          json: a.json,
          ...repoAccessFrom(a),
          id: a.id,
          toVolume: a['to-volume'],
          toFile: a['to-file'],
          force: a.force,
          progress: a.progress,
          verify: a.verify,
        }),
      ),
    )
    .command(
      'prune',
      'forget backups outside the keep policy and free the chunks no backup uses',
      (y) =>
        withRepo(y)
          .option('keep-last', { type: 'number', describe: 'the N newest backups of each volume' })
          .option('keep-daily', { type: 'number', describe: 'the newest of each of the last N days' })
          .option('keep-weekly', { type: 'number', describe: 'the newest of each of the last N weeks' })
          .option('keep-monthly', { type: 'number', describe: 'the newest of each of the last N months' })
          .option('volume', { type: 'string', describe: 'only backups of this volume' })
          .option('dry-run', { type: 'boolean', default: false })
          .option('grace', {
            type: 'string',
            default: '1h',
            describe: 'leave packs holding chunks of no backup alone until this old (a backup may still be writing them): 30m, 1h, 0',
          })
          .check((a) => {
            if ([a['keep-last'], a['keep-daily'], a['keep-weekly'], a['keep-monthly']].every((v) => v === undefined))
              throw new Error('give a keep policy: --keep-last, --keep-daily, --keep-weekly or --keep-monthly');
            return true;
          }),
      run(async (a) =>
        (await import('./backup-commands.js')).backupPrune({
          dataDir: a['data-dir'],
          json: a.json,
          ...repoAccessFrom(a),
          volume: a.volume,
          dryRun: a['dry-run'],
          grace: a.grace,
          keep: { last: a['keep-last'], daily: a['keep-daily'], weekly: a['keep-weekly'], monthly: a['keep-monthly'] },
        }),
      ),
    )
    .demandCommand(1, 'name a backup command');
}
