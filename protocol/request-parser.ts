// Transmission-phase requests parsed out of buffered input, in the manner of ws's
// Receiver: named states over a queue of chunks. The caller drives it, one result per
// parse() call, and says before each header whether it takes another request.
import { MAX_REQUEST_SIZE, NBD_CMD_DISC, NBD_CMD_WRITE } from './constants.js';
import type { BufferPool } from './buffer-pool.js';
import type { ByteQueue } from './byte-queue.js';
import type { Outcome } from './requests.js';
import { decodeRequest, REQUEST_HEADER_SIZE, type Request } from './wire.js';

// States.
/** Waiting for the next 28-byte request header. */
const GET_HEADER = 0;
/** Receiving the payload of an NBD_CMD_WRITE. */
const GET_PAYLOAD = 1;
/** Discarding the payload of a write refused before its payload was read. */
const DRAIN = 2;
/** A header had a bad magic: the stream is out of sync for good. */
const LOST_SYNC = 3;
type State = typeof GET_HEADER | typeof GET_PAYLOAD | typeof DRAIN | typeof LOST_SYNC;

// What parse() found. The request (and payload, refusal) it names are in the parser's
// fields until the next call.
/** Nothing complete is buffered. */
export const NEED_INPUT = 0;
/** At a request boundary and the caller takes no more: parse again once it does. */
export const HELD = 1;
/** `request` is ready to run, with `payload` (pooled or not) when it is a write. */
export const REQUEST = 2;
/** A write header: its payload follows and is held from now on. */
export const WRITE_STARTED = 3;
/** A write over maxPayload (MAX_REQUEST_SIZE): the caller answers with refuse(); its payload is discarded. */
export const OVERSIZED = 4;
/** The oversized write's payload is gone: send `refusal` for `request`. */
export const DRAINED = 5;
/** NBD_CMD_DISC. */
export const DISCONNECT = 6;
/** The header's magic is not NBD_REQUEST_MAGIC. */
export const BAD_MAGIC = 7;
export type ParseResult =
  | typeof NEED_INPUT
  | typeof HELD
  | typeof REQUEST
  | typeof WRITE_STARTED
  | typeof OVERSIZED
  | typeof DRAINED
  | typeof DISCONNECT
  | typeof BAD_MAGIC;

/** Writes at least this large switch direct reads to header-sized reads between payloads (docs/tuning.md, HEADER_READS_FROM). */
const HEADER_READS_FROM = 128 * 1024;

export class RequestParser {
  private state: State = GET_HEADER;
  /** The request parse() last returned, or the write whose payload is arriving. */
  request?: Request;
  /** The write's payload with REQUEST; undefined for other commands. */
  payload?: Buffer;
  /** Whether payload came from the pool (and goes back to it), or is a view of the input. */
  pooled = false;
  /** The answer to an oversized write, given with refuse(). */
  refusal?: Outcome;
  /** The pooled buffer a payload is being gathered into, and how much of it has arrived. */
  private partial?: Buffer;
  private filled = 0;
  /** Payload bytes still to discard in DRAIN. */
  private left = 0;
  /** Set when the socket reads into buffers we hand it (see direct-socket.ts). */
  private stage?: Buffer;
  private headerReads = false;

  constructor(
    private readonly input: ByteQueue,
    private readonly pool: BufferPool,
    /** The largest write payload received; larger ones are discarded (as ws's maxPayload). */
    private readonly maxPayload = MAX_REQUEST_SIZE,
  ) {}

  /** Whether the parser sits between requests (no payload half read or being discarded). */
  get betweenRequests(): boolean {
    return this.state === GET_HEADER;
  }

  /**
   * Parses the next step. `accepting` is the caller's backpressure: when false, no
   * new header is read (HELD), but a payload under way is still received.
   */
  parse(accepting: boolean): ParseResult {
    switch (this.state) {
      case DRAIN:
        return this.drain();
      case GET_PAYLOAD:
        return this.getPayload();
      case LOST_SYNC:
        return BAD_MAGIC;
      default:
        return accepting ? this.getHeader() : HELD;
    }
  }

  /** The refusal of the write OVERSIZED named; DRAINED hands it back after the payload. */
  refuse(refusal: Outcome): void {
    this.refusal = refusal;
  }

  private getHeader(): ParseResult {
    const q = this.input;
    if (q.length < REQUEST_HEADER_SIZE) return NEED_INPUT;
    const req = decodeRequest(q.take(REQUEST_HEADER_SIZE));
    if (!req) {
      this.state = LOST_SYNC;
      this.request = undefined;
      return BAD_MAGIC;
    }
    this.request = req;
    this.payload = undefined;
    this.pooled = false;
    if (req.type === NBD_CMD_DISC) return DISCONNECT;
    if (req.type === NBD_CMD_WRITE) {
      if (req.length > this.maxPayload) {
        // Its payload is skipped so the stream stays in sync.
        this.state = DRAIN;
        this.left = req.length;
        this.refusal = undefined;
        return OVERSIZED;
      }
      this.state = GET_PAYLOAD;
      this.headerReads = req.length >= HEADER_READS_FROM;
      return WRITE_STARTED;
    }
    this.headerReads = false;
    return REQUEST;
  }

  private getPayload(): ParseResult {
    const q = this.input;
    const req = this.request!;
    if (!this.partial) {
      // A payload inside one chunk we own is used in place.
      if (!this.stage && q.contiguous(req.length)) {
        this.state = GET_HEADER;
        this.payload = q.take(req.length);
        this.pooled = false;
        return REQUEST;
      }
      // A pooled buffer: a fresh allocation per write costs page faults.
      this.partial = this.pool.get(req.length);
      this.filled = 0;
    }
    const buf = this.partial;
    const n = Math.min(q.length, req.length - this.filled);
    if (n > 0) {
      q.copyOut(buf, this.filled, n);
      this.filled += n;
    }
    if (this.filled < req.length) return NEED_INPUT;
    this.state = GET_HEADER;
    this.partial = undefined;
    this.payload = buf;
    this.pooled = true;
    return REQUEST;
  }

  private drain(): ParseResult {
    this.left -= this.input.skip(this.left);
    if (this.left > 0) return NEED_INPUT;
    this.state = GET_HEADER;
    return DRAINED;
  }

  /**
   * Reads into chosen buffers from now on. `stage` may be shared by every connection:
   * a read and its callback run in one go on the loop thread, and nothing keeps a view of it.
   */
  useDirectReads(stage: Buffer): void {
    this.stage = stage;
  }

  /** Where the next direct read should land. */
  nextReadBuffer(): Uint8Array {
    const p = this.partial;
    // The rest of a write's payload is read straight into its buffer, and never past it.
    if (p && this.input.length === 0) return p.subarray(this.filled, this.request!.length);
    // While large writes stream in, read just the next header: its payload then lands in
    // its own buffer instead of being copied out of the stage, for one short read per request.
    const q = this.input.length;
    if (this.headerReads && q < REQUEST_HEADER_SIZE) return this.stage!.subarray(0, REQUEST_HEADER_SIZE - q);
    return this.stage!;
  }

  /** Whether a direct read landed in the payload buffer nextReadBuffer handed out. */
  isPayloadBuffer(buf: Uint8Array): boolean {
    return this.partial !== undefined && buf.buffer === this.partial.buffer;
  }

  /** n bytes landed in place in the payload buffer. */
  payloadLanded(n: number): void {
    this.filled += n;
  }

  /**
   * Drops a write whose payload never fully arrived and returns it (the caller still
   * holds its bytes). Its buffer does not go back to the pool: a socket read may still fill it.
   */
  abandon(): Request | undefined {
    const unfinished = this.state === GET_PAYLOAD ? this.request : undefined;
    this.state = GET_HEADER;
    this.request = undefined;
    this.partial = undefined;
    return unfinished;
  }
}
