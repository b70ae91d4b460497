/** Parses lvcreate-style sizes: a number with an optional K/M/G/T suffix, 1024-based. Bare numbers are bytes. */
export function parseSize(text: string): bigint {
  const m = /^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$/i.exec(text);
  if (!m) throw new RangeError(`invalid size "${text}": expected a number with an optional K, M, G or T suffix`);
  const exp = ' kmgtpe'.indexOf((m[2] || ' ').toLowerCase());
  return BigInt(m[1]!) * (1n << (10n * BigInt(exp)));
}
