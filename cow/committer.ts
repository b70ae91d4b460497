// Group commit for a persistent store, pipelined so one fdatasync does two jobs' work.
//
// A job's copied data must be durable before the metadata naming it is written
// (else a crash could leave an exception pointing at garbage) and the metadata must be
// durable before the job's origin write proceeds. So each job needs a sync after its
// data and a sync after its metadata. Loop iteration k writes the metadata of the jobs
// whose data the previous sync covered, then syncs once: that sync makes batch k-1's
// metadata durable and batch k's data durable. Under load every sync serves two
// batches and any number of jobs; an idle store pays two syncs for a lone job, as
// dm-snapshot does (PREFLUSH + FUA on its metadata write).

export interface Job {
  /** False when the job wrote no data (zero exceptions, slot updates). */
  dataSync: boolean;
  /** Appends this job's metadata to the writes list. Runs in commit order. */
  encode(out: Array<{ offset: number; buf: Buffer }>): void;
  /** In-memory effects, once durable. Runs in commit order, before the job resolves. */
  apply(): void;
  /** Exceptions the job commits, for metrics. */
  exceptions: number;
}

interface Queued {
  job: Job;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export interface CommitterIo {
  write(buf: Buffer, offset: number): Promise<void>;
  sync(): Promise<void>;
}

export class Committer {
  private queued: Queued[] = [];
  private running = false;
  private idleWaiters: Array<() => void> = [];
  /** Failure poisons the store: metadata state on disk is no longer known. */
  failed: unknown = undefined;

  constructor(
    private readonly io: CommitterIo | undefined,
    private readonly onCommit: (seconds: number, exceptions: number) => void,
  ) {}

  submit(job: Job): Promise<void> {
    if (this.failed !== undefined) return Promise.reject(this.failed);
    if (!this.io) {
      // Transient store: nothing to make durable.
      job.apply();
      if (job.exceptions) this.onCommit(0, job.exceptions);
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      this.queued.push({ job, resolve, reject });
      if (!this.running) void this.loop();
    });
  }

  /** Resolves when nothing is queued or in flight. */
  idle(): Promise<void> {
    if (!this.running) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private async loop(): Promise<void> {
    const io = this.io!;
    this.running = true;
    let dataDurable: Queued[] = [];
    let metaNow: Queued[] = [];
    try {
      while (this.queued.length || dataDurable.length) {
        const start = process.hrtime.bigint();
        const incoming = this.queued;
        this.queued = [];
        metaNow = dataDurable;
        const dataNow: Queued[] = [];
        for (const q of incoming) (q.job.dataSync ? dataNow : metaNow).push(q);
        // Until the sync below completes these are owed a rejection on failure.
        dataDurable = dataNow;
        if (metaNow.length) {
          const writes: Array<{ offset: number; buf: Buffer }> = [];
          for (const q of metaNow) q.job.encode(writes);
          await Promise.all(writes.map((w) => io.write(w.buf, w.offset)));
        }
        await io.sync();
        const seconds = Number(process.hrtime.bigint() - start) / 1e9;
        let exceptions = 0;
        for (const q of metaNow) {
          q.job.apply();
          exceptions += q.job.exceptions;
        }
        if (metaNow.length) this.onCommit(seconds, exceptions);
        for (const q of metaNow) q.resolve();
        metaNow = [];
      }
    } catch (e) {
      this.failed = e;
      for (const q of [...metaNow, ...dataDurable, ...this.queued]) q.reject(e);
      this.queued = [];
    } finally {
      this.running = false;
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }
}
