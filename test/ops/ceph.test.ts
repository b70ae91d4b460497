// The throwaway Ceph cluster the S3 tests run against (scripts/ceph, test/helpers/ceph.ts):
// it serves S3, its gateway can be killed and restarted, it stops without leftovers, and two
// run side by side.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { DeleteObjectCommand, GetObjectCommand, ListBucketsCommand, ListObjectsV2Command, PutObjectCommand } from '@aws-sdk/client-s3';
import { cephAvailable, makeBucket, s3Client, startCeph, type CephS3 } from '../helpers/ceph.js';
import { mib, sample } from '../helpers/proc.js';

t.setTimeout(300_000);
const skip = cephAvailable() ?? false;

/** Pids of live processes whose command line names dir's ceph.conf. */
function processesOf(dir: string): number[] {
  const pids: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${e}/cmdline`, 'utf8').includes(`${dir}/ceph.conf`)) pids.push(Number(e));
    } catch {}
  }
  return pids;
}

async function timed(): Promise<{ s3: CephS3; ms: number }> {
  const t0 = performance.now();
  const s3 = await startCeph();
  return { s3, ms: performance.now() - t0 };
}

t.test('a cluster serves S3, survives a gateway restart and stops cleanly', { skip }, async (t) => {
  const { s3, ms } = await timed();
  t.teardown(() => s3.stop());
  t.comment(`started in ${(ms / 1000).toFixed(1)} s at ${s3.endpoint}`);
  const pids = s3.pids();
  t.ok(pids.gateway && pids.osd && pids.mon, 'gateway, OSD and monitor are running');
  let total = 0;
  for (const [name, pid] of Object.entries(pids)) {
    const rss = sample(pid!).rssKiB;
    total += rss;
    t.comment(`${name} RSS at start ${mib(rss)} MiB`);
  }
  t.comment(`cluster RSS at start ${mib(total)} MiB`);

  // One attempt per request, so a dead gateway shows at once rather than after retries.
  const client = s3Client(s3, { maxAttempts: 1 });
  t.teardown(() => client.destroy());
  await makeBucket(s3, 'ceph-test');
  const body = randomBytes(20 << 20);
  await client.send(new PutObjectCommand({ Bucket: 'ceph-test', Key: 'dir/big', Body: body }));
  const got = await client.send(new GetObjectCommand({ Bucket: 'ceph-test', Key: 'dir/big' }));
  t.ok(Buffer.from(await got.Body!.transformToByteArray()).equals(body), 'the 20 MiB object reads back as written');
  const listed = await client.send(new ListObjectsV2Command({ Bucket: 'ceph-test' }));
  t.same(
    listed.Contents?.map((o) => [o.Key, o.Size]),
    [['dir/big', 20 << 20]],
    'the bucket lists the object',
  );
  await client.send(new DeleteObjectCommand({ Bucket: 'ceph-test', Key: 'dir/big' }));
  const after = await client.send(new ListObjectsV2Command({ Bucket: 'ceph-test' }));
  t.equal(after.KeyCount, 0, 'the deleted object is no longer listed');
  const rssAfter = Object.values(s3.pids()).reduce((a, pid) => a + sample(pid!).rssKiB, 0);
  t.comment(`cluster RSS after 20 MiB in and out ${mib(rssAfter)} MiB`);

  await s3.killGateway();
  t.equal(s3.pids().gateway, undefined, 'the gateway is gone');
  await t.rejects(client.send(new ListBucketsCommand({})), 'requests fail while the gateway is dead');
  const r0 = performance.now();
  await s3.restartGateway();
  t.comment(`gateway restarted in ${((performance.now() - r0) / 1000).toFixed(1)} s`);
  const buckets = await client.send(new ListBucketsCommand({}));
  t.same(
    buckets.Buckets?.map((b) => b.Name),
    ['ceph-test'],
    'the restarted gateway serves the same cluster on the same endpoint',
  );

  t.not(processesOf(s3.dir), [], 'the cluster has processes before stop');
  const s0 = performance.now();
  await s3.stop();
  t.comment(`stopped in ${((performance.now() - s0) / 1000).toFixed(1)} s`);
  t.same(processesOf(s3.dir), [], 'no process of the cluster remains');
  await s3.stop();
  t.pass('stop runs twice');
});

t.test('two clusters run side by side', { skip }, async (t) => {
  const [a, b] = await Promise.all([timed(), timed()]);
  t.teardown(() => Promise.all([a.s3.stop(), b.s3.stop()]));
  t.comment(`started together in ${(a.ms / 1000).toFixed(1)} s and ${(b.ms / 1000).toFixed(1)} s`);
  t.not(a.s3.endpoint, b.s3.endpoint, 'each has its own endpoint');
  await makeBucket(a.s3, 'only-in-a');
  for (const [s3, want] of [
    [a.s3, ['only-in-a']],
    [b.s3, []],
  ] as const) {
    const client = s3Client(s3);
    const res = await client.send(new ListBucketsCommand({}));
    client.destroy();
    t.same(res.Buckets?.map((x) => x.Name) ?? [], want, `${s3.endpoint} has its own buckets`);
  }
});
