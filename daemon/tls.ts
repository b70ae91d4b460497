// `--tls off|on|require`, `--tls-certificates DIR`, `--tls-verify-peer`: reads the
// certificates in the layout nbdkit and qemu use and turns them into the node:tls
// options protocol/ runs STARTTLS with.
//   DIR/ca-cert.pem      CA that signs client certificates (needed for --tls-verify-peer)
//   DIR/server-cert.pem  this server's certificate (chain), PEM
//   DIR/server-key.pem   its private key, PEM; should be mode 0600
import { readFile, stat } from 'node:fs/promises';
import { X509Certificate } from 'node:crypto';
import { createSecureContext, type TlsOptions } from 'node:tls';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { TlsMode, TlsPolicy } from '../protocol/tls.js';
import { Errors } from './errors.js';

export const TLS_MODES: readonly TlsMode[] = ['off', 'on', 'require'];

export interface TlsSettings {
  mode: TlsMode;
  certificates?: string;
  verifyPeer: boolean;
}

/** yargs coerce for --tls: YAML turns a bare on/off into a boolean, so those are accepted too. */
export function parseTlsMode(v: unknown): TlsMode {
  if (v === true || v === 'true') return 'on';
  if (v === false || v === 'false' || v === undefined) return 'off';
  const s = String(v).toLowerCase();
  if ((TLS_MODES as readonly string[]).includes(s)) return s as TlsMode;
  throw Errors.badTls(`--tls must be off, on or require, not "${String(v)}"`);
}

async function readPem(dir: string, file: string, what: string): Promise<Buffer> {
  const path = join(dir, file);
  try {
    return await readFile(path);
  } catch (err) {
    throw Errors.badTls(`cannot read ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

function checkValidity(pem: Buffer, path: string, log: Logger): void {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(pem);
  } catch (err) {
    throw Errors.badTls(`${path} is not a PEM certificate: ${(err as Error).message}`);
  }
  const now = Date.now();
  if (Date.parse(cert.validTo) < now) log.warn({ path, validTo: cert.validTo }, 'TLS certificate has expired; clients will refuse it');
  else if (Date.parse(cert.validFrom) > now) log.warn({ path, validFrom: cert.validFrom }, 'TLS certificate is not valid yet');
}

/** Loads and checks the certificates; the result goes to NbdServer. Throws a CowbdError with the file at fault. */
export async function loadTls(s: TlsSettings, log: Logger): Promise<TlsPolicy> {
  if (s.mode === 'off') {
    if (s.verifyPeer) throw Errors.badTls('--tls-verify-peer needs --tls on or --tls require');
    return { mode: 'off' };
  }
  const dir = s.certificates;
  if (!dir) throw Errors.badTls(`--tls ${s.mode} needs --tls-certificates DIR holding server-cert.pem, server-key.pem and ca-cert.pem`);
  const cert = await readPem(dir, 'server-cert.pem', 'the server certificate');
  const key = await readPem(dir, 'server-key.pem', 'the server key');
  let ca: Buffer | undefined;
  try {
    ca = await readFile(join(dir, 'ca-cert.pem'));
  } catch {
    if (s.verifyPeer) throw Errors.badTls(`--tls-verify-peer needs the CA that signs client certificates in ${join(dir, 'ca-cert.pem')}`);
  }
  checkValidity(cert, join(dir, 'server-cert.pem'), log);
  const keyMode = (await stat(join(dir, 'server-key.pem'))).mode & 0o777;
  if (keyMode & 0o077) {
    log.warn(
      { path: join(dir, 'server-key.pem'), mode: keyMode.toString(8) },
      'the TLS server key is readable by other users; chmod 600 it',
    );
  }
  const options: TlsOptions = {
    cert,
    key,
    ca,
    requestCert: s.verifyPeer,
    rejectUnauthorized: s.verifyPeer,
    minVersion: 'TLSv1.2',
  };
  try {
    // Fails here, at startup, on a key that does not match the certificate or a broken PEM.
    createSecureContext(options);
  } catch (err) {
    throw Errors.badTls(`cannot use the certificates in ${dir}: ${(err as Error).message}`);
  }
  return { mode: s.mode, options };
}
