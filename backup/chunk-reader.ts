// Reads the chunks a plan names from an NBD export, several requests in flight, and
// hands each chunk to a consumer in volume order: runs of adjacent chunks are read as
// one request of up to RUN_BYTES, into buffers reused from a small pool.
export interface ChunkSource {
  read(buf: Buffer, offset: number): Promise<void>;
}

/** Largest read: 16 chunks of 64 KiB amortise a request's cost; 8 in flight keep the daemon busy. */
const RUN_BYTES = 1 << 20;
const IN_FLIGHT = 8;

/**
 * Calls consume(index, data) for every chunk `want(index)` selects, in ascending order,
 * without waiting for the promise it may return; `data` stays valid until that promise
 * resolves. At most IN_FLIGHT runs are read ahead and IN_FLIGHT runs being consumed.
 */
export async function readChunks(
  src: ChunkSource,
  size: number,
  chunkSize: number,
  want: (index: number) => boolean,
  consume: (index: number, data: Buffer) => Promise<void> | void,
): Promise<void> {
  const count = Math.ceil(size / chunkSize);
  const perRun = Math.max(1, Math.floor(RUN_BYTES / chunkSize));
  const runs: Array<[number, number]> = [];
  for (let i = 0; i < count; ) {
    if (!want(i)) {
      i++;
      continue;
    }
    const first = i;
    while (i < count && i - first < perRun && want(i)) i++;
    runs.push([first, i]);
  }
  const free: Buffer[] = [];
  const take = () => free.pop() ?? Buffer.allocUnsafe(perRun * chunkSize);
  const reads: Array<Promise<Buffer>> = [];
  const start = (r: [number, number]): Promise<Buffer> => {
    const buf = take();
    const bytes = Math.min(size, r[1] * chunkSize) - r[0] * chunkSize;
    const view = buf.subarray(0, bytes);
    const p = src.read(view, r[0] * chunkSize).then(() => buf);
    // Awaited in order later; a failure of a later read must not count as unhandled meanwhile.
    p.catch(() => undefined);
    return p;
  };
  let issued = 0;
  while (issued < runs.length && issued < IN_FLIGHT) reads.push(start(runs[issued++]!));
  // Runs whose chunks are still being consumed; their buffers come back when they are done.
  const consuming: Promise<void>[] = [];
  try {
    for (let k = 0; k < runs.length; k++) {
      const buf = await reads[k]!;
      const [a, b] = runs[k]!;
      let pending: Promise<void>[] | undefined;
      for (let i = a; i < b; i++) {
        const off = (i - a) * chunkSize;
        const end = Math.min(size - a * chunkSize, off + chunkSize);
        const r = consume(i, buf.subarray(off, end));
        if (r) {
          pending ??= [];
          pending.push(r);
        }
      }
      reads[k] = undefined as unknown as Promise<Buffer>;
      if (!pending) free.push(buf);
      else {
        const done = Promise.all(pending).then(() => {
          free.push(buf);
        });
        done.catch(() => undefined);
        consuming.push(done);
        if (consuming.length >= IN_FLIGHT) await consuming.shift();
      }
      if (issued < runs.length) reads.push(start(runs[issued++]!));
    }
    await Promise.all(consuming);
  } finally {
    // Settle what is still in flight before the caller closes the connection.
    await Promise.allSettled([...reads.filter(Boolean), ...consuming]);
  }
}
