// A throwaway one-node Ceph cluster with a RADOS Gateway (S3) on 127.0.0.1, started by
// scripts/ceph/start.sh in a directory of its own, for tests of repositories in object storage.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { ROOT } from './daemon.js';
import { onPath } from './prometheus.js';

const execFileP = promisify(execFile);
// The SDK's notice that its later releases want Node 22 would print in every test that uses it.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
const START = join(ROOT, 'scripts', 'ceph', 'start.sh');
const STOP = join(ROOT, 'scripts', 'ceph', 'stop.sh');
/** What scripts/ceph/start.sh runs; ceph and monmaptool come with ceph-mon's dependencies. */
export const CEPH_BINARIES = ['ceph-mon', 'ceph-osd', 'radosgw', 'radosgw-admin', 'ceph', 'monmaptool', 'curl'];
/** The daemons' names in the cluster, which name their pid files (DIR/run/NAME.pid). */
const DAEMONS = { gateway: 'client.rgw.cowbd', osd: 'osd.0', mon: 'mon.a' } as const;

export interface CephOptions {
  /** Directory for everything the cluster writes; default a new one under the OS tmpdir, removed by stop(). */
  dir?: string;
  /** The OSD's RAM store (COWBD_CEPH_MEMSTORE_BYTES); default 2 GiB. */
  memstoreBytes?: number;
  /** Seconds each daemon may take to come up (COWBD_CEPH_TIMEOUT); default 60. */
  timeoutS?: number;
}

export interface CephS3 {
  /** http://127.0.0.1:PORT of the gateway; use path-style requests. */
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
  dir: string;
  /** Stops gateway, OSD and monitor (scripts/ceph/stop.sh); removes dir if startCeph made it. Safe twice. */
  stop(): Promise<void>;
  /** SIGKILLs the gateway and waits for it to be gone: requests fail until restartGateway(). */
  killGateway(): Promise<void>;
  /** Starts the gateway again on the same port (after killGateway). */
  restartGateway(): Promise<void>;
  /** The running daemons' pids (undefined for one not running), e.g. to measure their memory. */
  pids(): { gateway?: number; osd?: number; mon?: number };
}

/** Whether tests must run on Ceph rather than skip: CI sets COWBD_REQUIRE_GUEST=1. */
function cephRequired(): boolean {
  return process.env.COWBD_REQUIRE_CEPH === '1' || process.env.COWBD_REQUIRE_GUEST === '1';
}

/**
 * Why startCeph cannot run here, for `t.test(name, { skip: cephAvailable() ?? false }, ...)`;
 * undefined when it can. Throws instead when COWBD_REQUIRE_CEPH=1 or COWBD_REQUIRE_GUEST=1.
 */
export function cephAvailable(): string | undefined {
  const missing = CEPH_BINARIES.filter((b) => !onPath(b));
  if (missing.length === 0) return undefined;
  const reason = `${missing.join(', ')} not installed (see scripts/install-deps.sh)`;
  if (cephRequired()) throw new Error(`Ceph is required here but ${reason}`);
  return reason;
}

/** Whether pid is alive and started from dir's ceph.conf (a pid file may outlive its process). */
function ownedBy(pid: number, dir: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(join(dir, 'ceph.conf'));
  } catch {
    return false;
  }
}

function daemonPid(dir: string, name: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(dir, 'run', `${name}.pid`), 'utf8').trim());
    return pid > 0 && ownedBy(pid, dir) ? pid : undefined;
  } catch {
    return undefined;
  }
}

const live = new Set<string>();

/** SIGKILLs every daemon of every cluster this process started and has not stopped. */
export function killClusters(): void {
  for (const dir of live) {
    for (const name of Object.values(DAEMONS)) {
      const pid = daemonPid(dir, name);
      if (pid) process.kill(pid, 'SIGKILL');
    }
  }
  live.clear();
}
// Daemons outlive the test process that started them; one that crashes or is cancelled
// must not leave them holding RAM. After a signal, let it do what it would have done.
let hooked = false;
function hookProcessExit(): void {
  if (hooked) return;
  hooked = true;
  process.once('exit', killClusters);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      killClusters();
      process.kill(process.pid, sig);
    });
  }
}

function parseEnv(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z_]+)=(.*)$/.exec(line);
    if (m) env[m[1]!] = m[2]!;
  }
  return env;
}

async function script(path: string, args: string[], env: NodeJS.ProcessEnv): Promise<string> {
  try {
    const { stdout } = await execFileP('bash', [path, ...args], { env, maxBuffer: 16 << 20, timeout: 600_000 });
    return stdout;
  } catch (e) {
    const err = e as { code?: unknown; stderr?: string };
    throw new Error(`${path} ${args.join(' ')} failed (${String(err.code)}):\n${err.stderr ?? String(e)}`);
  }
}

export async function startCeph(opts: CephOptions = {}): Promise<CephS3> {
  const skip = cephAvailable();
  if (skip) throw new Error(`Ceph unavailable: ${skip}`);
  const ownDir = opts.dir === undefined;
  const dir = opts.dir ?? (await mkdtemp(join(tmpdir(), 'cowbd-ceph-')));
  const env = { ...process.env };
  if (opts.memstoreBytes !== undefined) env.COWBD_CEPH_MEMSTORE_BYTES = String(opts.memstoreBytes);
  if (opts.timeoutS !== undefined) env.COWBD_CEPH_TIMEOUT = String(opts.timeoutS);
  hookProcessExit();
  live.add(dir);
  let vars: Record<string, string>;
  try {
    vars = parseEnv(await script(START, [dir], env));
  } catch (e) {
    // start.sh stops what it started before failing; its error carries the logs' tails.
    live.delete(dir);
    if (ownDir) await rm(dir, { recursive: true, force: true });
    throw e;
  }
  let stopped: Promise<void> | undefined;
  return {
    endpoint: vars.AWS_ENDPOINT_URL!,
    accessKeyId: vars.AWS_ACCESS_KEY_ID!,
    secretAccessKey: vars.AWS_SECRET_ACCESS_KEY!,
    region: vars.AWS_REGION!,
    dir,
    stop() {
      stopped ??= (async () => {
        await script(STOP, [dir], env);
        live.delete(dir);
        if (ownDir) await rm(dir, { recursive: true, force: true });
      })();
      return stopped;
    },
    async killGateway() {
      const pid = daemonPid(dir, DAEMONS.gateway);
      if (!pid) throw new Error(`no gateway running in ${dir}`);
      process.kill(pid, 'SIGKILL');
      while (ownedBy(pid, dir)) await new Promise((r) => setTimeout(r, 20));
    },
    async restartGateway() {
      await script(START, ['--gateway', dir], env);
    },
    pids() {
      return {
        gateway: daemonPid(dir, DAEMONS.gateway),
        osd: daemonPid(dir, DAEMONS.osd),
        mon: daemonPid(dir, DAEMONS.mon),
      };
    },
  };
}

/** The variables a child process's AWS SDK reads to reach this cluster. */
export function s3Env(s3: CephS3): {
  AWS_ACCESS_KEY_ID: string;
  AWS_SECRET_ACCESS_KEY: string;
  AWS_REGION: string;
  AWS_ENDPOINT_URL: string;
} {
  return {
    AWS_ACCESS_KEY_ID: s3.accessKeyId,
    AWS_SECRET_ACCESS_KEY: s3.secretAccessKey,
    AWS_REGION: s3.region,
    AWS_ENDPOINT_URL: s3.endpoint,
  };
}

/** A client of the cluster's gateway; the gateway has no DNS name, so requests are path-style. */
export function s3Client(s3: CephS3, extra: { maxAttempts?: number } = {}): S3Client {
  return new S3Client({
    endpoint: s3.endpoint,
    region: s3.region,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
    forcePathStyle: true,
    ...extra,
  });
}

export async function makeBucket(s3: CephS3, name: string): Promise<void> {
  const client = s3Client(s3);
  try {
    await client.send(new CreateBucketCommand({ Bucket: name }));
  } finally {
    client.destroy();
  }
}
