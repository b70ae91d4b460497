// Reading a persistent store's metadata back (dm's read_metadata): each slot's newer
// copy, then each snapshot's chain of areas up to the first entry whose check fails.
// Whatever a crash left parses; nothing ever needs manual repair.
import type { AreaLog, MetaWrite } from './area-log.js';
import { REF_META, type Allocator } from './allocator.js';
import type { BlockDevice } from './device.js';
import {
  AREA_HEADER_BYTES,
  ENTRY_BYTES,
  MAX_SNAPSHOTS,
  META_BLOCK,
  MERGED_CHUNK,
  SLOT_BYTES,
  ZERO_CHUNK,
  decodeAreaHeader,
  decodeSlot,
  entriesPerArea,
  entryCheck,
  slotOffset,
  type SlotRecord,
} from './format.js';
import { SnapshotRecord } from './snapshot-record.js';

export type LogState = ConstructorParameters<typeof AreaLog>[5];

export interface ReplayedSnapshot {
  rec: SnapshotRecord;
  /** Metadata areas in chain order. */
  areas: number[];
  /** Where appending resumes. */
  tail: LogState;
}

export interface Replayed {
  snapshots: ReplayedSnapshot[];
  /** Sequence of each slot's newer copy. */
  slotSeq: Float64Array;
  /** Stale bytes after each chain's last entry, to be zeroed before anything is appended. */
  fixups: MetaWrite[];
}

/** Replays every snapshot of the store whose header block is head; marks every used chunk in alloc. */
export async function readMetadata(dev: BlockDevice, head: Buffer, poolId: number, chunkSize: number, alloc: Allocator): Promise<Replayed> {
  const out: Replayed = { snapshots: [], slotSeq: new Float64Array(MAX_SNAPSHOTS), fixups: [] };
  for (let slot = 0; slot < MAX_SNAPSHOTS; slot++) {
    const a = decodeSlot(head.subarray(slotOffset(slot, 0), slotOffset(slot, 0) + SLOT_BYTES));
    const b = decodeSlot(head.subarray(slotOffset(slot, 1), slotOffset(slot, 1) + SLOT_BYTES));
    const s = a && b ? (a.seq > b.seq ? a : b) : (a ?? b);
    if (!s) continue;
    out.slotSeq[slot] = s.seq;
    if (!s.inUse) continue;
    out.snapshots.push(await replaySnapshot(dev, poolId, chunkSize, alloc, slot, s, out.fixups));
  }
  // Reference counts come from the final maps only: a superseded entry may name a chunk
  // that was freed and reused since (even as another snapshot's metadata).
  for (const { rec } of out.snapshots) {
    rec.map.forEach((_c, p) => {
      if (p === ZERO_CHUNK) return;
      rec.dataChunks++;
      // Past the end of refs so far reads undefined: count from 0, not NaN (stored as 0, free).
      alloc.markUsed(p, (alloc.refs[p] ?? 0) + 1);
    });
  }
  // Only now is every used chunk known, so only now may anything be allocated.
  alloc.recount();
  for (const { tail } of out.snapshots) if (tail.next < 0) tail.next = alloc.allocOne(REF_META);
  return out;
}

/** Chain length from the area headers alone, so the map is sized once (RSS at a million exceptions). */
async function countAreas(dev: BlockDevice, poolId: number, chunkSize: number, s: SlotRecord): Promise<number> {
  const hb = Buffer.alloc(AREA_HEADER_BYTES);
  let a = s.firstArea;
  let areas = 0;
  for (;;) {
    await dev.read(hb, a * chunkSize);
    const h = decodeAreaHeader(hb);
    if (!h || h.snapId !== s.snapId || h.seq !== areas || h.poolId !== poolId || areas > 1 << 24) return areas;
    areas++;
    a = h.next;
  }
}

async function replaySnapshot(
  dev: BlockDevice,
  poolId: number,
  cs: number,
  alloc: Allocator,
  slot: number,
  s: SlotRecord,
  fixups: MetaWrite[],
): Promise<ReplayedSnapshot> {
  const perArea = entriesPerArea(cs);
  const rec = new SnapshotRecord(slot, s.snapId, s.name, s.state, s.policy, s.readOnly, s.capacityChunks, s.createdAt, perArea);
  rec.invalidReason = s.invalidReason;
  rec.usedAtInvalidation = s.usedAtInvalidation ?? 0;
  const areas: number[] = [];
  const areaCount = await countAreas(dev, poolId, cs, s);
  if (areaCount > 1) rec.map.reserve((areaCount - 1) * perArea);
  const buf = Buffer.alloc(cs);
  let area = s.firstArea;
  let seq = 0;
  let prev: { area: number; nonce: number } | undefined;
  for (;;) {
    await dev.read(buf, area * cs);
    const h = decodeAreaHeader(buf);
    if (!h || h.snapId !== s.snapId || h.seq !== seq || h.poolId !== poolId) {
      // The chain ends before this area: it is the reserved next one (or, for a new
      // snapshot, the first area was never written).
      alloc.markUsed(area, REF_META);
      if (prev) {
        areas.push(prev.area);
        return { rec, areas, tail: { area: prev.area, seq: seq - 1, nonce: prev.nonce, count: perArea, next: area } };
      }
      areas.push(area);
      return { rec, areas, tail: { area, seq: 0, nonce: 0, count: 0, next: -1 } };
    }
    if (prev) areas.push(prev.area);
    alloc.markUsed(area, REF_META);
    let n = 0;
    for (; n < perArea; n++) {
      const at = AREA_HEADER_BYTES + n * ENTRY_BYTES;
      const chunk = buf.readUInt32LE(at);
      const phys = buf.readUInt32LE(at + 4);
      if (buf.readUInt32LE(at + 12) !== entryCheck(chunk, phys, h.nonce, n)) break;
      if (phys === MERGED_CHUNK) rec.map.delete(chunk);
      else rec.map.set(chunk, phys);
    }
    rec.entries += n;
    if (n === perArea) {
      prev = { area, nonce: h.nonce };
      area = h.next;
      seq++;
      continue;
    }
    // Current area. Whatever follows the last entry is stale: zero it on disk now, so a
    // later append can never make old entries after a gap look valid.
    const endByte = AREA_HEADER_BYTES + n * ENTRY_BYTES;
    const blockIndex = Math.floor(endByte / META_BLOCK);
    const tailBlock = Buffer.from(buf.subarray(blockIndex * META_BLOCK, (blockIndex + 1) * META_BLOCK));
    tailBlock.fill(0, endByte - blockIndex * META_BLOCK);
    if (buf.subarray(endByte).some((x) => x !== 0)) {
      fixups.push({ offset: area * cs + blockIndex * META_BLOCK, buf: Buffer.from(tailBlock) });
      const restStart = (blockIndex + 1) * META_BLOCK;
      if (restStart < cs) fixups.push({ offset: area * cs + restStart, buf: Buffer.alloc(cs - restStart) });
    }
    areas.push(area);
    alloc.markUsed(h.next, REF_META);
    return { rec, areas, tail: { area, seq, nonce: h.nonce, count: n, next: h.next, tail: tailBlock } };
  }
}
