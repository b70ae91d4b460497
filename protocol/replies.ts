// Turns an Outcome into the frames that go on the wire, simple or structured.
import { NBD_CMD_READ, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, BASE_ALLOCATION_ID } from './constants.js';
import type { Outcome } from './requests.js';
import {
  encodeBlockStatus,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeSimpleReply,
  encodeStructuredError,
  encodeStructuredNone,
  type Request,
} from './wire.js';

/** Zero runs shorter than this stay inside OFFSET_DATA: a hole chunk is not worth its header. */
const MIN_HOLE = 64 * 1024;
const HOLE_GRAIN = 4096;
const ZEROS = Buffer.alloc(HOLE_GRAIN);

/** Frames for one reply; data buffers are views that must stay untouched until written. */
export function encodeReply(req: Request, out: Outcome, structured: boolean): Buffer[] {
  if (!structured) {
    const head = encodeSimpleReply(out.error, req);
    return out.error === 0 && out.data ? [head, out.data] : [head];
  }
  if (out.error !== 0) return [encodeStructuredError(req, out.error, out.message ?? '', out.errorOffset)];
  if (req.type === NBD_CMD_READ && out.data) {
    return encodeReadChunks(req, Number(req.offset), out.data, (req.flags & NBD_CMD_FLAG_DF) !== 0);
  }
  if (req.type === NBD_CMD_BLOCK_STATUS) {
    if (out.extents) return [encodeBlockStatus(req, BASE_ALLOCATION_ID, out.extents)];
    const s = out.statuses;
    if (s) return s.map((c, i) => encodeBlockStatus(req, c.id, c.extents, i === s.length - 1));
  }
  return [encodeStructuredNone(req)];
}

function isZero(b: Buffer, from: number, to: number): boolean {
  // Data is rarely zero: a few loads in JS reject most grains without the cost of a
  // native call per grain (docs/tuning.md, isZero).
  if ((b[from]! | b[from + 7]! | b[from + 2048]! | b[to - 1]!) !== 0) return false;
  return ZEROS.compare(b, from, to, 0, to - from) === 0;
}

/** OFFSET_DATA and OFFSET_HOLE chunks covering the read, holes only for long aligned zero runs. */
function encodeReadChunks(req: Request, offset: number, data: Buffer, df: boolean): Buffer[] {
  const frames: Buffer[] = [];
  if (!df && data.length >= MIN_HOLE) {
    let dataStart = 0;
    let pos = 0;
    while (pos < data.length) {
      // Find the next zero run of whole grains.
      const runStart = pos;
      let runEnd = pos;
      while (runEnd + HOLE_GRAIN <= data.length && isZero(data, runEnd, runEnd + HOLE_GRAIN)) runEnd += HOLE_GRAIN;
      if (runEnd - runStart >= MIN_HOLE) {
        if (runStart > dataStart) {
          frames.push(encodeOffsetDataHeader(req, false, offset + dataStart, runStart - dataStart), data.subarray(dataStart, runStart));
        }
        frames.push(encodeOffsetHole(req, false, offset + runStart, runEnd - runStart));
        dataStart = runEnd;
        pos = runEnd;
      } else {
        pos = runEnd + HOLE_GRAIN;
      }
    }
    if (dataStart < data.length) {
      frames.push(encodeOffsetDataHeader(req, true, offset + dataStart, data.length - dataStart), data.subarray(dataStart));
    } else {
      frames.push(encodeStructuredNone(req));
    }
    return frames;
  }
  return [encodeOffsetDataHeader(req, true, offset, data.length), data];
}
