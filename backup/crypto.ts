// The cryptography of an encrypted repository: a master key, objects sealed with AES-256-GCM, and
// keyed chunk ids, so the store sees neither the data nor ids it could match against known data.
// The format is in docs/backup-repository.md, "Encryption"; key files are in key-file.ts.
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  createSecretKey,
  type KeyObject,
  randomBytes,
  randomFillSync,
} from 'node:crypto';
import { BackupErrors } from './errors.js';

export const CIPHER = 'aes-256-gcm';
export const KEY_BYTES = 32;
/** A master key's bytes: the cipher key, then the chunk-id key. */
export const MASTER_KEY_BYTES = 2 * KEY_BYTES;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
/** A sealed object is this much longer than its plaintext: nonce and tag. */
export const SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES;
/** Seal and unseal feed the cipher this much at a time; see docs/tuning.md, SEAL_PIECE_BYTES. */
export const SEAL_PIECE_BYTES = 64 * 1024;

/**
 * A repository's master key. KeyObjects rather than Buffers: the bytes stay out of the JS heap, so
 * a key logged or inspected by mistake prints no key material, and ciphers skip re-importing them.
 */
export interface RepoKey {
  readonly encKey: KeyObject;
  readonly idKey: KeyObject;
}

export function newMasterKey(): RepoKey {
  return repoKeyFrom(randomBytes(MASTER_KEY_BYTES));
}

/** The key from its 64 bytes (as a key file holds them). */
export function repoKeyFrom(master: Buffer): RepoKey {
  if (master.length !== MASTER_KEY_BYTES) throw new RangeError(`a master key is ${MASTER_KEY_BYTES} bytes, not ${master.length}`);
  return { encKey: createSecretKey(master.subarray(0, KEY_BYTES)), idKey: createSecretKey(master.subarray(KEY_BYTES)) };
}

/** The 64 bytes a key file seals. The caller should zero them once used. */
export function masterKeyBytes(key: RepoKey): Buffer {
  return Buffer.concat([key.encKey.export(), key.idKey.export()]);
}

/**
 * The additional data binding a sealed object to its kind and name, so one object cannot be put in
 * another's place: a swapped object fails authentication instead of being read as the other.
 */
export function objectAad(kind: string, name: string): Buffer {
  return Buffer.from(`${kind}:${name}`, 'utf8');
}

/** nonce (12, random) | ciphertext | tag (16). */
export function seal(key: RepoKey, plaintext: Uint8Array, aad?: Uint8Array): Buffer {
  return sealWith(key.encKey, plaintext, aad);
}

/** The plaintext of a sealed object, or COWBD_BACKUP_DECRYPT_FAILED naming `what`. */
export function unseal(key: RepoKey, sealed: Uint8Array, what: string, aad?: Uint8Array): Buffer {
  return unsealWith(key.encKey, sealed, what, aad);
}

export function sealWith(encKey: KeyObject, plaintext: Uint8Array, aad?: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(plaintext.length + SEAL_OVERHEAD);
  const nonce = out.subarray(0, NONCE_BYTES);
  randomFillSync(nonce);
  const cipher = createCipheriv(CIPHER, encKey, nonce, { authTagLength: TAG_BYTES });
  if (aad) cipher.setAAD(aad);
  let at = NONCE_BYTES;
  for (let from = 0; from < plaintext.length; from += SEAL_PIECE_BYTES) {
    at += cipher.update(plaintext.subarray(from, from + SEAL_PIECE_BYTES)).copy(out, at);
  }
  at += cipher.final().copy(out, at);
  cipher.getAuthTag().copy(out, at);
  return out;
}

export function unsealWith(encKey: KeyObject, sealed: Uint8Array, what: string, aad?: Uint8Array): Buffer {
  if (sealed.length < SEAL_OVERHEAD) throw BackupErrors.decryptFailed(what, `${sealed.length} bytes, shorter than nonce and tag`);
  const body = sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES);
  // authTagLength is set so that a truncated tag is refused rather than checked on fewer bits.
  const decipher = createDecipheriv(CIPHER, encKey, sealed.subarray(0, NONCE_BYTES), { authTagLength: TAG_BYTES });
  decipher.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  if (aad) decipher.setAAD(aad);
  const out = Buffer.allocUnsafe(body.length);
  let at = 0;
  for (let from = 0; from < body.length; from += SEAL_PIECE_BYTES) {
    at += decipher.update(body.subarray(from, from + SEAL_PIECE_BYTES)).copy(out, at);
  }
  try {
    decipher.final();
  } catch {
    out.fill(0);
    throw BackupErrors.decryptFailed(what, 'authentication failed');
  }
  return out;
}

/** A chunk's id: HMAC-SHA256 under the id key when encrypted, so ids reveal nothing; SHA-256 otherwise. */
export function chunkId(key: RepoKey | undefined, raw: Uint8Array): Buffer {
  return (key ? createHmac('sha256', key.idKey) : createHash('sha256')).update(raw).digest();
}
