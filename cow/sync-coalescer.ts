// Concurrent sync requests share fdatasyncs: a caller arriving while one is in flight
// waits for the next, which covers every write completed before it began.
export class SyncCoalescer {
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;
  syncs = 0;

  constructor(private readonly doSync: () => Promise<void>) {}

  sync(): Promise<void> {
    if (!this.running) return this.start();
    if (!this.next) {
      this.next = this.running.then(
        () => {
          this.next = null;
          return this.start();
        },
        () => {
          this.next = null;
          return this.start();
        },
      );
    }
    return this.next;
  }

  private start(): Promise<void> {
    this.syncs++;
    const p = this.doSync().finally(() => {
      if (this.running === p) this.running = null;
    });
    this.running = p;
    return p;
  }
}
