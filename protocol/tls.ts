// TLS for the handshake (NBD_OPT_STARTTLS) and what an export registry may know
// about a client. protocol/ reads no files: the daemon loads the key, certificate
// and CA and hands them over as node:tls options.
import type { Socket } from 'node:net';
import { createServer, type TLSSocket, type TlsOptions } from 'node:tls';

/**
 * nbdkit's names for the spec's modes: `off` is NOTLS (STARTTLS gets
 * NBD_REP_ERR_UNSUP), `on` lets each client choose (SELECTIVETLS with no
 * TLS-only export), `require` is FORCEDTLS (every option but STARTTLS and ABORT
 * gets NBD_REP_ERR_TLS_REQD until TLS is up).
 */
export type TlsMode = 'off' | 'on' | 'require';

export interface TlsPolicy {
  mode: TlsMode;
  /**
   * For a server-side TLS session: key, cert, ca, requestCert and
   * rejectUnauthorized (both true to demand a client certificate signed by `ca`),
   * minVersion. Required unless mode is `off`.
   */
  options?: TlsOptions;
}

/** The client as access checks see it. */
export interface ClientInfo {
  /** The peer's IP address; undefined for a unix socket client. */
  address?: string;
  unix: boolean;
  /** TLS is up on this connection. */
  tls: boolean;
  /** Subject CN of a verified client certificate. */
  certificateSubject?: string;
}

export function clientInfo(socket: Socket): ClientInfo {
  const address = socket.remoteAddress;
  return { address, unix: address === undefined, tls: false };
}

export interface TlsOutcome {
  secure(socket: TLSSocket): void;
  /** The handshake failed or the client certificate was refused; the socket is already destroyed. */
  failed(err: Error, authorizationError?: string): void;
}

/**
 * Starts a server-side TLS session on a socket that has just sent NBD_REP_ACK to
 * STARTTLS. A tls.Server that never listens is used as the acceptor because it
 * is what runs node's client-certificate verification (rejectUnauthorized);
 * a bare TLSSocket would accept any certificate.
 */
export function upgradeToTls(raw: Socket, options: TlsOptions, outcome: TlsOutcome): void {
  const acceptor = createServer(options);
  acceptor.once('secureConnection', (s: TLSSocket) => outcome.secure(s));
  acceptor.once('tlsClientError', (err: Error, s: TLSSocket) => {
    const why = s.authorizationError as unknown;
    s.destroy();
    raw.destroy();
    outcome.failed(err, why ? String(why) : undefined);
  });
  acceptor.emit('connection', raw);
}
