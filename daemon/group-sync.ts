// Group commit for fdatasync: callers that arrive while a sync runs share the
// next one, so N concurrent FUA writes or FLUSHes cost at most two syncs.

export class GroupSync {
  private running?: Promise<void>;
  private next?: Promise<void>;

  constructor(private readonly doSync: () => Promise<void>) {}

  /** Resolves once a sync that started after this call has completed. */
  sync(): Promise<void> {
    if (!this.running) return this.start();
    // The running sync may have started before our caller's write completed: wait for a fresh one.
    this.next ??= this.running.then(
      () => this.start(),
      () => this.start(),
    );
    return this.next;
  }

  private start(): Promise<void> {
    this.next = undefined;
    const p = this.doSync().finally(() => {
      if (this.running === p) this.running = undefined;
    });
    this.running = p;
    return p;
  }
}
