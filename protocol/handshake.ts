// Fixed-newstyle option haggling, as a state machine over the connection's ByteQueue.
// It writes replies through `send` and reports the outcome; it never touches a socket.
import * as C from './constants.js';
import type { Backend, ExportInfo, ExportRegistry } from './backend.js';
import type { ByteQueue } from './byte-queue.js';
import type { Logger } from './logger.js';
import type { MetaContext } from './requests.js';
import type { ClientInfo, TlsMode } from './tls.js';
import { decodeOptionHeader, encodeOptionReply, lengthPrefixed, OPTION_HEADER_SIZE } from './wire.js';

export interface Negotiated {
  exportName: string;
  backend: Backend;
  structured: boolean;
  /** base:allocation selected with SET_META_CONTEXT. */
  baseAllocation: boolean;
  /** The backend's own contexts selected with SET_META_CONTEXT, in reply order. */
  contexts: MetaContext[];
  flags: number;
}

export type HandshakeResult =
  | { kind: 'pending' }
  | { kind: 'go'; negotiated: Negotiated }
  /** NBD_REP_ACK to STARTTLS is sent: the caller upgrades the socket, then pumps again. */
  | { kind: 'starttls' }
  | { kind: 'close'; reason: string; level: 'debug' | 'info' | 'warn' };

export interface HandshakeOptions {
  /** Default 'off': STARTTLS gets NBD_REP_ERR_UNSUP. */
  tls?: TlsMode;
  /** Who is asking, for ExportRegistry.authorize. */
  client?: ClientInfo;
}

const PENDING: HandshakeResult = { kind: 'pending' };

/** The transmission flags for an export, identical for NBD_OPT_INFO and NBD_OPT_GO. */
export function transmissionFlags(info: ExportInfo, structured: boolean): number {
  let f = C.NBD_FLAG_HAS_FLAGS;
  if (info.readOnly) f |= C.NBD_FLAG_READ_ONLY;
  if (info.canFlush) f |= C.NBD_FLAG_SEND_FLUSH;
  if (info.canFua) f |= C.NBD_FLAG_SEND_FUA;
  if (info.canTrim && !info.readOnly) f |= C.NBD_FLAG_SEND_TRIM;
  if (info.canZero && !info.readOnly) {
    f |= C.NBD_FLAG_SEND_WRITE_ZEROES;
    if (info.canFastZero) f |= C.NBD_FLAG_SEND_FAST_ZERO;
  }
  if (info.canCache) f |= C.NBD_FLAG_SEND_CACHE;
  if (info.canMultiConn) f |= C.NBD_FLAG_CAN_MULTI_CONN;
  if (structured) f |= C.NBD_FLAG_SEND_DF;
  return f;
}

export function greeting(): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(C.NBDMAGIC, 0);
  b.writeBigUInt64BE(C.IHAVEOPT, 8);
  b.writeUInt16BE(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES, 16);
  return b;
}

enum State {
  ClientFlags,
  OptionHeader,
  OptionData,
  DrainOption,
  Done,
}

/** Reads length-prefixed fields out of one option's payload, failing softly. */
class OptionCursor {
  at = 0;
  constructor(private readonly data: Buffer) {}
  u16(): number | undefined {
    if (this.at + 2 > this.data.length) return undefined;
    const v = this.data.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number | undefined {
    if (this.at + 4 > this.data.length) return undefined;
    const v = this.data.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  string(): string | undefined {
    const n = this.u32();
    if (n === undefined || n > C.MAX_STRING_LENGTH || this.at + n > this.data.length) return undefined;
    const s = this.data.toString('utf8', this.at, this.at + n);
    this.at += n;
    return s;
  }
  get done(): boolean {
    return this.at === this.data.length;
  }
}

export class Handshake {
  private state = State.ClientFlags;
  private noZeroes = false;
  private structured = false;
  private baseAllocation = false;
  /** The backend contexts of the last SET_META_CONTEXT, and the export (real name) it named. */
  private contexts: MetaContext[] = [];
  private contextsExport = '';
  /** Per-connection ids: a context keeps its id across SETs; base:allocation has BASE_ALLOCATION_ID. */
  private readonly contextIds = new Map<string, number>();
  private option = 0;
  private optionLength = 0;
  private drainLeft = 0;
  private readonly tlsMode: TlsMode;
  private readonly client: ClientInfo;
  private tlsRefusalLogged = false;

  constructor(
    private readonly registry: ExportRegistry,
    private readonly send: (b: Buffer) => void,
    private readonly log: Logger,
    opts: HandshakeOptions = {},
  ) {
    this.tlsMode = opts.tls ?? 'off';
    this.client = opts.client ?? { unix: false, tls: false };
  }

  /** FORCEDTLS and TLS not up yet: every option but STARTTLS and ABORT is refused. */
  private get tlsRequired(): boolean {
    return this.tlsMode === 'require' && !this.client.tls;
  }

  /** Consumes whatever complete frames the queue holds. */
  pump(q: ByteQueue): HandshakeResult {
    for (;;) {
      switch (this.state) {
        case State.ClientFlags: {
          if (q.length < 4) return PENDING;
          const flags = q.take(4).readUInt32BE(0);
          if (flags & ~(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)) {
            return { kind: 'close', reason: `unknown client flags 0x${flags.toString(16)}`, level: 'warn' };
          }
          if (!(flags & C.NBD_FLAG_C_FIXED_NEWSTYLE)) {
            // We only speak fixed newstyle; a plain-newstyle client could not parse our error replies.
            return { kind: 'close', reason: 'client does not support fixed newstyle', level: 'warn' };
          }
          this.noZeroes = (flags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
          this.state = State.OptionHeader;
          break;
        }
        case State.OptionHeader: {
          if (q.length < OPTION_HEADER_SIZE) return PENDING;
          const h = decodeOptionHeader(q.take(OPTION_HEADER_SIZE));
          if (h.magic !== C.IHAVEOPT) return { kind: 'close', reason: 'bad option magic', level: 'warn' };
          this.option = h.option;
          this.optionLength = h.length;
          if (h.length > C.MAX_OPTION_LENGTH) {
            if (h.option === C.NBD_OPT_EXPORT_NAME) {
              return { kind: 'close', reason: `export name of ${h.length} bytes`, level: 'warn' };
            }
            this.drainLeft = h.length;
            this.state = State.DrainOption;
          } else {
            this.state = State.OptionData;
          }
          break;
        }
        case State.DrainOption: {
          this.drainLeft -= q.skip(this.drainLeft);
          if (this.drainLeft > 0) return PENDING;
          if (this.tlsRequired) this.refuseWithoutTls();
          else this.reply(C.NBD_REP_ERR_TOO_BIG, Buffer.from('option payload too large'));
          this.state = State.OptionHeader;
          break;
        }
        case State.OptionData: {
          if (q.length < this.optionLength) return PENDING;
          const data = q.take(this.optionLength);
          this.state = State.OptionHeader;
          const r = this.handleOption(this.option, data);
          if (r.kind !== 'pending') {
            // After STARTTLS haggling goes on, over TLS.
            if (r.kind !== 'starttls') this.state = State.Done;
            return r;
          }
          break;
        }
        case State.Done:
          return PENDING;
      }
    }
  }

  private reply(type: number, data?: Buffer): void {
    this.send(encodeOptionReply(this.option, type, data));
  }

  private error(type: number, message: string): HandshakeResult {
    this.log.debug({ option: this.option, reply: type >>> 0, reason: message }, 'option refused');
    this.reply(type, Buffer.from(message, 'utf8'));
    return PENDING;
  }

  private refuseWithoutTls(): HandshakeResult {
    if (!this.tlsRefusalLogged) {
      this.tlsRefusalLogged = true;
      this.log.info({ option: this.option }, 'client option refused: TLS is required (NBD_REP_ERR_TLS_REQD)');
    }
    return this.error(C.NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
  }

  /** Access check for an export, by its real name; a refusal is logged. */
  private allowed(info: ExportInfo, quiet = false): boolean {
    const ok = this.registry.authorize?.(info.name, this.client) ?? true;
    if (!ok && !quiet) {
      this.log.warn(
        { export: info.name, option: this.option, address: this.client.address ?? 'unix', tls: this.client.tls },
        'export access denied',
      );
    }
    return ok;
  }

  private startTls(data: Buffer): HandshakeResult {
    if (this.tlsMode === 'off') return this.error(C.NBD_REP_ERR_UNSUP, 'TLS is not enabled on this server');
    if (this.client.tls) return this.error(C.NBD_REP_ERR_INVALID, 'TLS is already active');
    if (data.length !== 0) return this.error(C.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    this.reply(C.NBD_REP_ACK);
    // Nothing negotiated in plain text carries over into TLS, as in nbdkit: a man in
    // the middle could have injected it.
    this.structured = false;
    this.baseAllocation = false;
    this.contexts = [];
    this.client.tls = true;
    return { kind: 'starttls' };
  }

  private handleOption(option: number, data: Buffer): HandshakeResult {
    this.log.trace({ option, length: data.length }, 'option');
    if (this.tlsRequired && option !== C.NBD_OPT_STARTTLS && option !== C.NBD_OPT_ABORT) {
      // NBD_OPT_EXPORT_NAME cannot be answered with an error: the spec says hang up.
      if (option === C.NBD_OPT_EXPORT_NAME)
        return { kind: 'close', reason: 'NBD_OPT_EXPORT_NAME before STARTTLS; TLS is required', level: 'warn' };
      return this.refuseWithoutTls();
    }
    switch (option) {
      case C.NBD_OPT_STARTTLS:
        return this.startTls(data);
      case C.NBD_OPT_EXPORT_NAME:
        return this.exportName(data.toString('utf8'));
      case C.NBD_OPT_ABORT:
        this.reply(C.NBD_REP_ACK);
        return { kind: 'close', reason: 'client sent NBD_OPT_ABORT', level: 'debug' };
      case C.NBD_OPT_LIST:
        if (data.length !== 0) return this.error(C.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const e of this.registry.list()) {
          if (!this.allowed(e, true)) continue;
          this.reply(C.NBD_REP_SERVER, Buffer.concat([lengthPrefixed(e.name), Buffer.from(e.description, 'utf8')]));
        }
        this.reply(C.NBD_REP_ACK);
        return PENDING;
      case C.NBD_OPT_INFO:
      case C.NBD_OPT_GO:
        return this.infoOrGo(option === C.NBD_OPT_GO, data);
      case C.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.error(C.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        this.reply(C.NBD_REP_ACK);
        return PENDING;
      case C.NBD_OPT_LIST_META_CONTEXT:
      case C.NBD_OPT_SET_META_CONTEXT:
        return this.metaContext(option === C.NBD_OPT_SET_META_CONTEXT, data);
      default:
        return this.error(C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private exportName(name: string): HandshakeResult {
    if (name.includes('\0')) return { kind: 'close', reason: 'export name contains NUL', level: 'warn' };
    const info = this.registry.info(name);
    if (info && !this.allowed(info)) return { kind: 'close', reason: `access to export "${info.name}" denied`, level: 'warn' };
    const backend = this.registry.open(name);
    if (!backend) {
      // NBD_OPT_EXPORT_NAME has no error reply: the spec's only answer is to hang up.
      return { kind: 'close', reason: `unknown export "${name}"`, level: 'info' };
    }
    const refused = this.registry.admit?.(backend.info.name);
    if (refused) return { kind: 'close', reason: refused, level: 'warn' };
    const flags = transmissionFlags(backend.info, this.structured);
    const b = Buffer.alloc(this.noZeroes ? 10 : 134);
    b.writeBigUInt64BE(BigInt(backend.info.size), 0);
    b.writeUInt16BE(flags, 8);
    this.send(b);
    return { kind: 'go', negotiated: this.negotiated(backend, flags) };
  }

  private negotiated(backend: Backend, flags: number): Negotiated {
    return {
      exportName: backend.info.name,
      backend,
      structured: this.structured,
      baseAllocation: this.structured && this.baseAllocation,
      // A backend's contexts belong to the export SET named: another export may not have them.
      contexts: this.structured && this.contextsExport === backend.info.name ? this.contexts : [],
      flags,
    };
  }

  private infoOrGo(go: boolean, data: Buffer): HandshakeResult {
    const c = new OptionCursor(data);
    const name = c.string();
    const n = c.u16();
    if (name === undefined || n === undefined || data.length !== c.at + 2 * n) {
      return this.error(C.NBD_REP_ERR_INVALID, 'malformed NBD_OPT_INFO/GO payload');
    }
    if (name.includes('\0')) return this.error(C.NBD_REP_ERR_INVALID, 'export name contains NUL');
    const wanted = new Set<number>();
    for (let i = 0; i < n; i++) wanted.add(c.u16()!);
    const info = this.registry.info(name);
    if (!info) return this.error(C.NBD_REP_ERR_UNKNOWN, `unknown export "${name}"`);
    if (!this.allowed(info)) return this.error(C.NBD_REP_ERR_POLICY, `access to export "${info.name}" denied`);
    const refused = go ? this.registry.admit?.(info.name) : undefined;
    if (refused) return this.error(C.NBD_REP_ERR_POLICY, refused);
    const flags = transmissionFlags(info, this.structured);
    const exp = Buffer.allocUnsafe(12);
    exp.writeUInt16BE(C.NBD_INFO_EXPORT, 0);
    exp.writeBigUInt64BE(BigInt(info.size), 2);
    exp.writeUInt16BE(flags, 10);
    this.reply(C.NBD_REP_INFO, exp);
    if (wanted.has(C.NBD_INFO_NAME)) {
      this.reply(C.NBD_REP_INFO, Buffer.concat([u16(C.NBD_INFO_NAME), Buffer.from(info.name, 'utf8')]));
    }
    if (wanted.has(C.NBD_INFO_DESCRIPTION)) {
      this.reply(C.NBD_REP_INFO, Buffer.concat([u16(C.NBD_INFO_DESCRIPTION), Buffer.from(info.description, 'utf8')]));
    }
    if (wanted.has(C.NBD_INFO_BLOCK_SIZE)) {
      const b = Buffer.allocUnsafe(14);
      b.writeUInt16BE(C.NBD_INFO_BLOCK_SIZE, 0);
      b.writeUInt32BE(C.BLOCK_SIZE_MIN, 2);
      b.writeUInt32BE(C.BLOCK_SIZE_PREFERRED, 6);
      b.writeUInt32BE(C.BLOCK_SIZE_MAX, 10);
      this.reply(C.NBD_REP_INFO, b);
    }
    if (!go) {
      this.reply(C.NBD_REP_ACK);
      return PENDING;
    }
    const backend = this.registry.open(name);
    if (!backend) return this.error(C.NBD_REP_ERR_UNKNOWN, `export "${name}" went away`);
    this.reply(C.NBD_REP_ACK);
    return { kind: 'go', negotiated: this.negotiated(backend, flags) };
  }

  /**
   * The contexts one query selects on an export. base: is ours; any other query is the
   * backend's. A namespace selects all of it for LIST only: SET grants exact names.
   */
  private select(exportName: string, query: string, listing: boolean): string[] {
    const out: string[] = [];
    if (query === C.BASE_ALLOCATION || (listing && (query === '' || query === 'base:'))) out.push(C.BASE_ALLOCATION);
    if (query.startsWith('base:')) return out;
    for (const n of this.registry.metaContexts?.(exportName, query) ?? []) {
      if (!n.startsWith('base:') && (listing || n === query)) out.push(n);
    }
    return out;
  }

  private contextId(name: string): number {
    let id = this.contextIds.get(name);
    if (id === undefined) {
      id = this.contextIds.size + C.BASE_ALLOCATION_ID + 1;
      this.contextIds.set(name, id);
    }
    return id;
  }

  private metaContext(set: boolean, data: Buffer): HandshakeResult {
    if (set && !this.structured) {
      return this.error(C.NBD_REP_ERR_INVALID, 'NBD_OPT_SET_META_CONTEXT needs structured replies first');
    }
    const c = new OptionCursor(data);
    const name = c.string();
    const count = c.u32();
    if (name === undefined || count === undefined) return this.error(C.NBD_REP_ERR_INVALID, 'malformed meta context payload');
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      const q = c.string();
      if (q === undefined) return this.error(C.NBD_REP_ERR_INVALID, 'malformed meta context query');
      queries.push(q);
    }
    if (!c.done) return this.error(C.NBD_REP_ERR_INVALID, 'trailing bytes in meta context payload');
    if (name.includes('\0')) return this.error(C.NBD_REP_ERR_INVALID, 'export name contains NUL');
    const info = this.registry.info(name);
    if (!info) return this.error(C.NBD_REP_ERR_UNKNOWN, `unknown export "${name}"`);
    if (!this.allowed(info)) return this.error(C.NBD_REP_ERR_POLICY, `access to export "${info.name}" denied`);
    const selected: string[] = [];
    const add = (q: string, listing: boolean) => {
      for (const n of this.select(info.name, q, listing)) if (!selected.includes(n)) selected.push(n);
    };
    if (count === 0) {
      // LIST with no query: every context; SET with none selects none.
      if (!set) add('', true);
    } else {
      for (const q of queries) add(q, !set);
    }
    if (set) {
      // The new set replaces the previous one.
      this.baseAllocation = selected.includes(C.BASE_ALLOCATION);
      this.contexts = selected.filter((n) => n !== C.BASE_ALLOCATION).map((n) => ({ id: this.contextId(n), name: n }));
      this.contextsExport = info.name;
    }
    for (const n of selected) {
      const body = Buffer.from(n, 'utf8');
      const b = Buffer.allocUnsafe(4 + body.length);
      // LIST's ids are reserved: zero.
      b.writeUInt32BE(!set ? 0 : n === C.BASE_ALLOCATION ? C.BASE_ALLOCATION_ID : this.contextId(n), 0);
      body.copy(b, 4);
      this.reply(C.NBD_REP_META_CONTEXT, b);
    }
    this.reply(C.NBD_REP_ACK);
    return PENDING;
  }
}

function u16(v: number): Buffer {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v, 0);
  return b;
}
