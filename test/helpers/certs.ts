// Test PKI made with openssl at test time: a CA, a server certificate for
// 127.0.0.1 / localhost / 10.0.2.2 (the host as a QEMU guest sees it), a client
// certificate signed by the CA, and a client certificate from an unrelated CA.
// Laid out as the directories the tools expect:
//   server/       ca-cert.pem server-cert.pem server-key.pem   (cowbd, nbdkit, qemu-nbd)
//   client/       ca-cert.pem client-cert.pem client-key.pem   (libnbd, qemu tls-creds-x509)
//   client-nocert/ ca-cert.pem                                 (trusts the server, has no cert)
//   client-rogue/ ca-cert.pem client-cert.pem client-key.pem   (cert signed by another CA)
import { execFile } from 'node:child_process';
import { copyFile, mkdir, writeFile, chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

export interface TestPki {
  root: string;
  server: string;
  client: string;
  clientNoCert: string;
  clientRogue: string;
}

async function openssl(cwd: string, args: string[]): Promise<void> {
  try {
    await execFileP('openssl', args, { cwd });
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new Error(`openssl ${args.join(' ')} failed: ${err.stderr ?? err.message}`);
  }
}

const KEY = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

async function makeCa(dir: string, name: string): Promise<void> {
  await openssl(dir, [
    'req',
    '-x509',
    ...KEY,
    '-keyout',
    `${name}-key.pem`,
    '-out',
    `${name}-cert.pem`,
    '-days',
    '3650',
    '-subj',
    `/O=cowbd tests/CN=${name}`,
    '-addext',
    'basicConstraints=critical,CA:TRUE',
    '-addext',
    'keyUsage=critical,keyCertSign,cRLSign',
  ]);
}

async function makeLeaf(dir: string, ca: string, out: string, cn: string, ext: string): Promise<void> {
  await writeFile(join(dir, `${out}.ext`), ext);
  await openssl(dir, ['req', '-new', ...KEY, '-keyout', `${out}-key.pem`, '-out', `${out}.csr`, '-subj', `/O=cowbd tests/CN=${cn}`]);
  await openssl(dir, [
    'x509',
    '-req',
    '-in',
    `${out}.csr`,
    '-CA',
    `${ca}-cert.pem`,
    '-CAkey',
    `${ca}-key.pem`,
    '-set_serial',
    String(Math.floor(Math.random() * 1e9) + 1),
    '-days',
    '365',
    '-out',
    `${out}-cert.pem`,
    '-extfile',
    `${out}.ext`,
  ]);
}

/** Creates the PKI under `root` (which must exist). About a second. */
export async function makePki(root: string): Promise<TestPki> {
  const work = join(root, 'work');
  await mkdir(work, { recursive: true });
  await makeCa(work, 'ca');
  await makeCa(work, 'rogue-ca');
  const leaf = 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n';
  await makeLeaf(
    work,
    'ca',
    'server',
    'localhost',
    `${leaf}extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.2.2\n`,
  );
  await makeLeaf(work, 'ca', 'client', 'cowbd-test-client', `${leaf}extendedKeyUsage=clientAuth\n`);
  await makeLeaf(work, 'rogue-ca', 'rogue', 'cowbd-rogue-client', `${leaf}extendedKeyUsage=clientAuth\n`);

  const pki: TestPki = {
    root,
    server: join(root, 'server'),
    client: join(root, 'client'),
    clientNoCert: join(root, 'client-nocert'),
    clientRogue: join(root, 'client-rogue'),
  };
  const place = async (dir: string, files: [string, string][]) => {
    await mkdir(dir, { recursive: true });
    for (const [from, to] of files) await copyFile(join(work, from), join(dir, to));
    for (const [, to] of files) if (to.endsWith('-key.pem')) await chmod(join(dir, to), 0o600);
  };
  await place(pki.server, [
    ['ca-cert.pem', 'ca-cert.pem'],
    ['server-cert.pem', 'server-cert.pem'],
    ['server-key.pem', 'server-key.pem'],
  ]);
  await place(pki.client, [
    ['ca-cert.pem', 'ca-cert.pem'],
    ['client-cert.pem', 'client-cert.pem'],
    ['client-key.pem', 'client-key.pem'],
  ]);
  await place(pki.clientNoCert, [['ca-cert.pem', 'ca-cert.pem']]);
  await place(pki.clientRogue, [
    ['ca-cert.pem', 'ca-cert.pem'],
    ['rogue-cert.pem', 'client-cert.pem'],
    ['rogue-key.pem', 'client-key.pem'],
  ]);
  return pki;
}
