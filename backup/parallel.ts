// Runs an async function over a list with a bound on how many run at once, keeping the order of
// results: on object storage each call is a round trip, and one at a time they add up.

/** Requests to a repository's storage at once when reading many small objects. */
export const STORAGE_READS_IN_FLIGHT = 8;

export async function mapLimit<T, R>(items: readonly T[], limit: number, fn: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
