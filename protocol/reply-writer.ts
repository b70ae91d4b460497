// Replies onto the socket: each one framed (simple or structured, see replies.ts) and
// batched with the others completed in the same event-loop turn.
import type { Writable } from 'node:stream';
import type { BufferPool } from './buffer-pool.js';
import { encodeReply } from './replies.js';
import type { Outcome } from './requests.js';
import type { ThreadpoolSender } from './threadpool-sender.js';
import type { Request } from './wire.js';

/**
 * A cork is released early once this much is queued: batching pays for small replies,
 * while a big read reply gains nothing from waiting (see docs/tuning.md, UNCORK_AT_BYTES).
 */
export const UNCORK_AT_BYTES = 256 * 1024;

/** What the writer needs of a socket. */
export type ReplyOutput = Pick<Writable, 'cork' | 'uncork' | 'write' | 'end' | 'writableLength' | 'destroyed'>;

export class ReplyWriter {
  private corked = false;
  /** Set in transmission on a plain socket: replies then leave through it (threadpool-sender.ts). */
  private sender?: ThreadpoolSender;

  constructor(
    /** Replaced by the TLSSocket after STARTTLS. */
    public out: ReplyOutput,
    private readonly pool: BufferPool,
    /** Unsent bytes past which reply() reports the socket as blocked. */
    private readonly maxWriteBuffer: number,
    /** Told of the bytes a reply held once the kernel has taken it (or the socket is gone). */
    private readonly onSent: (heldBytes: number) => void = () => {},
  ) {}

  /** From now on replies leave through `sender`, which batches and orders them itself. */
  useSender(sender: ThreadpoolSender): void {
    this.sender = sender;
  }

  /** Unsent bytes: queued here or in the socket. */
  get unsent(): number {
    return this.sender ? this.sender.writableLength : this.out.writableLength;
  }

  /** Ends the socket once every reply has left; `cb` runs when the end is flushed. */
  end(cb: () => void): void {
    if (this.sender) this.sender.end(cb);
    else this.out.end(cb);
  }

  /** Handshake bytes, written as they come. */
  send(b: Buffer): void {
    if (!this.out.destroyed) this.out.write(b);
  }

  /**
   * Writes the frames of one reply; READ data goes back to the pool, and onSent is told of
   * `heldBytes`, once the kernel has taken the last frame (or the socket is gone).
   * Returns true when the socket holds more than maxWriteBuffer unsent bytes.
   */
  reply(req: Request, outcome: Outcome, structured: boolean, heldBytes = 0): boolean {
    const data = outcome.data;
    if (this.out.destroyed) {
      if (data) this.pool.put(data);
      if (heldBytes) this.onSent(heldBytes);
      return false;
    }
    const s = this.out;
    const frames = encodeReply(req, outcome, structured);
    const sent =
      data || heldBytes
        ? () => {
            if (data) this.pool.put(data);
            if (heldBytes) this.onSent(heldBytes);
          }
        : undefined;
    if (this.sender) return this.sender.write(frames, sent);
    let blocked = false;
    this.corkUntilCheckPhase();
    for (let i = 0; i < frames.length; i++) {
      const last = i === frames.length - 1;
      const ok = s.write(frames[i]!, last ? sent : undefined);
      if (!ok && s.writableLength > this.maxWriteBuffer) blocked = true;
    }
    if (this.corked && s.writableLength >= UNCORK_AT_BYTES) {
      this.corked = false;
      s.uncork();
    }
    return blocked;
  }

  /** Gives a reply's READ data back to the pool when the reply is not sent. */
  discard(outcome: Outcome): void {
    if (outcome.data) this.pool.put(outcome.data);
  }

  /**
   * Replies completed in one event-loop turn leave in one writev: the socket is
   * corked at the first and uncorked in the check phase, after libuv has run
   * every I/O completion of this turn. One syscall instead of one per reply.
   * Released early past UNCORK_AT_BYTES; the check phase then finds it released.
   */
  private corkUntilCheckPhase(): void {
    if (this.corked) return;
    this.corked = true;
    const s = this.out;
    s.cork();
    setImmediate(() => {
      if (!this.corked) return;
      this.corked = false;
      s.uncork();
    });
  }
}
