// The Linux client over TLS: the guest's nbd-client (built with GnuTLS; it hands
// the kernel one end of a socketpair and runs a TLS proxy on the other) attaches an
// export of a `--tls require --tls-verify-peer` daemon with a CA-signed client
// certificate, formats and fills it, and reads it back after reattaching. Without
// a certificate, or without TLS at all, the attach fails.
import t from 'tap';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { makePki } from '../helpers/certs.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

t.test('nbd-client over TLS with a client certificate', { skip: await guestSkipReason() }, async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'cowbd-kernel-tls-'));
  t.teardown(async () => {
    killGuests();
    await rm(dir, { recursive: true, force: true });
  });
  const pki = await makePki(dir);
  const d = await startDaemon({
    volumes: [{ name: 'vol', size: '128M' }],
    args: ['--tls', 'require', '--tls-certificates', pki.server, '--tls-verify-peer'],
  });
  t.teardown(() => d.stop());

  const file = async (from: string, name: string, mode?: number) => ({ name, data: await readFile(join(from, name)), mode });
  const files = [
    await file(pki.client, 'ca-cert.pem'),
    await file(pki.client, 'client-cert.pem'),
    await file(pki.client, 'client-key.pem', 0o600),
  ];
  // The guest reaches the host's 127.0.0.1 as 10.0.2.2, which the server certificate names.
  const base = `10.0.2.2 ${d.port}`;
  const tls = '-cacertfile /cowbd/ca-cert.pem -certfile /cowbd/client-cert.pem -keyfile /cowbd/client-key.pem';
  const log = await guestLogPath('tls');
  t.comment(`guest console: ${log}`);
  const r = await runGuest({
    files,
    log,
    timeoutMs: 180_000,
    script: `
      if timeout 30 nbd-client ${base} /dev/nbd1 -N vol -t 10 </dev/null; then echo "COWBD-FAIL: attached without TLS"; exit 1; fi
      if timeout 30 nbd-client ${base} /dev/nbd1 -N vol -t 10 -cacertfile /cowbd/ca-cert.pem </dev/null; then echo "COWBD-FAIL: attached without a client certificate"; exit 1; fi
      echo COWBD-REFUSED-OK
      timeout 60 nbd-client ${base} /dev/nbd0 -N vol -t 30 ${tls} </dev/null
      test "$(cat /sys/block/nbd0/size)" = $((128 << 11))
      mkfs.ext4 -q /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      head -c $((4 << 20)) /dev/urandom > /mnt/random.bin
      (cd /mnt && sha256sum random.bin > sums)
      umount /mnt
      nbd-client -d /dev/nbd0
      sleep 1
      timeout 60 nbd-client ${base} /dev/nbd0 -N vol -t 30 ${tls} </dev/null
      mount -t ext4 -o ro /dev/nbd0 /mnt
      (cd /mnt && sha256sum -c sums)
      umount /mnt
      e2fsck -fn /dev/nbd0
      nbd-client -d /dev/nbd0
    `,
  });
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 80) });
  t.match(r.log, /COWBD-REFUSED-OK/, 'plain and certificate-less attaches were refused');
  t.match(r.log, /random\.bin: OK/, 'data written over TLS reads back after reattaching');
  t.ok(
    d.logs.some((l) => l.msg === 'client option refused: TLS is required (NBD_REP_ERR_TLS_REQD)'),
    'the plain client got TLS_REQD',
  );
  t.ok(
    d.logs.some((l) => l.msg === 'TLS handshake failed; closing'),
    'the certificate-less client failed the TLS handshake',
  );
  t.ok(
    d.logs.filter((l) => l.msg === 'TLS established' && l.clientCertificate === 'cowbd-test-client').length >= 2,
    'both attaches ran over TLS with the client certificate',
  );
  t.comment(`guest wall ${r.wallMs} ms, script done at uptime ${r.uptime.scriptDone}s`);
});
