// Byte ranges as chunks: the one place that turns an offset and a length into chunk
// indexes, so the write, zero, read and copy paths cannot disagree at the edges.

/** Index of the first chunk a range touches. */
export function firstChunk(offset: number, chunkSize: number): number {
  return Math.floor(offset / chunkSize);
}

/** Index of the last chunk a non-empty range touches. */
export function lastChunk(offset: number, length: number, chunkSize: number): number {
  return Math.floor((offset + length - 1) / chunkSize);
}

/**
 * Calls fn for each chunk-sized piece of [offset, offset + length): the chunk's index,
 * where the piece starts within that chunk, its length, and its position in the range.
 */
export function forEachChunk(
  offset: number,
  length: number,
  chunkSize: number,
  fn: (chunk: number, within: number, n: number, pos: number) => void,
): void {
  let pos = 0;
  let c = Math.floor(offset / chunkSize);
  while (pos < length) {
    const within = offset + pos - c * chunkSize;
    const n = Math.min(chunkSize - within, length - pos);
    fn(c, within, n, pos);
    pos += n;
    c++;
  }
}

/** Sorted chunk indexes as [byteOffset, byteLength] ranges, adjacent chunks merged. */
export function chunkRanges(chunks: Iterable<number>, chunkSize: number): Array<[number, number]> {
  const ranges: Array<[number, number]> = [];
  for (const c of chunks) {
    const last = ranges[ranges.length - 1];
    if (last && last[0] + last[1] === c * chunkSize) last[1] += chunkSize;
    else ranges.push([c * chunkSize, chunkSize]);
  }
  return ranges;
}
