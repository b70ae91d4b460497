// nbd-client -C 4: the kernel spreads requests over four connections to one export,
// which is only safe because the daemon advertises CAN_MULTI_CONN and makes a flush
// on one connection cover writes completed on the others.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import t from 'tap';
import { startDaemon } from '../helpers/daemon.js';
import { runGuest, guestSkipReason, guestLogPath, killGuests, tail } from '../helpers/vm.js';

const execFileP = promisify(execFile);
const CONNECTIONS = 4;

/** Bytes each established TCP connection to `port` has carried so far, by peer
 *  port: the host kernel's own counters, since the daemon counts per export only. */
async function socketBytes(port: number): Promise<Map<string, number>> {
  const { stdout } = await execFileP('ss', ['-Htni', 'state', 'established', `( sport = :${port} )`]);
  const out = new Map<string, number>();
  let peer: string | undefined;
  for (const line of stdout.split('\n')) {
    if (!/^\s/.test(line)) peer = line.trim().split(/\s+/).pop();
    else if (peer) {
      const sent = Number(/bytes_sent:(\d+)/.exec(line)?.[1] ?? 0);
      const received = Number(/bytes_received:(\d+)/.exec(line)?.[1] ?? 0);
      out.set(peer, sent + received);
    }
  }
  return out;
}

t.test('four connections to one export', { skip: await guestSkipReason() }, async (t) => {
  const d = await startDaemon({ volumes: [{ name: 'vol0', size: '256M' }] });
  let polling = true;
  t.teardown(async () => {
    polling = false;
    killGuests();
    await d.stop();
  });
  const log = await guestLogPath('multi-conn');
  t.comment(`guest console: ${log}`);

  // A connection's counters vanish with it, so keep the largest figure seen for each.
  const carried = new Map<string, number>();
  const poll = (async () => {
    while (polling) {
      for (const [peer, n] of await socketBytes(d.port).catch(() => new Map<string, number>())) {
        carried.set(peer, Math.max(n, carried.get(peer) ?? 0));
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  })();

  // The kernel sends a request on the connection of the submitting CPU's hardware
  // queue, so four CPUs, with one direct writer and one reader pinned to each.
  const r = await runGuest({
    exports: [{ port: d.port, name: 'vol0', device: '/dev/nbd0', connections: CONNECTIONS }],
    cpus: CONNECTIONS,
    log,
    timeoutMs: 420_000,
    attachTimeoutS: 60,
    script: `
      test "$(nproc)" = ${CONNECTIONS}
      mkfs.ext4 -q /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      for c in 0 1 2 3; do
        taskset -c $c dd if=/dev/urandom of=/mnt/f$c bs=1M count=8 oflag=direct 2>/dev/null &
      done
      wait
      for c in 0 1 2 3; do test "$(stat -c %s /mnt/f$c)" = $((8 << 20)); done
      (cd /mnt && sha256sum f0 f1 f2 f3) > /root/sums
      sync
      umount /mnt
      e2fsck -fn /dev/nbd0
      nbd-client -d /dev/nbd0
      cowbd-attach /dev/nbd0
      echo 3 > /proc/sys/vm/drop_caches
      e2fsck -fn /dev/nbd0
      mount -t ext4 /dev/nbd0 /mnt
      for c in 0 1 2 3; do (cd /mnt && taskset -c $c sha256sum f$c > /root/read$c) & done
      wait
      cat /root/read0 /root/read1 /root/read2 /root/read3 | cmp - /root/sums
      (cd /mnt && sha256sum -c /root/sums)
      umount /mnt
    `,
  });
  polling = false;
  await poll;
  t.equal(r.exitCode, 0, 'guest script passed', { log: tail(r.log, 60) });
  t.match(r.log, /f3: OK/, 'checksums verified after reconnecting');
  const sessions = d.logs.filter((l) => l.msg === 'transmission started' && l.export === 'vol0');
  t.equal(sessions.length, 2 * CONNECTIONS, 'four connections per attach, two attaches');
  const mib = [...carried.values()].map((n) => Math.round((n / 2 ** 20) * 10) / 10);
  t.comment(`MiB carried by each connection: ${mib.join(', ')}`);
  t.equal(carried.size, 2 * CONNECTIONS, 'the host saw every connection');
  // Connections are listed in the order first seen: the writing attach's four, then the reading one's.
  const written = mib.slice(0, CONNECTIONS);
  const read = mib.slice(CONNECTIONS);
  // A pinned reader submits from its own CPU, so each connection carries its 8 MiB (read ahead may
  // cut it short). Writes are not asserted: ext4 may turn the direct writes into writeback, which
  // runs on whichever CPU and can put every write on one connection.
  t.ok(
    read.every((n) => n >= 1),
    'every connection of the reading attach carried at least 1 MiB',
    { read, written },
  );
  t.same(
    d.logs.filter((l) => Number(l.level) >= 40),
    [],
    'the daemon logged no warnings or errors',
  );
  t.comment(
    `guest wall ${r.wallMs} ms, uptime at init ${r.uptime.init}s, attached ${r.uptime.attached}s, script done ${r.uptime.scriptDone}s`,
  );
});
