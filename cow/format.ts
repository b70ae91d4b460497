// On-disk format of a persistent exception store. Byte-level description in
// docs/exception-store.md; keep the two in step. All integers little-endian.
import { crc32 } from 'node:zlib';

export const FORMAT_VERSION = 1;
/** Header region: pool header + snapshot slot pairs. Data and metadata chunks follow. */
export const HEADER_BYTES = 128 * 1024;
export const SLOT_BYTES = 512;
export const SLOT_PAIR_BYTES = 1024;
export const MAX_SNAPSHOTS = HEADER_BYTES / SLOT_PAIR_BYTES - 1; // 127
export const META_BLOCK = 4096;
export const AREA_HEADER_BYTES = 32;
export const ENTRY_BYTES = 16;
export const NAME_MAX = 128;

export const POOL_MAGIC = 'CWPL';
export const SLOT_MAGIC = 'CWSL';
export const AREA_MAGIC = 'CWAR';

/** Store chunk 0 lies in the header, so 0 can mean "this chunk reads as zeros". */
export const ZERO_CHUNK = 0;
/**
 * An entry mapping a chunk here drops the snapshot's exception: a merge copied it back
 * into the origin, which now holds the snapshot's content. The last chunk number a store
 * could have, so never a real one.
 */
export const MERGED_CHUNK = 0xffffffff;

export const MIN_CHUNK = 4096;
export const MAX_CHUNK = 1 << 20;

export function validChunkSize(n: number): boolean {
  return Number.isInteger(n) && n >= MIN_CHUNK && n <= MAX_CHUNK && (n & (n - 1)) === 0;
}

export const headerChunks = (chunkSize: number): number => Math.ceil(HEADER_BYTES / chunkSize);
export const entriesPerArea = (chunkSize: number): number => (chunkSize - AREA_HEADER_BYTES) / ENTRY_BYTES;
export const slotOffset = (slot: number, copy: number): number => SLOT_PAIR_BYTES * (slot + 1) + SLOT_BYTES * copy;

const sealed = (buf: Buffer, len: number): number => crc32(buf.subarray(0, len - 4));

export interface PoolHeader {
  chunkSize: number;
  poolId: number;
  originSize: number;
  originName: string;
}

export function encodePoolHeader(h: PoolHeader): Buffer {
  const b = Buffer.alloc(SLOT_BYTES);
  b.write(POOL_MAGIC, 0, 'latin1');
  b.writeUInt32LE(FORMAT_VERSION, 4);
  b.writeUInt32LE(h.chunkSize, 8);
  b.writeUInt32LE(HEADER_BYTES, 12);
  b.writeUInt32LE(MAX_SNAPSHOTS, 16);
  b.writeUInt32LE(h.poolId >>> 0, 20);
  b.writeBigUInt64LE(BigInt(h.originSize), 24);
  const name = Buffer.from(h.originName, 'utf8').subarray(0, NAME_MAX);
  b.writeUInt8(name.length, 32);
  name.copy(b, 33);
  b.writeUInt32LE(sealed(b, SLOT_BYTES), SLOT_BYTES - 4);
  return b;
}

export function decodePoolHeader(b: Buffer): PoolHeader | string {
  if (b.toString('latin1', 0, 4) !== POOL_MAGIC) return 'bad magic';
  if (b.readUInt32LE(SLOT_BYTES - 4) !== sealed(b, SLOT_BYTES)) return 'bad header checksum';
  const version = b.readUInt32LE(4);
  if (version !== FORMAT_VERSION) return `unsupported version ${version}`;
  const chunkSize = b.readUInt32LE(8);
  if (!validChunkSize(chunkSize)) return `bad chunk size ${chunkSize}`;
  if (b.readUInt32LE(12) !== HEADER_BYTES || b.readUInt32LE(16) !== MAX_SNAPSHOTS) return 'bad header geometry';
  return {
    chunkSize,
    poolId: b.readUInt32LE(20),
    originSize: Number(b.readBigUInt64LE(24)),
    originName: b.toString('utf8', 33, 33 + b.readUInt8(32)),
  };
}

/** merging: being copied back into its origin (merge.ts); it is no longer served. */
export type SnapshotStateName = 'valid' | 'invalid' | 'overflow' | 'merging';
export type OverflowPolicy = 'invalidate' | 'overflow';
/**
 * Why a snapshot was invalidated: its store was full, the file system was (a sparse
 * store could not grow), an I/O error, or its removal began. 'unknown' for slots
 * written before the reason was recorded.
 */
export type InvalidReason = 'unknown' | 'full' | 'disk-full' | 'io-error' | 'removed';
const STATES: SnapshotStateName[] = ['valid', 'invalid', 'overflow', 'merging'];
const POLICIES: OverflowPolicy[] = ['invalidate', 'overflow'];
export const INVALID_REASONS: InvalidReason[] = ['unknown', 'full', 'disk-full', 'io-error', 'removed'];
/** Where the slot's invalidation record lies: zeros in slots written before it existed. */
const REASON_AT = 180;
const USED_AT_INVALIDATION_AT = 184;

export interface SlotRecord {
  seq: number;
  snapId: number;
  inUse: boolean;
  state: SnapshotStateName;
  policy: OverflowPolicy;
  readOnly: boolean;
  capacityChunks: number;
  firstArea: number;
  createdAt: number;
  name: string;
  /** Set while state is 'invalid'. */
  invalidReason?: InvalidReason;
  /** Chunks the snapshot held when it was invalidated. */
  usedAtInvalidation?: number;
}

export function encodeSlot(s: SlotRecord): Buffer {
  const b = Buffer.alloc(SLOT_BYTES);
  b.write(SLOT_MAGIC, 0, 'latin1');
  b.writeUInt32LE(FORMAT_VERSION, 4);
  b.writeBigUInt64LE(BigInt(s.seq), 8);
  b.writeUInt32LE(s.snapId >>> 0, 16);
  b.writeUInt8(s.inUse ? 1 : 0, 20);
  b.writeUInt8(STATES.indexOf(s.state), 21);
  b.writeUInt8(POLICIES.indexOf(s.policy), 22);
  b.writeUInt8(s.readOnly ? 1 : 0, 23);
  b.writeBigUInt64LE(BigInt(s.capacityChunks), 24);
  b.writeUInt32LE(s.firstArea >>> 0, 32);
  b.writeBigUInt64LE(BigInt(s.createdAt), 40);
  const name = Buffer.from(s.name, 'utf8').subarray(0, NAME_MAX);
  b.writeUInt8(name.length, 48);
  name.copy(b, 49);
  if (s.state === 'invalid') {
    b.writeUInt8(INVALID_REASONS.indexOf(s.invalidReason ?? 'unknown'), REASON_AT);
    b.writeBigUInt64LE(BigInt(s.usedAtInvalidation ?? 0), USED_AT_INVALIDATION_AT);
  }
  b.writeUInt32LE(sealed(b, SLOT_BYTES), SLOT_BYTES - 4);
  return b;
}

/** undefined for a never-written or torn copy. */
export function decodeSlot(b: Buffer): SlotRecord | undefined {
  if (b.toString('latin1', 0, 4) !== SLOT_MAGIC) return undefined;
  if (b.readUInt32LE(SLOT_BYTES - 4) !== sealed(b, SLOT_BYTES)) return undefined;
  if (b.readUInt32LE(4) !== FORMAT_VERSION) return undefined;
  const state = STATES[b.readUInt8(21)];
  const policy = POLICIES[b.readUInt8(22)];
  if (!state || !policy) return undefined;
  return {
    seq: Number(b.readBigUInt64LE(8)),
    snapId: b.readUInt32LE(16),
    inUse: b.readUInt8(20) === 1,
    state,
    policy,
    readOnly: b.readUInt8(23) === 1,
    capacityChunks: Number(b.readBigUInt64LE(24)),
    firstArea: b.readUInt32LE(32),
    createdAt: Number(b.readBigUInt64LE(40)),
    name: b.toString('utf8', 49, 49 + b.readUInt8(48)),
    invalidReason: state === 'invalid' ? (INVALID_REASONS[b.readUInt8(REASON_AT)] ?? 'unknown') : undefined,
    usedAtInvalidation: state === 'invalid' ? Number(b.readBigUInt64LE(USED_AT_INVALIDATION_AT)) : undefined,
  };
}

export interface AreaHeader {
  snapId: number;
  seq: number;
  nonce: number;
  next: number;
  poolId: number;
}

export function encodeAreaHeader(h: AreaHeader, b: Buffer): void {
  b.write(AREA_MAGIC, 0, 'latin1');
  b.writeUInt32LE(h.snapId >>> 0, 4);
  b.writeUInt32LE(h.seq >>> 0, 8);
  b.writeUInt32LE(h.nonce >>> 0, 12);
  b.writeUInt32LE(h.next >>> 0, 16);
  b.writeUInt32LE(h.poolId >>> 0, 20);
  b.writeUInt32LE(0, 24);
  b.writeUInt32LE(sealed(b, AREA_HEADER_BYTES), 28);
}

export function decodeAreaHeader(b: Buffer): AreaHeader | undefined {
  if (b.toString('latin1', 0, 4) !== AREA_MAGIC) return undefined;
  if (b.readUInt32LE(28) !== sealed(b, AREA_HEADER_BYTES)) return undefined;
  return {
    snapId: b.readUInt32LE(4),
    seq: b.readUInt32LE(8),
    nonce: b.readUInt32LE(12),
    next: b.readUInt32LE(16),
    poolId: b.readUInt32LE(20),
  };
}

/**
 * Check word of an exception entry. Binds the entry to its area (nonce) and slot, so a
 * torn write, or whatever a reused chunk held before, never parses as an exception.
 */
export function entryCheck(chunk: number, phys: number, nonce: number, index: number): number {
  let h = Math.imul(chunk ^ nonce, 0x9e3779b1);
  h = Math.imul(h ^ (h >>> 15) ^ phys, 0x85ebca77);
  h = Math.imul(h ^ (h >>> 13) ^ index, 0xc2b2ae3d);
  h ^= h >>> 16;
  return (h ^ 0x5bd1e995) >>> 0;
}

export function encodeEntry(b: Buffer, at: number, chunk: number, phys: number, nonce: number, index: number): void {
  b.writeUInt32LE(chunk >>> 0, at);
  b.writeUInt32LE(phys >>> 0, at + 4);
  b.writeUInt32LE(0, at + 8);
  b.writeUInt32LE(entryCheck(chunk, phys, nonce, index), at + 12);
}

export const randomU32 = (): number => (Math.floor(Math.random() * 0xfffffffe) + 1) >>> 0;
