// A backup's manifest file (docs/backup-repository.md, "Backups"): a JSON header that listing
// reads alone, the zstd-compressed chunk table, and a SHA-256 of everything before it.
import { createHash, randomBytes } from 'node:crypto';
import { compress, decompress } from '@mongodb-js/zstd';
import { ChunkTable } from './chunk-table.js';

export const MANIFEST_MAGIC = 'CBMF';
export const MANIFEST_FORMAT = 'cowbd-backup-manifest';
export const MANIFEST_VERSION = 1;
const PREFIX_BYTES = 8; // magic, header length
const SUM_BYTES = 32;

export interface BackupStats {
  bytesRead: number;
  newBytes: number;
  dedupBytes: number;
  storedBytes: number;
  zeroChunks: number;
  chunks: number;
  durationMs: number;
}

export interface ManifestHeader {
  id: string;
  volume: string;
  size: number;
  chunkSize: number;
  time: string;
  parent?: string;
  group?: string;
  snapshot: string;
  host: string;
  checkpoint?: { tracker: string; generation: number };
  stats: BackupStats;
}

export interface Manifest extends ManifestHeader {
  chunks: ChunkTable;
}

/** A new backup id: 16 random bytes in hex (not a content hash, so it is known before the backup ends). */
export function newManifestId(): string {
  return randomBytes(16).toString('hex');
}

export const MANIFEST_ID_RE = /^[0-9a-f]{32}$/;

function headerOf(m: ManifestHeader): ManifestHeader {
  const h: ManifestHeader = {
    id: m.id,
    volume: m.volume,
    size: m.size,
    chunkSize: m.chunkSize,
    time: m.time,
    snapshot: m.snapshot,
    host: m.host,
    stats: { ...m.stats },
  };
  if (m.parent !== undefined) h.parent = m.parent;
  if (m.group !== undefined) h.group = m.group;
  if (m.checkpoint !== undefined) h.checkpoint = { tracker: m.checkpoint.tracker, generation: m.checkpoint.generation };
  return h;
}

/** Checks a manifest before it is saved; returns what is wrong, or undefined. */
export function manifestProblem(m: Manifest): string | undefined {
  if (!MANIFEST_ID_RE.test(m.id)) return `id ${JSON.stringify(m.id)} is not 32 hex digits`;
  if (typeof m.volume !== 'string' || m.volume === '') return 'volume is empty';
  if (!Number.isSafeInteger(m.size) || m.size < 0) return `size ${m.size} is not a byte count`;
  if (!Number.isInteger(m.chunkSize) || m.chunkSize <= 0) return `chunk size ${m.chunkSize} is invalid`;
  if (m.chunks.count !== Math.ceil(m.size / m.chunkSize)) {
    return `chunk table has ${m.chunks.count} chunks, a volume of ${m.size} bytes has ${Math.ceil(m.size / m.chunkSize)}`;
  }
  if (Number.isNaN(Date.parse(m.time))) return `time ${JSON.stringify(m.time)} is not an ISO date`;
  return undefined;
}

export async function encodeManifest(m: Manifest): Promise<Buffer> {
  const header = Buffer.from(
    JSON.stringify({
      format: MANIFEST_FORMAT,
      version: MANIFEST_VERSION,
      ...headerOf(m),
      chunkCount: m.chunks.count,
      nonZero: m.chunks.nonZero,
    }),
  );
  const prefix = Buffer.alloc(PREFIX_BYTES);
  prefix.write(MANIFEST_MAGIC, 0, 'latin1');
  prefix.writeUInt32LE(header.length, 4);
  const body = await compress(m.chunks.encode(), 3);
  const sum = createHash('sha256').update(prefix).update(header).update(body).digest();
  return Buffer.concat([prefix, header, body, sum]);
}

/** The header's JSON length from a manifest's first 8 bytes; throws a plain Error when they are not a manifest's. */
export function headerLength(prefix: Buffer): number {
  if (prefix.length < PREFIX_BYTES || prefix.toString('latin1', 0, 4) !== MANIFEST_MAGIC) throw new Error('no manifest magic');
  return prefix.readUInt32LE(4);
}
export const MANIFEST_PREFIX_BYTES = PREFIX_BYTES;

interface StoredHeader extends ManifestHeader {
  chunkCount: number;
  nonZero: number;
}

/** Parses and checks the JSON header; throws a plain Error naming what is wrong. */
export function decodeHeader(json: Buffer, fileId: string): StoredHeader {
  let h: Record<string, unknown>;
  try {
    h = JSON.parse(json.toString('utf8'));
  } catch {
    throw new Error('header is not JSON');
  }
  if (h.format !== MANIFEST_FORMAT) throw new Error(`format ${JSON.stringify(h.format)} is not ${MANIFEST_FORMAT}`);
  if (typeof h.version !== 'number' || h.version > MANIFEST_VERSION) {
    throw new Error(`manifest version ${h.version}; this cowbd reads version ${MANIFEST_VERSION} at most`);
  }
  if (h.id !== fileId) throw new Error(`header names backup ${String(h.id)}, file is ${fileId}`);
  const num = (k: string) => typeof h[k] === 'number' && Number.isSafeInteger(h[k]) && (h[k] as number) >= 0;
  const str = (k: string) => typeof h[k] === 'string';
  for (const k of ['size', 'chunkSize', 'chunkCount', 'nonZero']) if (!num(k)) throw new Error(`header field ${k} is missing or invalid`);
  for (const k of ['volume', 'time', 'snapshot', 'host']) if (!str(k)) throw new Error(`header field ${k} is missing or invalid`);
  if (typeof h.stats !== 'object' || h.stats === null) throw new Error('header field stats is missing');
  const { format: _f, version: _v, ...rest } = h;
  return rest as unknown as StoredHeader;
}

/** Decodes a whole manifest file; throws a plain Error naming what is wrong. */
export async function decodeManifest(file: Buffer, fileId: string): Promise<Manifest> {
  if (file.length < PREFIX_BYTES + SUM_BYTES) throw new Error(`file is ${file.length} bytes, too short`);
  const hlen = headerLength(file);
  const bodyStart = PREFIX_BYTES + hlen;
  const bodyEnd = file.length - SUM_BYTES;
  if (bodyStart > bodyEnd) throw new Error('header runs past the end of the file');
  const sum = createHash('sha256').update(file.subarray(0, bodyEnd)).digest();
  if (!sum.equals(file.subarray(bodyEnd))) throw new Error('checksum mismatch');
  const h = decodeHeader(file.subarray(PREFIX_BYTES, bodyStart), fileId);
  let body: Buffer;
  try {
    body = await decompress(file.subarray(bodyStart, bodyEnd));
  } catch (e) {
    throw new Error(`chunk table does not decompress: ${(e as Error).message}`);
  }
  const { chunkCount, nonZero, ...header } = h;
  return { ...header, chunks: ChunkTable.decode(chunkCount, nonZero, body) };
}

export function toHeader(h: ManifestHeader): ManifestHeader {
  return headerOf(h);
}
