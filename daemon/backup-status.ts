// What the daemon knows of backups: each outcome the backup command reports, kept in
// DATA_DIR/backup-status.json (so "last success" survives a restart and the 26-hour
// alert does not fire on one) and exported as metrics by volume and repository.
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import client from 'prom-client';
import type { BackupReport } from '../backup/create.js';

interface Record {
  volume: string;
  repository: string;
  lastSuccess?: number;
  lastFailure?: number;
  lastDurationSeconds?: number;
  successes: number;
  failures: number;
  bytesRead: number;
  newBytes: number;
  dedupBytes: number;
}

const FILE = 'backup-status.json';

export class BackupStatus {
  private readonly records = new Map<string, Record>();
  private saving: Promise<void> = Promise.resolve();

  private constructor(
    private readonly dataDir: string,
    private readonly log: Logger,
  ) {}

  static async open(dataDir: string, log: Logger): Promise<BackupStatus> {
    const s = new BackupStatus(dataDir, log);
    try {
      const list = JSON.parse(await readFile(join(dataDir, FILE), 'utf8')) as Record[];
      for (const r of list) s.records.set(`${r.volume}\0${r.repository}`, r);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') log.warn({ err }, `ignoring an unreadable ${FILE}`);
    }
    return s;
  }

  record(r: BackupReport): void {
    const key = `${r.volume}\0${r.repository}`;
    let rec = this.records.get(key);
    if (!rec) {
      rec = { volume: r.volume, repository: r.repository, successes: 0, failures: 0, bytesRead: 0, newBytes: 0, dedupBytes: 0 };
      this.records.set(key, rec);
    }
    const now = Date.now() / 1000;
    if (r.ok && r.stats) {
      rec.lastSuccess = now;
      rec.successes++;
      rec.lastDurationSeconds = r.stats.durationMs / 1000;
      rec.bytesRead += r.stats.bytesRead;
      rec.newBytes += r.stats.newBytes;
      rec.dedupBytes += r.stats.dedupBytes;
      this.log.info(
        { volume: r.volume, repository: r.repository, backup: r.id, mode: r.mode, ...r.stats },
        `backup of ${r.volume} done: ${r.stats.bytesRead} bytes read, ${r.stats.newBytes} new, ${r.stats.dedupBytes} deduplicated`,
      );
    } else {
      rec.lastFailure = now;
      rec.failures++;
      this.log.error({ volume: r.volume, repository: r.repository, error: r.error }, `backup of ${r.volume} failed: ${r.error}`);
    }
    this.saving = this.saving.then(() => this.save()).catch((err: unknown) => this.log.error({ err }, `could not write ${FILE}`));
  }

  private async save(): Promise<void> {
    const path = join(this.dataDir, FILE);
    await writeFile(`${path}.tmp`, JSON.stringify([...this.records.values()], null, 1), { mode: 0o600 });
    await rename(`${path}.tmp`, path);
  }

  /** Registers the backup series; read at scrape time. */
  register(registry: client.Registry): void {
    const records = () => [...this.records.values()];
    const labelNames = ['volume', 'repository'] as const;
    const gauge = (name: string, help: string, value: (r: Record) => number | undefined) =>
      new client.Gauge({
        name,
        help,
        labelNames,
        registers: [registry],
        collect() {
          this.reset();
          for (const r of records()) {
            const v = value(r);
            if (v !== undefined) this.set({ volume: r.volume, repository: r.repository }, v);
          }
        },
      });
    const counter = (name: string, help: string, value: (r: Record) => number) =>
      new client.Counter({
        name,
        help,
        labelNames,
        registers: [registry],
        collect() {
          this.reset();
          for (const r of records()) this.inc({ volume: r.volume, repository: r.repository }, value(r));
        },
      });
    gauge('cowbd_backup_last_success_timestamp_seconds', 'Unix time of the last successful backup', (r) => r.lastSuccess);
    gauge('cowbd_backup_last_failure_timestamp_seconds', 'Unix time of the last failed backup', (r) => r.lastFailure);
    gauge('cowbd_backup_last_duration_seconds', 'Duration of the last successful backup', (r) => r.lastDurationSeconds);
    counter('cowbd_backups_total', 'Successful backups', (r) => r.successes);
    counter('cowbd_backup_failures_total', 'Failed backups', (r) => r.failures);
    counter('cowbd_backup_read_bytes_total', 'Bytes read from snapshots by backups', (r) => r.bytesRead);
    counter('cowbd_backup_new_bytes_total', 'Bytes of chunks backups stored that the repository lacked', (r) => r.newBytes);
    counter('cowbd_backup_dedup_bytes_total', 'Bytes of chunks backups found already stored or unchanged', (r) => r.dedupBytes);
  }
}
