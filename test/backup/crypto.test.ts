// backup/crypto.ts and backup/key-file.ts: sealing, keyed chunk ids, key files and the secret.
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { inspect } from 'node:util';
import t from 'tap';
import { chunkId, masterKeyBytes, newMasterKey, objectAad, SEAL_OVERHEAD, SEAL_PIECE_BYTES, seal, unseal } from '../../backup/crypto.js';
import { BackupErrors } from '../../backup/errors.js';
import { keyFileId, MIN_SCRYPT_N, makeKeyFile, openKeyFile, PASSPHRASE_ENV, readSecret } from '../../backup/key-file.js';

// The cheapest cost a key file may record, so the suite stays fast; the default is tested once.
const N = MIN_SCRYPT_N;
const secret = Buffer.from('correct horse battery staple');

t.test('seal and unseal round trip, with and without AAD, at every size around a piece', async (t) => {
  const key = newMasterKey();
  for (const size of [0, 1, 100, SEAL_PIECE_BYTES - 1, SEAL_PIECE_BYTES, SEAL_PIECE_BYTES + 1, 3 * SEAL_PIECE_BYTES + 7, 16 << 20]) {
    const plain = randomBytes(size);
    const sealed = seal(key, plain);
    t.equal(sealed.length, size + SEAL_OVERHEAD, `${size}: overhead`);
    t.ok(unseal(key, sealed, 'x').equals(plain), `${size}: round trip`);
    const aad = objectAad('manifest', 'abc');
    t.ok(unseal(key, seal(key, plain, aad), 'x', aad).equals(plain), `${size}: round trip with AAD`);
  }
  t.not(SEAL_OVERHEAD, 0);
  t.equal(SEAL_OVERHEAD, 28);
});

t.test('two seals of one plaintext differ (random nonces) and neither holds the plaintext', async (t) => {
  const key = newMasterKey();
  const plain = Buffer.alloc(4096, 'a');
  const a = seal(key, plain);
  const b = seal(key, plain);
  t.not(a.subarray(0, 12).toString('hex'), b.subarray(0, 12).toString('hex'), 'nonces differ');
  t.not(a.toString('hex'), b.toString('hex'));
  t.equal(a.indexOf(plain.subarray(0, 64)), -1, 'no plaintext in the sealed bytes');
});

t.test('a flipped bit anywhere fails authentication, naming the object', async (t) => {
  const key = newMasterKey();
  const plain = randomBytes(1000);
  const sealed = seal(key, plain, objectAad('pack', 'p1'));
  // Every byte of nonce, ciphertext and tag, one bit each (a different bit per byte).
  for (let i = 0; i < sealed.length; i++) {
    const bad = Buffer.from(sealed);
    bad[i]! ^= 1 << (i % 8);
    t.throws(() => unseal(key, bad, 'pack p1', objectAad('pack', 'p1')), { code: 'COWBD_BACKUP_DECRYPT_FAILED', message: /^pack p1 / });
  }
  t.throws(() => unseal(key, sealed.subarray(0, SEAL_OVERHEAD - 1), 'pack p1'), {
    code: 'COWBD_BACKUP_DECRYPT_FAILED',
    message: /shorter/,
  });
  t.throws(() => unseal(key, sealed.subarray(0, sealed.length - 1), 'pack p1'), { code: 'COWBD_BACKUP_DECRYPT_FAILED' }, 'truncated');
  t.throws(
    () => unseal(newMasterKey(), sealed, 'pack p1', objectAad('pack', 'p1')),
    { code: 'COWBD_BACKUP_DECRYPT_FAILED' },
    'another key',
  );
});

t.test('an object sealed for one name does not open as another', async (t) => {
  const key = newMasterKey();
  const sealed = seal(key, Buffer.from('backup A'), objectAad('manifest', 'A'));
  t.throws(() => unseal(key, sealed, 'backup B', objectAad('manifest', 'B')), { code: 'COWBD_BACKUP_DECRYPT_FAILED', message: /backup B/ });
  t.throws(() => unseal(key, sealed, 'backup A'), { code: 'COWBD_BACKUP_DECRYPT_FAILED' }, 'AAD left out');
  t.throws(
    () => unseal(key, seal(key, Buffer.from('x')), 'x', objectAad('manifest', 'A')),
    { code: 'COWBD_BACKUP_DECRYPT_FAILED' },
    'AAD added',
  );
  t.equal(unseal(key, sealed, 'backup A', objectAad('manifest', 'A')).toString(), 'backup A');
});

t.test('chunk ids: HMAC under the key, differing between keys; plain SHA-256 without one', async (t) => {
  const raw = randomBytes(65536);
  const a = newMasterKey();
  const b = newMasterKey();
  const sha = createHash('sha256').update(raw).digest();
  t.same(chunkId(undefined, raw), sha);
  t.equal(chunkId(a, raw).length, 32);
  t.same(chunkId(a, raw), chunkId(a, Buffer.from(raw)), 'stable for one key');
  t.notSame(chunkId(a, raw), chunkId(b, raw));
  t.notSame(chunkId(a, raw), sha);
  t.notSame(chunkId(a, raw), chunkId(a, randomBytes(65536)));
});

t.test('a key prints no key material', async (t) => {
  const key = newMasterKey();
  const printed = inspect(key) + JSON.stringify(key);
  const bytes = masterKeyBytes(key);
  t.notMatch(printed, bytes.subarray(0, 32).toString('hex'));
  t.notMatch(printed, bytes.subarray(0, 32).toString('base64'));
  t.equal(bytes.length, 64);
});

t.test('a key file opens with its secret and gives back the master key', async (t) => {
  const key = newMasterKey();
  const file = await makeKeyFile(secret, key, { N });
  const parsed = JSON.parse(file.toString()) as Record<string, unknown>;
  t.match(parsed, { version: 1, kdf: 'scrypt', N, r: 8, p: 1, salt: /^[A-Za-z0-9+/]{43}=$/, data: String });
  t.same(Object.keys(parsed), ['version', 'kdf', 'N', 'r', 'p', 'salt', 'data']);
  t.equal(Buffer.from(parsed.data as string, 'base64').length, 12 + 64 + 16);
  t.notMatch(file.toString(), secret.toString());
  const opened = await openKeyFile(file, Buffer.from(secret), '/r');
  t.same(masterKeyBytes(opened), masterKeyBytes(key));
  const raw = randomBytes(100);
  t.same(chunkId(opened, raw), chunkId(key, raw));
  t.same(unseal(opened, seal(key, raw), 'x'), raw);
  t.match(keyFileId(file), /^[0-9a-f]{64}$/);
  const again = await makeKeyFile(secret, key, { N });
  t.not(again.toString(), file.toString(), 'a fresh salt and nonce each time');
  t.not(keyFileId(again), keyFileId(file));
});

t.test('the default cost is recorded and honoured', async (t) => {
  const key = newMasterKey();
  const file = await makeKeyFile(secret, key);
  t.equal((JSON.parse(file.toString()) as { N: number }).N, 2 ** 15);
  t.same(masterKeyBytes(await openKeyFile(file, secret, '/r')), masterKeyBytes(key));
  // The N recorded is the one used: the same file with another N derives another key.
  const other = file.toString().replace('"N":32768', `"N":${N}`);
  await t.rejects(openKeyFile(Buffer.from(other), secret, '/r'), { code: BackupErrors.wrongKey.code });
});

t.test('a wrong secret is COWBD_BACKUP_WRONG_KEY naming the repository, never the secret', async (t) => {
  const file = await makeKeyFile(secret, newMasterKey(), { N });
  for (const wrong of ['correct horse battery stapler', 'x', `${secret.toString()}\n`]) {
    const e = await openKeyFile(file, Buffer.from(wrong), 's3://bucket/repo').catch((x: unknown) => x);
    t.match(e, { code: 'COWBD_BACKUP_WRONG_KEY', kind: 'EINVAL', message: 'the key does not open repository s3://bucket/repo' });
    t.notMatch((e as Error).message, wrong.trim());
    t.notMatch((e as Error).message, 'horse');
  }
  await t.rejects(makeKeyFile(Buffer.alloc(0), newMasterKey(), { N }), { code: 'COWBD_BACKUP_BAD_SECRET' });
});

t.test('a damaged key file is COWBD_BACKUP_DAMAGED_KEY, saying what is wrong', async (t) => {
  const good = JSON.parse((await makeKeyFile(secret, newMasterKey(), { N })).toString()) as Record<string, unknown>;
  const damaged = (bytes: string | Record<string, unknown>, why: RegExp) =>
    t.rejects(
      openKeyFile(Buffer.from(typeof bytes === 'string' ? bytes : JSON.stringify(bytes)), secret, '/r', '/r/keys/k1'),
      { code: 'COWBD_BACKUP_DAMAGED_KEY', kind: 'EIO', message: why },
      String(why),
    );
  await damaged('{"version":1,', /^key file \/r\/keys\/k1 is damaged: not JSON/);
  await damaged('', /not JSON/);
  await damaged('[1]', /not a JSON object/);
  await damaged('null', /not a JSON object/);
  await damaged({ ...good, version: 2 }, /version 2; this cowbd reads version 1/);
  await damaged({ ...good, kdf: 'argon2id' }, /kdf argon2id/);
  await damaged({ ...good, N: 3000 }, /N 3000/);
  await damaged({ ...good, N: 2 ** 30 }, /N 1073741824/);
  await damaged({ ...good, N: '1024' }, /N 1024 is not/);
  await damaged({ ...good, r: 1 }, /r 1 and p 1/);
  await damaged({ ...good, salt: 'abc' }, /salt/);
  await damaged({ ...good, salt: undefined }, /salt/);
  await damaged({ ...good, data: (good.data as string).slice(4) }, /data is not 92 bytes/);
  await damaged({ ...good, data: `!${(good.data as string).slice(1)}` }, /data/);
  await t.rejects(openKeyFile(Buffer.from('{'), secret, '/r'), { message: 'key file of repository /r is damaged: not JSON' });
});

t.test('readSecret: a secret file, one trailing newline stripped', async (t) => {
  const dir = t.testdir();
  const write = async (name: string, bytes: string | Buffer, mode = 0o600) => {
    const f = path.join(dir, name);
    await fs.writeFile(f, bytes);
    await fs.chmod(f, mode);
    return f;
  };
  const env = { [PASSPHRASE_ENV]: 'from the environment' };
  const s = await readSecret({ secretFile: await write('a', 'pass phrase\n'), env });
  t.equal(s?.bytes.toString(), 'pass phrase', 'the file wins over the variable');
  t.equal(s?.source, `secret file ${path.join(dir, 'a')}`);
  t.equal(s?.warning, undefined);
  t.equal((await readSecret({ secretFile: await write('b', 'crlf\r\n') }))?.bytes.toString(), 'crlf');
  t.equal((await readSecret({ secretFile: await write('c', 'two\n\n') }))?.bytes.toString(), 'two\n', 'only one newline');
  t.equal((await readSecret({ secretFile: await write('d', 'none') }))?.bytes.toString(), 'none');
  const binary = randomBytes(32);
  binary[31] = 0x41;
  t.same((await readSecret({ secretFile: await write('e', binary) }))?.bytes, binary, 'binary bytes as they are');

  const open = await write('f', 'shared\n', 0o644);
  const w = await readSecret({ secretFile: open });
  t.equal(w?.bytes.toString(), 'shared', 'a readable file is used');
  t.match(w?.warning, `(mode 0644); chmod 600 ${open}`);
  t.notMatch(w?.warning, 'shared');

  await t.rejects(readSecret({ secretFile: await write('g', '') }), { code: 'COWBD_BACKUP_BAD_SECRET', message: /empty/ });
  await t.rejects(readSecret({ secretFile: await write('h', '\n') }), { code: 'COWBD_BACKUP_BAD_SECRET', message: /empty/ });
  await t.rejects(readSecret({ secretFile: path.join(dir, 'missing') }), { code: 'COWBD_BACKUP_BAD_SECRET', message: /ENOENT/ });
  await t.rejects(readSecret({ secretFile: dir }), { code: 'COWBD_BACKUP_BAD_SECRET', message: /EISDIR/ });
  await t.rejects(readSecret({ secretFile: await write('i', Buffer.alloc(65537, 1)) }), {
    code: 'COWBD_BACKUP_BAD_SECRET',
    message: /larger/,
  });
});

t.test('readSecret: the passphrase variable, or nothing', async (t) => {
  const s = await readSecret({ env: { [PASSPHRASE_ENV]: 'pass phrase' } });
  t.same(s, { bytes: Buffer.from('pass phrase'), source: 'COWBD_BACKUP_PASSPHRASE' });
  t.equal(await readSecret({ env: {} }), undefined);
  t.equal(await readSecret({ env: { OTHER: 'x' } }), undefined);
  await t.rejects(readSecret({ env: { [PASSPHRASE_ENV]: '' } }), {
    code: 'COWBD_BACKUP_BAD_SECRET',
    message: /COWBD_BACKUP_PASSPHRASE.*empty/,
  });

  // The same passphrase from a file and from the variable opens the same key file.
  const file = await makeKeyFile(s!.bytes, newMasterKey(), { N });
  const f = path.join(t.testdir(), 'pass');
  await fs.writeFile(f, 'pass phrase\n', { mode: 0o600 });
  const fromFile = await readSecret({ secretFile: f });
  t.ok(await openKeyFile(file, fromFile!.bytes, '/r'));
});

t.test('error messages of the encryption entries', async (t) => {
  t.match(
    BackupErrors.keyRequired('/r').message,
    /repository \/r is encrypted; give its key with --encryption FILE or the COWBD_BACKUP_PASSPHRASE/,
  );
  t.match(BackupErrors.notEncrypted('/r'), { code: 'COWBD_BACKUP_NOT_ENCRYPTED', message: /repository \/r is not encrypted/ });
});
