// One client connection: handshake, then the transmission phase with many
// requests in flight, out-of-order replies and explicit backpressure.
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { performance } from 'node:perf_hooks';
import * as C from './constants.js';
import type { ExportRegistry } from './backend.js';
import { ByteQueue } from './byte-queue.js';
import { sharedPool, type BufferPool } from './buffer-pool.js';
import { NBD_ERROR_NAMES } from './errors.js';
import { greeting, Handshake, type Negotiated } from './handshake.js';
import type { Logger } from './logger.js';
import { ReplyWriter } from './reply-writer.js';
import { ThreadpoolSender } from './threadpool-sender.js';
import * as P from './request-parser.js';
import { serve, validate, type Outcome, type RequestContext } from './requests.js';
import type { Request } from './wire.js';
import type { ConnectionLimits, RequestObserver } from './connection-options.js';
import { clientInfo, upgradeToTls, type ClientInfo, type TlsPolicy } from './tls.js';

type Phase = 'handshake' | 'transmission' | 'closing' | 'closed';

/**
 * A connection holding less than this is never held back by the shared budget: connections
 * whose replies are stuck (a client that stopped reading) can spend the budget, but cannot
 * take away everyone else's next requests. See SECURITY.md, "Resource limits".
 */
export const GUARANTEED_BYTES = 512 * 1024;

let nextId = 1;

export class Connection extends EventEmitter {
  readonly id = nextId++;
  readonly log: Logger;
  private phase: Phase = 'handshake';
  private readonly queue = new ByteQueue();
  private readonly parser: P.RequestParser;
  private readonly replies: ReplyWriter;
  private readonly handshake: Handshake;
  private negotiated?: Negotiated;
  private ctx?: RequestContext;
  private inFlight = 0;
  /** Write payloads, read buffers and read replies not yet taken by the kernel. */
  private bytesInFlight = 0;
  /** A READ waiting for the bytes its reply will hold (mayHold). */
  private parked?: { req: Request };
  /** The length of a WRITE whose header is read and whose payload waits for room (mayHold). */
  private parkedWrite?: number;
  /** Bytes of read replies not yet taken by the kernel; given back at close if the socket never takes them. */
  private unsentBytes = 0;
  /** When a read reply last left, or unsent ones began to wait (performance.now()). */
  private lastReplyProgress = 0;
  private replyTimer?: NodeJS.Timeout;
  private readPaused = false;
  private writeBlocked = false;
  private handshakeTimer?: NodeJS.Timeout;
  private unsubscribeGone?: () => void;
  private closed: Promise<void>;
  private released = false;
  /** The client sent FIN: close once the requests it sent are parsed. */
  private inputEnded = false;
  /** Replaced by the TLSSocket after STARTTLS. */
  private socket: Socket;
  readonly client: ClientInfo;

  constructor(
    socket: Socket,
    registry: ExportRegistry,
    private readonly limits: ConnectionLimits,
    log: Logger,
    private readonly observer: RequestObserver = {},
    private readonly pool: BufferPool = sharedPool,
    private readonly tls: TlsPolicy = { mode: 'off' },
  ) {
    super();
    this.socket = socket;
    this.client = clientInfo(socket);
    this.log = log.child({ conn: this.id, remote: socket.remoteAddress ?? 'unix' });
    this.parser = new P.RequestParser(this.queue, pool);
    this.replies = new ReplyWriter(socket, pool, limits.maxWriteBuffer, this.onReplySent);
    this.handshake = new Handshake(registry, (b) => this.replies.send(b), this.log, { tls: tls.mode, client: this.client });
    // The raw socket closes last even when TLS runs on top of it.
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }

  get exportName(): string | undefined {
    return this.negotiated?.exportName;
  }

  private readonly onSocketData = (chunk: Buffer) => this.onData(chunk);
  private readonly onSocketDrain = () => {
    // With a threadpool sender the socket may drain while replies still wait in its queue.
    if (this.replies.unsent > this.limits.maxWriteBuffer) return;
    this.writeBlocked = false;
    this.updateFlow();
  };
  private readonly onSocketEnd = () => {
    // The client half-closed: requests it sent before its FIN still run and get
    // their replies (the server allows half-open sockets), then we close.
    if (this.phase === 'handshake') this.socket.destroy();
    else {
      this.inputEnded = true;
      this.pump();
    }
  };

  private attach(s: Socket): void {
    s.on('data', this.onSocketData);
    s.on('drain', this.onSocketDrain);
    s.on('error', (err) => this.log.debug({ err }, 'socket error'));
    s.on('end', this.onSocketEnd);
    s.once('close', () => this.onClose());
  }

  start(): void {
    const s = this.socket;
    s.setNoDelay?.(true);
    this.attach(s);
    this.handshakeTimer = setTimeout(() => {
      this.log.warn({ timeoutMs: this.limits.handshakeTimeoutMs }, 'handshake timed out; closing');
      this.socket.destroy();
      s.destroy();
    }, this.limits.handshakeTimeoutMs);
    this.handshakeTimer.unref?.();
    this.observer.connectionOpened?.(this);
    this.log.debug('connection opened');
    this.replies.send(greeting());
  }

  /** Graceful close: stop reading, let requests in flight finish, then end the socket. Idempotent. */
  close(): Promise<void> {
    if (this.phase === 'closed') return this.closed;
    if (this.phase === 'handshake') {
      this.socket.destroy();
      return this.closed;
    }
    if (this.phase !== 'closing') {
      this.phase = 'closing';
      this.pauseReading();
      this.maybeFinishClosing();
    }
    return this.closed;
  }

  /** Immediate close, dropping requests in flight. */
  destroy(): void {
    this.socket.destroy();
  }

  /** Reads into buffers the parser picks from now on; the socket was built with adoptSocket. */
  useDirectReads(stage: Buffer): void {
    this.parser.useDirectReads(stage);
  }

  /** ReadTarget (direct-socket.ts). */
  nextReadBuffer(): Uint8Array {
    return this.parser.nextReadBuffer();
  }

  /** ReadTarget (direct-socket.ts): buf is not kept past return. */
  onRead(n: number, buf: Uint8Array): void {
    if (this.parser.isPayloadBuffer(buf)) {
      if (this.phase !== 'transmission') return;
      this.parser.payloadLanded(n);
      this.pump();
      return;
    }
    this.onData(Buffer.from(buf.buffer, buf.byteOffset, n));
    // Whatever memory this read used (the stage, or the listener's before we existed) is read into again.
    this.queue.detach(buf.buffer);
  }

  private onData(chunk: Buffer): void {
    if (this.phase === 'closing' || this.phase === 'closed') return;
    this.queue.push(chunk);
    this.pump();
  }

  private pump(): void {
    if (this.phase === 'handshake') {
      const r = this.handshake.pump(this.queue);
      if (r.kind === 'pending') return;
      if (r.kind === 'starttls') {
        this.startTls();
        return;
      }
      if (r.kind === 'close') {
        this.log[r.level]({ reason: r.reason }, 'closing during handshake');
        this.socket.end();
        this.phase = 'closing';
        return;
      }
      this.enterTransmission(r.negotiated);
    }
    if (this.phase === 'transmission') this.pumpTransmission();
  }

  /** After NBD_REP_ACK to STARTTLS: the rest of the handshake and transmission run over TLS. */
  private startTls(): void {
    const raw = this.socket;
    if (this.queue.length > 0) {
      // Bytes sent after STARTTLS but before the TLS handshake are plain text
      // a man in the middle may have injected; the spec forbids sending them.
      this.log.warn({ bytes: this.queue.length }, 'client sent data after NBD_OPT_STARTTLS before the TLS handshake; closing');
      this.queue.clear();
      this.phase = 'closing';
      raw.destroy();
      return;
    }
    raw.off('data', this.onSocketData);
    raw.off('drain', this.onSocketDrain);
    raw.off('end', this.onSocketEnd);
    upgradeToTls(raw, this.tls.options ?? {}, {
      secure: (s) => {
        if (this.phase !== 'handshake') {
          s.destroy();
          return;
        }
        const subject = s.authorized ? s.getPeerCertificate()?.subject?.CN : undefined;
        if (subject) this.client.certificateSubject = Array.isArray(subject) ? subject.join(',') : subject;
        this.socket = s;
        this.replies.out = s;
        this.attach(s);
        this.log.info(
          { protocol: s.getProtocol(), cipher: s.getCipher()?.name, clientCertificate: this.client.certificateSubject ?? null },
          'TLS established',
        );
      },
      failed: (err, authorizationError) => {
        this.log.warn({ err: err.message, code: (err as NodeJS.ErrnoException).code, authorizationError }, 'TLS handshake failed; closing');
      },
    });
  }

  private enterTransmission(n: Negotiated): void {
    clearTimeout(this.handshakeTimer);
    this.negotiated = n;
    this.ctx = {
      backend: n.backend,
      structured: n.structured,
      baseAllocation: n.baseAllocation,
      contexts: n.contexts,
      pool: this.pool,
      log: this.log,
    };
    this.phase = 'transmission';
    if (!(this.socket as TLSSocket).encrypted) {
      const sender = ThreadpoolSender.attach(this.socket, this.limits.threadpoolSendBytes, this.limits.maxWriteBuffer, this.onSocketDrain);
      if (sender) this.replies.useSender(sender);
    }
    this.unsubscribeGone = n.backend.onGone?.(() => {
      this.log.info('export removed; closing connection');
      return this.close();
    });
    this.log.info({ export: n.exportName, structured: n.structured, flags: n.flags }, 'transmission started');
  }

  /** Every complete request is parsed; after the client's FIN nothing more can come. */
  private needMoreInput(): void {
    if (this.inputEnded) void this.close();
  }

  private overloaded(): boolean {
    return (
      this.parked !== undefined ||
      this.parkedWrite !== undefined ||
      this.inFlight >= this.limits.maxInFlight ||
      this.bytesInFlight >= this.limits.maxBytesInFlight ||
      (this.limits.budget?.exhausted === true && this.bytesInFlight >= GUARANTEED_BYTES)
    );
  }

  /** Whether a request may take `n` more bytes now: within the guarantee, or the shared budget has room. */
  private mayHold(n: number): boolean {
    if (this.bytesInFlight + n <= GUARANTEED_BYTES) return true;
    const b = this.limits.budget;
    return !b || b.inUse === 0 || b.inUse + n <= b.limit;
  }

  private holdBytes(n: number): void {
    this.bytesInFlight += n;
    this.limits.budget?.take(n);
  }

  private releaseBytes(n: number): void {
    this.bytesInFlight -= n;
    this.limits.budget?.give(n);
  }

  private readonly onBudgetRoom = () => this.updateFlow();

  /** The kernel took a read reply holding `n` bytes (ReplyWriter's onSent). */
  private readonly onReplySent = (n: number) => {
    if (this.phase === 'closed') return; // onClose gave every unsent byte back
    this.unsentBytes -= n;
    this.lastReplyProgress = performance.now();
    this.releaseBytes(n);
    if (this.phase === 'transmission') this.updateFlow();
  };

  /** Stops reading until the limits allow more; a spent shared budget wakes us when it has room. */
  private holdReading(): void {
    this.pauseReading();
    if (this.limits.budget?.exhausted || this.parked || this.parkedWrite !== undefined) this.limits.budget?.wait(this.onBudgetRoom);
  }

  private pumpTransmission(): void {
    const p = this.parser;
    // A parked write's payload is not read until it has room: the parser would take it regardless.
    while (this.phase === 'transmission' && this.parkedWrite === undefined) {
      switch (p.parse(!this.overloaded() && !this.writeBlocked)) {
        case P.NEED_INPUT:
          this.needMoreInput();
          return;
        case P.HELD:
          this.holdReading();
          return;
        case P.WRITE_STARTED:
          if (!this.mayHold(p.request!.length)) {
            this.parkedWrite = p.request!.length;
            this.holdReading();
            return;
          }
          this.holdBytes(p.request!.length);
          break;
        case P.REQUEST:
          this.dispatch(p.request!, p.payload, p.pooled);
          break;
        case P.OVERSIZED:
          this.log.warn({ length: p.request!.length }, 'oversized write; draining its payload');
          p.refuse(validate(p.request!, this.ctx!)!);
          break;
        case P.DRAINED:
          this.inFlight++;
          this.finish(p.request!, p.refusal!, performance.now(), 0);
          break;
        case P.DISCONNECT:
          this.log.debug('client sent NBD_CMD_DISC');
          void this.close();
          return;
        case P.BAD_MAGIC:
          this.log.warn('bad request magic; closing connection');
          this.phase = 'closed';
          this.queue.clear();
          this.socket.destroy();
          return;
      }
    }
  }

  private dispatch(req: Request, payload: Buffer | undefined, pooled: boolean): void {
    if (req.type === C.NBD_CMD_READ && !this.mayHold(req.length) && !validate(req, this.ctx!)) {
      // Its reply would hold more than the budget has: wait, reading nothing more meanwhile.
      this.parked = { req };
      this.holdReading();
      return;
    }
    const started = performance.now();
    this.inFlight++;
    // A write's payload is held since its header; a read's buffer from now on.
    const reading = req.type === C.NBD_CMD_READ ? req.length : 0;
    this.holdBytes(reading);
    const held = reading + (payload?.length ?? 0);
    this.observer.requestStarted?.(this.negotiated!.exportName, C.COMMAND_NAMES[req.type] ?? 'unknown');
    serve(req, payload, pooled, this.ctx!, (outcome) => this.finish(req, outcome, started, held));
  }

  private finish(req: Request, outcome: Outcome, started: number, heldBytes: number): void {
    this.inFlight--;
    // A read's bytes stay held until the kernel takes its reply: a client that does not read
    // its replies holds its share of the budget, not more than that in unsent replies.
    const unsent = outcome.data && this.phase !== 'closed' ? heldBytes : 0;
    if (unsent > 0 && this.unsentBytes === 0) this.watchReplies();
    this.unsentBytes += unsent;
    this.releaseBytes(heldBytes - unsent);
    const command = C.COMMAND_NAMES[req.type] ?? 'unknown';
    const result = outcome.error === 0 ? 'ok' : (NBD_ERROR_NAMES[outcome.error] ?? `E${outcome.error}`);
    const moved = outcome.error === 0 && (req.type === C.NBD_CMD_READ || req.type === C.NBD_CMD_WRITE) ? req.length : 0;
    this.observer.requestDone?.(this.negotiated?.exportName ?? '', command, result, moved, (performance.now() - started) / 1000);
    if (this.phase === 'closed') this.replies.discard(outcome);
    else if (this.replies.reply(req, outcome, this.ctx!.structured, unsent)) this.writeBlocked = true;
    if (this.phase === 'closing') this.maybeFinishClosing();
    else this.updateFlow();
  }

  /** Read replies begin to wait unsent: with --reply-timeout, close if none leaves in time. */
  private watchReplies(): void {
    this.lastReplyProgress = performance.now();
    const timeout = this.limits.replyTimeoutMs;
    if (timeout <= 0 || this.replyTimer) return;
    // One timer per waiting spell, re-armed for what is left, so a reply leaving costs no timer call.
    const check = () => {
      this.replyTimer = undefined;
      if (this.phase === 'closed' || this.unsentBytes === 0) return;
      const idle = performance.now() - this.lastReplyProgress;
      if (idle < timeout) {
        this.replyTimer = setTimeout(check, timeout - idle).unref();
        return;
      }
      this.log.warn({ unsentBytes: this.unsentBytes, timeoutMs: timeout }, 'client has not read its replies; closing');
      this.socket.destroy();
    };
    this.replyTimer = setTimeout(check, timeout).unref();
  }

  private pauseReading(): void {
    if (!this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    }
  }

  private updateFlow(): void {
    if (this.phase !== 'transmission') return;
    if (this.parkedWrite !== undefined) {
      if (!this.mayHold(this.parkedWrite)) {
        this.holdReading();
        return;
      }
      this.holdBytes(this.parkedWrite);
      this.parkedWrite = undefined;
    }
    const parked = this.parked;
    if (parked) {
      if (!this.mayHold(parked.req.length)) {
        this.holdReading();
        return;
      }
      this.parked = undefined;
      this.dispatch(parked.req, undefined, false);
    }
    // Never pause inside a write's payload: its bytes are already counted, and
    // connections holding budget they cannot release would wait on each other.
    if ((this.overloaded() || this.writeBlocked) && this.parser.betweenRequests) {
      this.holdReading();
      return;
    }
    if (this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
    this.pumpTransmission();
  }

  private maybeFinishClosing(): void {
    // Once our last reply is handed to the kernel we are done; waiting for the
    // client's FIN would let an idle client hold up shutdown.
    if (this.phase === 'closing' && this.inFlight === 0) this.replies.end(() => this.socket.destroy());
  }

  private onClose(): void {
    if (this.released) return;
    this.released = true;
    this.phase = 'closed';
    clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    clearTimeout(this.replyTimer);
    this.replyTimer = undefined;
    this.queue.clear();
    // A write whose payload never fully arrived still holds its bytes.
    const unfinished = this.parser.abandon();
    if (unfinished && this.parkedWrite === undefined) this.releaseBytes(unfinished.length);
    this.parkedWrite = undefined;
    this.releaseBytes(this.unsentBytes);
    this.unsentBytes = 0;
    this.parked = undefined;
    this.limits.budget?.cancel(this.onBudgetRoom);
    this.unsubscribeGone?.();
    this.negotiated?.backend.release?.();
    this.observer.connectionClosed?.(this);
    this.log.debug('connection closed');
    this.emit('close');
  }
}
