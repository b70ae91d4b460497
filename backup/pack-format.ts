// The byte layout of a pack file (docs/backup-repository.md, "Pack files"): blobs back to back,
// then a trailer listing them, then the trailer's length, so a pack describes itself and a lost
// index can be rebuilt from the packs alone.
import { BackupErrors } from './errors.js';

export const PACK_MAGIC = 'CBPK';
export const PACK_VERSION = 1;
/** Packs are closed once they reach this size; restic's default. See docs/backup-repository.md. */
export const PACK_TARGET_BYTES = 16 * 1024 * 1024;
export const ID_BYTES = 32;
const HEAD_BYTES = 12; // magic, version, count
export const ENTRY_BYTES = ID_BYTES + 4 + 4 + 4 + 1;
const FLAG_ZSTD = 1;

/** Where one blob lives inside its pack. */
export interface BlobEntry {
  id: Buffer;
  offset: number;
  length: number; // stored bytes
  rawLength: number;
  compressed: boolean;
}

/** The trailer without its length word, which follows it in the pack (after sealing, if encrypted). */
export function encodeTrailer(blobs: readonly BlobEntry[]): Buffer {
  const size = HEAD_BYTES + blobs.length * ENTRY_BYTES;
  const b = Buffer.alloc(size);
  b.write(PACK_MAGIC, 0, 'latin1');
  b.writeUInt32LE(PACK_VERSION, 4);
  b.writeUInt32LE(blobs.length, 8);
  let at = HEAD_BYTES;
  for (const e of blobs) {
    e.id.copy(b, at);
    b.writeUInt32LE(e.offset, at + 32);
    b.writeUInt32LE(e.length, at + 36);
    b.writeUInt32LE(e.rawLength, at + 40);
    b.writeUInt8(e.compressed ? FLAG_ZSTD : 0, at + 44);
    at += ENTRY_BYTES;
  }
  return b;
}

/**
 * The stored trailer's length, read from a pack's last 4 bytes; checked against the pack's size.
 * `overhead` is what sealing adds to a trailer in an encrypted repository.
 */
export function trailerLength(last4: Buffer, packSize: number, pack: string, overhead = 0): number {
  const n = last4.readUInt32LE(0);
  if (n < HEAD_BYTES + overhead || n + 4 > packSize || (n - overhead - HEAD_BYTES) % ENTRY_BYTES !== 0) {
    throw BackupErrors.damagedPack(pack, `trailer length ${n} does not fit a pack of ${packSize} bytes`);
  }
  return n;
}

/** Decodes a trailer (without its length word) of a pack whose blobs end at `dataEnd`. */
export function decodeTrailer(t: Buffer, dataEnd: number, pack: string): BlobEntry[] {
  if (t.toString('latin1', 0, 4) !== PACK_MAGIC) throw BackupErrors.damagedPack(pack, 'trailer has no pack magic');
  const version = t.readUInt32LE(4);
  if (version !== PACK_VERSION) throw BackupErrors.damagedPack(pack, `trailer version ${version}, expected ${PACK_VERSION}`);
  const count = t.readUInt32LE(8);
  if (HEAD_BYTES + count * ENTRY_BYTES !== t.length)
    throw BackupErrors.damagedPack(pack, `trailer counts ${count} blobs, its length disagrees`);
  const blobs: BlobEntry[] = [];
  for (let i = 0, at = HEAD_BYTES; i < count; i++, at += ENTRY_BYTES) {
    const e: BlobEntry = {
      id: Buffer.from(t.subarray(at, at + ID_BYTES)),
      offset: t.readUInt32LE(at + 32),
      length: t.readUInt32LE(at + 36),
      rawLength: t.readUInt32LE(at + 40),
      compressed: (t.readUInt8(at + 44) & FLAG_ZSTD) !== 0,
    };
    if (e.offset + e.length > dataEnd) throw BackupErrors.damagedPack(pack, `blob ${e.id.toString('hex')} runs past the data`);
    blobs.push(e);
  }
  return blobs;
}
