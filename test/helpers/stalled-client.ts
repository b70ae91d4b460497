// Clients that misbehave slowly, for the fairness tests: one that queues reads and never reads
// a reply, one that trickles a write's payload, one that idles after the handshake.
import { connect, type Socket } from 'node:net';
import * as C from '../../protocol/constants.js';
import { encodeRequest } from '../../protocol/wire.js';

/** Fixed newstyle, NBD_OPT_EXPORT_NAME; resolves once the export's size and flags arrived. */
export async function rawHandshake(port: number, exportName: string): Promise<Socket> {
  const s = connect({ host: '127.0.0.1', port });
  await new Promise<void>((res, rej) => s.once('connect', res).once('error', rej));
  let got = Buffer.alloc(0);
  const need = async (n: number) => {
    while (got.length < n) {
      const chunk = await new Promise<Buffer>((res, rej) => {
        s.once('data', res);
        s.once('error', rej);
      });
      got = Buffer.concat([got, chunk]);
    }
    const out = got.subarray(0, n);
    got = got.subarray(n);
    return out;
  };
  await need(18); // NBDMAGIC, IHAVEOPT, handshake flags
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES);
  const name = Buffer.from(exportName);
  const opt = Buffer.alloc(16);
  opt.write('IHAVEOPT', 0, 'latin1');
  opt.writeUInt32BE(C.NBD_OPT_EXPORT_NAME, 8);
  opt.writeUInt32BE(name.length, 12);
  s.write(Buffer.concat([flags, opt, name]));
  await need(10); // export size, transmission flags
  s.removeAllListeners('data');
  return s;
}

/** Sends `count` READs of `length` bytes each and never reads a reply. */
export async function stalledReader(port: number, exportName: string, count: number, length: number, size: number): Promise<Socket> {
  const s = await rawHandshake(port, exportName);
  s.pause();
  for (let i = 0; i < count; i++) {
    const offset = BigInt(((i * length) % Math.max(length, size - length)) & ~4095);
    s.write(encodeRequest({ flags: 0, type: C.NBD_CMD_READ, cookieHi: 0, cookieLo: i + 1, offset, length }));
  }
  return s;
}

/** Sends a WRITE header of `length` bytes, then its payload one byte per `everyMs`; stop() ends the trickle. */
export async function tricklingWriter(
  port: number,
  exportName: string,
  length: number,
  everyMs: number,
): Promise<{ socket: Socket; stop(): void }> {
  const s = await rawHandshake(port, exportName);
  s.write(encodeRequest({ flags: 0, type: C.NBD_CMD_WRITE, cookieHi: 0, cookieLo: 1, offset: 0n, length }));
  const timer = setInterval(() => s.write(Buffer.of(0x5a)), everyMs);
  return {
    socket: s,
    stop: () => {
      clearInterval(timer);
      s.destroy();
    },
  };
}
