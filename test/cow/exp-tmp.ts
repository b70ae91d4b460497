import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CowManager } from '../../cow/manager.js';
const MiB = 1 << 20;
const size = 128 * MiB;
const dir = await mkdtemp(join(tmpdir(), 'cowbd-exp-'));
const buf = Buffer.alloc(MiB, 0x5a);
for (const qd of [1, 4, 16]) for (const snaps of [0, 1]) {
  const name = `v${qd}${snaps}`;
  await writeFile(join(dir, `${name}.vol`), ''); await truncate(join(dir, `${name}.vol`), size);
  const m = await CowManager.open(dir);
  const o = await m.attachOrigin(name);
  for (let i = 0; i < snaps; i++) await m.createSnapshot({ name: `${name}-s${i}`, origin: name, size: size + 8 * MiB });
  const t0 = performance.now();
  let next = 0;
  const worker = async () => { while (next < size) { const off = next; next += MiB; await o.write(buf, off, false); } };
  await Promise.all(Array.from({ length: qd }, worker));
  const t1 = performance.now();
  await o.flush();
  const secs = (performance.now() - t0) / 1000;
  const st = m.stats();
  console.log(`qd=${qd} snaps=${snaps} ${(size / MiB / secs).toFixed(0)} MiB/s (writes ${(t1-t0).toFixed(0)}ms flush ${(performance.now()-t1).toFixed(0)}ms) commits=${st.commits} avgCommit=${(st.commitSecondsTotal/Math.max(1,st.commits)*1000).toFixed(1)}ms`);
  await m.close();
}
await rm(dir, { recursive: true, force: true });
