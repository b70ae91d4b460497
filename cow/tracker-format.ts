// On-disk layout of a change tracker file (DATA_DIR/cow/NAME.cbt), see docs/cow-design.md,
// "Change tracking". Two header copies (pages 0 and 1) are written alternately, the newest
// valid one wins, so a torn header write leaves the previous one; then the base bitmap and
// GENERATIONS bitmap slots, each a whole number of 4 KiB pages, 1 bit per chunk, LSB first.
import { crc32 } from 'node:zlib';

export const TRACKER_MAGIC = 'COWBDCBT';
export const TRACKER_VERSION = 1;
export const TRACKER_CHUNK = 65536;
export const PAGE = 4096;
/** Generations whose bitmaps are kept (see docs/tuning.md, CHANGE_TRACKER). */
export const GENERATIONS = 32;
/** Snapshot names remembered with their checkpoints; the oldest go first. */
export const MAX_NAMED_CHECKPOINTS = 64;
const HEADER_COPIES = 2;
const NAMES_AT = 128;

export interface TrackerHeader {
  volumeSize: number;
  /** 32 hex digits, new for every reset: a backup chain made under another id is not continued. */
  id: string;
  /** Bumped by every header write: the copy with the higher one wins. */
  seq: number;
  generation: number;
  /** The oldest generation changedBetween may start from. */
  trustedFrom: number;
  /** allocatedBefore is exact: tracking began on an empty volume. */
  allocationKnown: boolean;
  /** Generations below this are folded into the base bitmap (their slots may be reused). */
  foldedBelow: number;
  /** The last close was clean, with the volume file's mtime and size then. */
  clean: boolean;
  cleanMtimeMs: number;
  cleanSize: number;
  /** snapshot name -> checkpoint, oldest first. */
  names: Array<[string, number]>;
}

export function bitmapBytes(chunks: number): number {
  return Math.ceil(Math.ceil(chunks / 8) / PAGE) * PAGE;
}

export const baseOffset = (): number => HEADER_COPIES * PAGE;
export const slotOffset = (bytes: number, generation: number): number => baseOffset() + bytes * (1 + (generation % GENERATIONS));
export const trackerFileSize = (bytes: number): number => baseOffset() + bytes * (1 + GENERATIONS);

/** The page the header copy of this seq goes to. */
export const headerOffset = (seq: number): number => (seq % HEADER_COPIES) * PAGE;

export function encodeHeader(h: TrackerHeader, out: Buffer = Buffer.alloc(PAGE)): Buffer {
  out.fill(0);
  out.write(TRACKER_MAGIC, 0, 'latin1');
  out.writeUInt32LE(TRACKER_VERSION, 8);
  out.writeUInt32LE(TRACKER_CHUNK, 12);
  out.writeDoubleLE(h.volumeSize, 16);
  out.write(h.id, 24, 16, 'hex');
  out.writeDoubleLE(h.seq, 40);
  out.writeUInt32LE(h.generation, 48);
  out.writeUInt32LE(h.trustedFrom, 52);
  out.writeUInt32LE(h.foldedBelow, 56);
  out.writeUInt8(h.allocationKnown ? 1 : 0, 60);
  out.writeUInt8(h.clean ? 1 : 0, 61);
  out.writeDoubleLE(h.cleanMtimeMs, 64);
  out.writeDoubleLE(h.cleanSize, 72);
  let at = NAMES_AT + 2;
  let n = 0;
  // Newest first until the page is full, so a long name costs old entries, never new ones.
  for (let i = h.names.length - 1; i >= 0 && n < MAX_NAMED_CHECKPOINTS; i--) {
    const [name, gen] = h.names[i]!;
    const len = Buffer.byteLength(name);
    if (len > 255 || at + 5 + len > PAGE - 4) break;
    out.writeUInt32LE(gen, at);
    out.writeUInt8(len, at + 4);
    out.write(name, at + 5, 'utf8');
    at += 5 + len;
    n++;
  }
  out.writeUInt16LE(n, NAMES_AT);
  out.writeUInt32LE(crc32(out.subarray(0, PAGE - 4)), PAGE - 4);
  return out;
}

/** The header in one copy, or a reason it is not one. */
export function decodeHeader(b: Buffer): TrackerHeader | string {
  if (b.toString('latin1', 0, 8) !== TRACKER_MAGIC) return 'bad magic';
  if (b.readUInt32LE(PAGE - 4) !== crc32(b.subarray(0, PAGE - 4))) return 'bad checksum';
  const version = b.readUInt32LE(8);
  if (version !== TRACKER_VERSION) return `unknown version ${version}`;
  const chunk = b.readUInt32LE(12);
  if (chunk !== TRACKER_CHUNK) return `chunk size ${chunk}`;
  const names: Array<[string, number]> = [];
  let at = NAMES_AT + 2;
  for (let i = b.readUInt16LE(NAMES_AT); i > 0; i--) {
    const len = b.readUInt8(at + 4);
    names.unshift([b.toString('utf8', at + 5, at + 5 + len), b.readUInt32LE(at)]);
    at += 5 + len;
  }
  return {
    volumeSize: b.readDoubleLE(16),
    id: b.toString('hex', 24, 40),
    seq: b.readDoubleLE(40),
    generation: b.readUInt32LE(48),
    trustedFrom: b.readUInt32LE(52),
    foldedBelow: b.readUInt32LE(56),
    allocationKnown: b.readUInt8(60) === 1,
    clean: b.readUInt8(61) === 1,
    cleanMtimeMs: b.readDoubleLE(64),
    cleanSize: b.readDoubleLE(72),
    names,
  };
}

/** Sets bit i (LSB first). */
export const setBit = (map: Uint8Array, i: number): void => {
  map[i >>> 3]! |= 1 << (i & 7);
};
export const hasBit = (map: Uint8Array, i: number): boolean => (map[i >>> 3]! & (1 << (i & 7))) !== 0;

export function orInto(dst: Uint8Array, src: Uint8Array): void {
  for (let i = 0; i < dst.length; i++) dst[i]! |= src[i]!;
}
