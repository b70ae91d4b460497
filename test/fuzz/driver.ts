// Runs fuzz cases against a live NBD server over real sockets and judges them:
// every connection must be answered or closed in time, well-framed sessions must
// get exactly the replies their script calls for, and a canary connection doing
// verified writes and reads must be served correctly throughout.
import { connect, type Socket } from 'node:net';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as C from '../../protocol/constants.js';
import { NbdClient, now } from '../helpers/nbd-client.js';
import { generateCase, Rng, saveCase, type FuzzCase, type RequestStep, type Script } from './fuzzer.js';

export interface Target {
  host: string;
  port: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What the client saw: every byte the server sent, and whether it closed by itself in time. */
interface Exchange {
  connected: boolean;
  received: Buffer;
  /** The server closed the connection (after our half-close, or on its own). */
  closed: boolean;
  elapsedMs: number;
}

async function exchange(target: Target, c: FuzzCase, timeoutMs: number): Promise<Exchange> {
  const started = now();
  const s: Socket = connect({ host: target.host, port: target.port });
  s.setNoDelay(true);
  const parts: Buffer[] = [];
  s.on('data', (d: Buffer) => parts.push(d));
  s.on('error', () => undefined);
  const closed = new Promise<void>((r) => s.once('close', () => r()));
  let connected = false;
  await Promise.race([new Promise<void>((r) => s.once('connect', () => r())).then(() => (connected = true)), closed]);
  if (!connected) return { connected, received: Buffer.alloc(0), closed: true, elapsedMs: now() - started };
  for (let i = 0; i < c.chunks.length; i++) {
    if (s.destroyed) break;
    if (i > 0) await sleep(1);
    s.write(c.chunks[i]!);
  }
  if (c.finish === 'destroy') {
    // Give the server a moment to start on what we sent, then vanish.
    await sleep(c.index % 3);
    s.destroy();
    await closed;
    return { connected, received: Buffer.concat(parts), closed: true, elapsedMs: now() - started };
  }
  if (c.finish === 'end' && !s.destroyed) s.end();
  let timer: NodeJS.Timeout | undefined;
  const didClose = await Promise.race([
    closed.then(() => true),
    new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs))),
  ]);
  clearTimeout(timer);
  s.destroy();
  return { connected, received: Buffer.concat(parts), closed: didClose, elapsedMs: now() - started };
}

class Reader {
  at = 0;
  constructor(readonly b: Buffer) {}
  left(): number {
    return this.b.length - this.at;
  }
  take(n: number, what: string): Buffer {
    if (this.left() < n) throw new OracleError(`stream ends inside ${what} (${this.left()}/${n} bytes)`);
    const out = this.b.subarray(this.at, this.at + n);
    this.at += n;
    return out;
  }
}

class OracleError extends Error {}

function cookieKey(hi: number, lo: number): string {
  return `${hi >>> 0}:${lo >>> 0}`;
}

function judge(expect: string, ok: boolean, what: string): void {
  if (expect === 'ok' && !ok) throw new OracleError(`${what}: expected success, got an error`);
  if (expect === 'error' && ok) throw new OracleError(`${what}: expected an error, got success`);
}

const OPTION_REPLY_TYPES: Record<number, number[]> = {
  [C.NBD_OPT_LIST]: [C.NBD_REP_SERVER],
  [C.NBD_OPT_INFO]: [C.NBD_REP_INFO],
  [C.NBD_OPT_GO]: [C.NBD_REP_INFO],
  [C.NBD_OPT_LIST_META_CONTEXT]: [C.NBD_REP_META_CONTEXT],
  [C.NBD_OPT_SET_META_CONTEXT]: [C.NBD_REP_META_CONTEXT],
};

/** Checks the server's bytes against a well-framed session's script. Throws OracleError. */
export function checkScript(script: Script, received: Buffer): void {
  const r = new Reader(received);
  const g = r.take(18, 'greeting');
  if (g.readBigUInt64BE(0) !== C.NBDMAGIC || g.readBigUInt64BE(8) !== C.IHAVEOPT) throw new OracleError('bad greeting');
  let transmission = false;
  for (const [i, step] of script.options.entries()) {
    const what = `option #${i} (${step.option})`;
    if (step.exportName) {
      const b = r.take(script.noZeroes ? 10 : 134, `${what} EXPORT_NAME reply`);
      if (!(b.readUInt16BE(8) & C.NBD_FLAG_HAS_FLAGS)) throw new OracleError(`${what}: transmission flags without HAS_FLAGS`);
      transmission = true;
      break;
    }
    for (;;) {
      const h = r.take(20, `${what} reply header`);
      if (h.readBigUInt64BE(0) !== C.REPLY_MAGIC_OPT) throw new OracleError(`${what}: bad option reply magic`);
      const opt = h.readUInt32BE(8);
      const type = h.readUInt32BE(12);
      const data = r.take(h.readUInt32BE(16), `${what} reply data`);
      if (opt !== step.option >>> 0) throw new OracleError(`${what}: reply names option ${opt}`);
      if (type === C.NBD_REP_ACK || type >= 0x80000000) {
        judge(step.expect, type === C.NBD_REP_ACK, what);
        if (type >= 0x80000000 && data.length > 4096) throw new OracleError(`${what}: error message of ${data.length} bytes`);
        if (step.final && type === C.NBD_REP_ACK) transmission = true;
        break;
      }
      if (!(OPTION_REPLY_TYPES[step.option] ?? []).includes(type)) throw new OracleError(`${what}: unexpected reply type ${type}`);
      if (type === C.NBD_REP_INFO && data.length < 2) throw new OracleError(`${what}: short NBD_REP_INFO`);
    }
    if (transmission) break;
  }
  if (!transmission) {
    if (r.left()) throw new OracleError(`${r.left()} bytes after a handshake that did not finish`);
    return;
  }
  const pending = new Map<string, { req: RequestStep; covered: number; error: boolean; chunks: number }>();
  for (const req of script.requests) pending.set(cookieKey(req.cookieHi, req.cookieLo), { req, covered: 0, error: false, chunks: 0 });
  const done = new Set<string>();
  while (r.left() > 0) {
    const magic = r.b.readUInt32BE(r.at);
    if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
      const h = r.take(16, 'simple reply');
      const key = cookieKey(h.readUInt32BE(8), h.readUInt32BE(12));
      const p = pending.get(key);
      if (!p) throw new OracleError(`simple reply for ${done.has(key) ? 'an already answered' : 'an unknown'} cookie ${key}`);
      const error = h.readUInt32BE(4);
      const what = `${C.COMMAND_NAMES[p.req.type] ?? p.req.type} ${p.req.offset}+${p.req.length} flags 0x${p.req.flags.toString(16)}`;
      if (script.structured && p.req.type === C.NBD_CMD_READ)
        throw new OracleError(`${what}: simple reply to a read with structured replies`);
      if (error === 0 && p.req.type === C.NBD_CMD_READ) r.take(p.req.length, `${what} data`);
      judge(p.req.expect, error === 0, what);
      pending.delete(key);
      done.add(key);
    } else if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) {
      if (!script.structured) throw new OracleError('structured reply without NBD_OPT_STRUCTURED_REPLY');
      const h = r.take(20, 'structured chunk header');
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const key = cookieKey(h.readUInt32BE(8), h.readUInt32BE(12));
      const payload = r.take(h.readUInt32BE(16), 'structured chunk payload');
      const p = pending.get(key);
      if (!p) throw new OracleError(`structured chunk for ${done.has(key) ? 'an already answered' : 'an unknown'} cookie ${key}`);
      const req = p.req;
      const what = `${C.COMMAND_NAMES[req.type] ?? req.type} ${req.offset}+${req.length} flags 0x${req.flags.toString(16)}`;
      p.chunks++;
      if (type === C.NBD_REPLY_TYPE_ERROR || type === C.NBD_REPLY_TYPE_ERROR_OFFSET) {
        if (payload.length < 6 || payload.readUInt32BE(0) === 0) throw new OracleError(`${what}: malformed error chunk`);
        p.error = true;
      } else if (type === C.NBD_REPLY_TYPE_OFFSET_DATA || type === C.NBD_REPLY_TYPE_OFFSET_HOLE) {
        if (req.type !== C.NBD_CMD_READ) throw new OracleError(`${what}: read chunk for a non-read`);
        const off = payload.readBigUInt64BE(0);
        const len = type === C.NBD_REPLY_TYPE_OFFSET_DATA ? payload.length - 8 : payload.readUInt32BE(8);
        if (off < req.offset || off + BigInt(len) > req.offset + BigInt(req.length))
          throw new OracleError(`${what}: chunk ${off}+${len} outside the request`);
        p.covered += len;
      } else if (type === C.NBD_REPLY_TYPE_BLOCK_STATUS) {
        if (req.type !== C.NBD_CMD_BLOCK_STATUS) throw new OracleError(`${what}: block status chunk for another command`);
        const n = (payload.length - 4) / 8;
        if (!Number.isInteger(n) || n < 1) throw new OracleError(`${what}: malformed block status chunk`);
        if (payload.readUInt32BE(0) !== C.BASE_ALLOCATION_ID) throw new OracleError(`${what}: unknown context id`);
        if (req.flags & C.NBD_CMD_FLAG_REQ_ONE && n !== 1) throw new OracleError(`${what}: ${n} extents with REQ_ONE`);
        let total = 0;
        for (let i = 0; i < n; i++) {
          const len = payload.readUInt32BE(4 + 8 * i);
          if (len === 0) throw new OracleError(`${what}: zero-length extent`);
          total += len;
        }
        if (total > req.length) throw new OracleError(`${what}: extents cover ${total} bytes, more than asked`);
        p.covered += 1;
      } else if (type !== C.NBD_REPLY_TYPE_NONE) {
        throw new OracleError(`${what}: unknown chunk type ${type}`);
      }
      if (flags & C.NBD_REPLY_FLAG_DONE) {
        const ok = !p.error;
        judge(req.expect, ok, what);
        if (ok && req.type === C.NBD_CMD_READ && p.covered !== req.length)
          throw new OracleError(`${what}: chunks cover ${p.covered} of ${req.length} bytes`);
        if (ok && req.type === C.NBD_CMD_BLOCK_STATUS && p.covered !== 1)
          throw new OracleError(`${what}: ${p.covered} block status chunks`);
        pending.delete(key);
        done.add(key);
      }
    } else {
      throw new OracleError(`bad reply magic 0x${magic.toString(16)} at byte ${r.at}`);
    }
  }
  if (pending.size) {
    const first = [...pending.values()][0]!.req;
    throw new OracleError(
      `${pending.size} request(s) never answered, e.g. ${C.COMMAND_NAMES[first.type] ?? first.type} ${first.offset}+${first.length}`,
    );
  }
}

/** Runs one case; resolves to a failure message, or undefined when the server behaved. */
export async function runCase(target: Target, c: FuzzCase, timeoutMs = 5000): Promise<string | undefined> {
  let ex: Exchange;
  try {
    ex = await exchange(target, c, timeoutMs);
  } catch (err) {
    return `client error: ${String(err)}`;
  }
  if (!ex.connected) return 'could not connect';
  if (c.finish === 'destroy') return undefined;
  if (!ex.closed) {
    return c.finish === 'hold'
      ? `server kept a connection open ${timeoutMs} ms after a protocol violation`
      : `server neither finished nor closed within ${timeoutMs} ms of the client's half-close`;
  }
  if (ex.received.length >= 18 && (ex.received.readBigUInt64BE(0) !== C.NBDMAGIC || ex.received.readBigUInt64BE(8) !== C.IHAVEOPT)) {
    return 'the first bytes were not the greeting';
  }
  if (c.script) {
    try {
      checkScript(c.script, ex.received);
    } catch (err) {
      if (err instanceof OracleError) return err.message;
      throw err;
    }
  }
  return undefined;
}

/**
 * The canary: one connection to its own export doing verified writes and reads
 * for the whole run, one at a time; every reply must come within the timeout and
 * every read must match the model.
 */
export class Canary {
  ops = 0;
  readonly failures: string[] = [];
  readonly latencies: number[] = [];
  private stopping = false;
  private loop?: Promise<void>;
  private client?: NbdClient;

  constructor(
    private readonly target: Target,
    private readonly exportName = 'canary',
    private readonly opTimeoutMs = 5000,
    private readonly seed = 1,
  ) {}

  async start(): Promise<void> {
    this.client = await NbdClient.connect({ host: this.target.host, port: this.target.port, exportName: this.exportName });
    const c = this.client;
    const model = Buffer.alloc(c.size);
    // The export may hold data from earlier runs: read it all once to seed the model.
    for (let at = 0; at < c.size; at += 1 << 20) {
      const n = Math.min(1 << 20, c.size - at);
      (await c.read(at, n)).copy(model, at);
    }
    const rng = new Rng(this.seed, 0xca9a);
    this.loop = (async () => {
      while (!this.stopping) {
        const len = rng.range(1, 64) * 512;
        const off = rng.int((c.size - len) / 512 + 1) * 512;
        try {
          if (rng.chance(0.5)) {
            const data = rng.bytes(len);
            await this.timed(`write ${off}+${len}`, c.write(off, data, rng.chance(0.1)));
            data.copy(model, off);
          } else {
            const got = await this.timed(`read ${off}+${len}`, c.read(off, len));
            if (!got.equals(model.subarray(off, off + len))) this.failures.push(`canary read ${off}+${len} returned wrong data`);
          }
          if (rng.chance(0.02)) await this.timed('flush', c.flush());
          this.ops++;
        } catch (err) {
          this.failures.push(`canary: ${String(err)}`);
          return;
        }
      }
    })();
  }

  private async timed<T>(what: string, p: Promise<T>): Promise<T> {
    const t0 = now();
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        p,
        new Promise<never>((_r, rej) => {
          timer = setTimeout(() => rej(new Error(`${what} not answered within ${this.opTimeoutMs} ms`)), this.opTimeoutMs);
        }),
      ]);
    } finally {
      clearTimeout(timer);
      this.latencies.push(now() - t0);
    }
  }

  /** Stops after the operation in progress; the connection stays open unless close is set. */
  async stop(close = true): Promise<void> {
    this.stopping = true;
    await this.loop;
    if (close) await this.client?.disconnect();
  }
}

export interface FuzzFailure {
  index: number;
  kind: string;
  message: string;
  file?: string;
}

export interface FuzzRunOptions {
  seed: number;
  /** Cases [start, start + cases). */
  start?: number;
  cases: number;
  concurrency?: number;
  timeoutMs?: number;
  /** Where failing cases are written; none when undefined. */
  regressionsDir?: string;
  /** Stop early after this many failures. */
  maxFailures?: number;
  /** Called every 1000 cases and once at the end (final). */
  onProgress?: (done: number, failures: number, elapsedMs: number, final: boolean) => void;
  /** Checked between cases: a reason to stop (the server died). */
  abort?: () => string | undefined;
  /** Count of cases per kind, filled in. */
  kinds?: Record<string, number>;
}

export interface FuzzRunResult {
  cases: number;
  failures: FuzzFailure[];
  elapsedMs: number;
  aborted?: string;
}

export function saveRegression(dir: string, c: FuzzCase, message: string): string {
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `seed-${c.seed}-case-${c.index}.json`);
  writeFileSync(file, `${JSON.stringify(saveCase(c, message), null, 2)}\n`);
  return file;
}

export async function fuzzRun(target: Target, o: FuzzRunOptions): Promise<FuzzRunResult> {
  const start = o.start ?? 0;
  const end = start + o.cases;
  const failures: FuzzFailure[] = [];
  const t0 = now();
  let next = start;
  let done = 0;
  let aborted: string | undefined;
  const worker = async () => {
    while (next < end && !aborted && failures.length < (o.maxFailures ?? Infinity)) {
      const index = next++;
      const c = generateCase(o.seed, index);
      if (o.kinds) o.kinds[c.kind] = (o.kinds[c.kind] ?? 0) + 1;
      const message = await runCase(target, c, o.timeoutMs);
      if (message) {
        const f: FuzzFailure = { index, kind: c.kind, message };
        if (o.regressionsDir) f.file = saveRegression(o.regressionsDir, c, message);
        failures.push(f);
      }
      done++;
      if (done % 1000 === 0) o.onProgress?.(done, failures.length, now() - t0, false);
      aborted ??= o.abort?.();
    }
  };
  await Promise.all(Array.from({ length: o.concurrency ?? 16 }, worker));
  o.onProgress?.(done, failures.length, now() - t0, true);
  return { cases: done, failures, elapsedMs: now() - t0, aborted };
}
