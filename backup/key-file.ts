// Key files and the secret that opens them. A key file holds the repository's master key sealed
// under a key that scrypt derives from the user's secret, so the secret can change (a new key
// file) without re-encrypting the repository. Format: docs/backup-repository.md, "Key files".
import { createHash, createSecretKey, randomBytes, scrypt } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { MASTER_KEY_BYTES, masterKeyBytes, type RepoKey, repoKeyFrom, SEAL_OVERHEAD, sealWith, unsealWith } from './crypto.js';
import { BackupErrors, isBackupError } from './errors.js';

export const KEY_FILE_VERSION = 1;
/** scrypt's cost for new key files: restic's and the scrypt paper's interactive choice, about 32 MiB. */
export const DEFAULT_SCRYPT_N = 2 ** 15;
export const SCRYPT_R = 8;
export const SCRYPT_P = 1;
/** Bounds on a key file's N, so a damaged one cannot ask for gigabytes or no work at all. */
export const MIN_SCRYPT_N = 2 ** 10;
export const MAX_SCRYPT_N = 2 ** 20;
export const SALT_BYTES = 32;
/** The environment variable holding a passphrase. */
export const PASSPHRASE_ENV = 'COWBD_BACKUP_PASSPHRASE';
/** A secret file larger than this is surely the wrong file (a disk image, a log), not a key. */
export const MAX_SECRET_BYTES = 64 * 1024;

interface KdfParams {
  N: number;
  r: number;
  p: number;
  salt: Buffer;
}

/** The bytes of a new key file sealing `key` under `secret`. `N` is for tests that need speed. */
export async function makeKeyFile(secret: Buffer, key: RepoKey, opts: { N?: number } = {}): Promise<Buffer> {
  if (secret.length === 0) throw BackupErrors.badSecret('the secret', 'it is empty');
  const N = opts.N ?? DEFAULT_SCRYPT_N;
  if (!validN(N)) throw new RangeError(`scrypt N must be a power of two in ${MIN_SCRYPT_N}..${MAX_SCRYPT_N}, not ${N}`);
  const params: KdfParams = { N, r: SCRYPT_R, p: SCRYPT_P, salt: randomBytes(SALT_BYTES) };
  const derived = await derive(secret, params);
  const master = masterKeyBytes(key);
  const data = sealWith(createSecretKey(derived), master);
  derived.fill(0);
  master.fill(0);
  const file = {
    version: KEY_FILE_VERSION,
    kdf: 'scrypt',
    N,
    r: params.r,
    p: params.p,
    salt: params.salt.toString('base64'),
    data: data.toString('base64'),
  };
  return Buffer.from(JSON.stringify(file), 'utf8');
}

/**
 * The master key a key file seals. A secret that does not open it is COWBD_BACKUP_WRONG_KEY naming
 * `repo`; a file that is not a key file is COWBD_BACKUP_DAMAGED_KEY naming `keyFile`.
 */
export async function openKeyFile(bytes: Buffer, secret: Buffer, repo: string, keyFile = `of repository ${repo}`): Promise<RepoKey> {
  const { params, data } = parseKeyFile(bytes, keyFile);
  const derived = await derive(secret, params);
  let master: Buffer;
  try {
    master = unsealWith(createSecretKey(derived), data, `key file ${keyFile}`);
  } catch (e) {
    if (isBackupError(e, BackupErrors.decryptFailed)) throw BackupErrors.wrongKey(repo);
    throw e;
  } finally {
    derived.fill(0);
  }
  const key = repoKeyFrom(master);
  master.fill(0);
  return key;
}

/** A key file's name in the repository: the SHA-256 (hex) of its bytes. */
export function keyFileId(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

function parseKeyFile(bytes: Buffer, keyFile: string): { params: KdfParams; data: Buffer } {
  const damaged = (why: string) => BackupErrors.damagedKey(keyFile, why);
  let f: Record<string, unknown>;
  try {
    f = JSON.parse(bytes.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw damaged('not JSON');
  }
  if (typeof f !== 'object' || f === null || Array.isArray(f)) throw damaged('not a JSON object');
  if (f.version !== KEY_FILE_VERSION) throw damaged(`version ${String(f.version)}; this cowbd reads version ${KEY_FILE_VERSION}`);
  if (f.kdf !== 'scrypt') throw damaged(`kdf ${String(f.kdf)}; this cowbd knows scrypt`);
  const { N, r, p } = f;
  if (typeof N !== 'number' || !validN(N)) throw damaged(`N ${String(N)} is not a power of two in ${MIN_SCRYPT_N}..${MAX_SCRYPT_N}`);
  if (r !== SCRYPT_R || p !== SCRYPT_P) throw damaged(`r ${String(r)} and p ${String(p)}; this cowbd uses r ${SCRYPT_R} and p ${SCRYPT_P}`);
  const salt = base64(f.salt, SALT_BYTES);
  if (!salt) throw damaged(`salt is not ${SALT_BYTES} bytes of base64`);
  const data = base64(f.data, MASTER_KEY_BYTES + SEAL_OVERHEAD);
  if (!data) throw damaged(`data is not ${MASTER_KEY_BYTES + SEAL_OVERHEAD} bytes of base64`);
  return { params: { N, r, p, salt }, data };
}

function validN(N: number): boolean {
  return Number.isInteger(N) && N >= MIN_SCRYPT_N && N <= MAX_SCRYPT_N && (N & (N - 1)) === 0;
}

/** Decodes strict base64 of exactly `length` bytes, or undefined. */
function base64(v: unknown, length: number): Buffer | undefined {
  if (typeof v !== 'string') return undefined;
  const b = Buffer.from(v, 'base64');
  return b.length === length && b.toString('base64') === v ? b : undefined;
}

/** scrypt on libuv's threadpool: it takes a tenth of a second, which the event loop must not wait. */
function derive(secret: Buffer, { N, r, p, salt }: KdfParams): Promise<Buffer> {
  // Node refuses memory above maxmem (32 MiB by default), and N = 2^15, r = 8 needs 128 N r plus a little.
  const maxmem = 2 * 128 * N * r;
  return new Promise((resolve, reject) => {
    scrypt(secret, salt, 32, { N, r, p, maxmem }, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

export interface Secret {
  bytes: Buffer;
  /** Where it came from, for messages: "secret file PATH" or the variable's name. Never the secret. */
  source: string;
  /** Something the caller should log (a secret file others can read); undefined when all is well. */
  warning?: string;
}

/**
 * The user's secret: the bytes of `secretFile` (one trailing newline stripped, so `echo pass > f`
 * and the environment variable give the same key), or else the passphrase in COWBD_BACKUP_PASSPHRASE,
 * or undefined when neither is given. An explicit file wins over the ambient variable.
 */
export async function readSecret(opts: { secretFile?: string; env?: NodeJS.ProcessEnv } = {}): Promise<Secret | undefined> {
  const { secretFile, env = process.env } = opts;
  if (secretFile !== undefined) return readSecretFile(secretFile);
  const value = env[PASSPHRASE_ENV];
  if (value === undefined) return undefined;
  if (value === '') throw BackupErrors.badSecret(PASSPHRASE_ENV, 'it is set but empty');
  return { bytes: Buffer.from(value, 'utf8'), source: PASSPHRASE_ENV };
}

async function readSecretFile(file: string): Promise<Secret> {
  const source = `secret file ${file}`;
  let bytes: Buffer;
  let mode: number;
  let regular: boolean;
  try {
    const fd = await fs.open(file, 'r');
    try {
      const st = await fd.stat();
      ({ mode } = st);
      regular = st.isFile();
      if (regular && st.size > MAX_SECRET_BYTES) throw BackupErrors.badSecret(source, `it is larger than ${MAX_SECRET_BYTES} bytes`);
      bytes = await fd.readFile();
    } finally {
      await fd.close();
    }
  } catch (e) {
    if (isBackupError(e)) throw e;
    throw BackupErrors.badSecret(source, (e as NodeJS.ErrnoException).code ?? String(e));
  }
  if (bytes.length > MAX_SECRET_BYTES) throw BackupErrors.badSecret(source, `it is larger than ${MAX_SECRET_BYTES} bytes`);
  let end = bytes.length;
  if (bytes[end - 1] === 0x0a) end -= bytes[end - 2] === 0x0d ? 2 : 1;
  if (end === 0) throw BackupErrors.badSecret(source, 'it is empty');
  const secret: Secret = { bytes: bytes.subarray(0, end), source };
  // Pipes (--encryption /dev/stdin) have no meaningful mode; a regular file others can read leaks the key.
  if (regular && (mode & 0o077) !== 0) {
    const octal = (mode & 0o777).toString(8).padStart(4, '0');
    secret.warning = `${source} can be read or changed by group or others (mode ${octal}); chmod 600 ${file}`;
  }
  return secret;
}
