// The copy-on-write engine's own throughput, in process (no NBD, no daemon): first writes
// with 0, 1 and 4 snapshots, and a snapshot's read speed against the origin's. Prints a
// markdown table with the targets; asserts nothing (run.sh's "engine" section runs it).
// Usage: node --import @tapjs/typescript/import scripts/bench/engine.ts DIR SIZE_BYTES
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CowManager } from '../../cow/manager.js';

const MiB = 1 << 20;

async function firstWrites(dir: string, name: string, size: number, snaps: number): Promise<{ mibps: number; readRatio?: number }> {
  await writeFile(join(dir, `${name}.vol`), '');
  await truncate(join(dir, `${name}.vol`), size);
  const m = await CowManager.open(dir);
  try {
    const o = await m.attachOrigin(name);
    for (let i = 0; i < snaps; i++) await m.createSnapshot({ name: `${name}-s${i}`, origin: name, size: size + 8 * MiB });
    const buf = Buffer.alloc(MiB, 0x5a);
    const t0 = performance.now();
    // Queue depth 4, as a kernel NBD client keeps several requests in flight.
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < size) {
        const off = next;
        next += MiB;
        await o.write(buf, off, false);
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    await o.flush();
    const mibps = size / MiB / ((performance.now() - t0) / 1000);
    if (snaps !== 1) return { mibps };
    const rb = Buffer.alloc(MiB);
    const s = m.snapshot(`${name}-s0`)!;
    const t1 = performance.now();
    for (let off = 0; off < size; off += MiB) await s.read(rb, off);
    const snapRead = performance.now() - t1;
    const t2 = performance.now();
    for (let off = 0; off < size; off += MiB) await o.read(rb, off);
    const originRead = performance.now() - t2;
    return { mibps, readRatio: originRead / snapRead };
  } finally {
    await m.close();
  }
}

async function main(): Promise<void> {
  const [base, sizeArg] = process.argv.slice(2);
  if (!base || !sizeArg || !(Number(sizeArg) >= MiB)) throw new Error('usage: engine.ts DIR SIZE_BYTES (at least 1 MiB)');
  const size = Math.floor(Number(sizeArg) / MiB) * MiB;
  const dir = await mkdtemp(join(base, 'engine-'));
  try {
    const plain = await firstWrites(dir, 'p0', size, 0);
    const one = await firstWrites(dir, 'p1', size, 1);
    const four = await firstWrites(dir, 'p4', size, 4);
    const row = (what: string, figure: number, target?: number): string =>
      `| ${what} | ${figure.toFixed(2)} | ${target === undefined ? '-' : `≥ ${target.toFixed(2)}`} | ${target === undefined ? '-' : figure >= target ? 'yes' : 'no'} |`;
    console.log(`\n### Engine in process (${size / MiB} MiB, first writes at queue depth 4)\n`);
    console.log('| measure | figure | target | met |');
    console.log('|---|---|---|---|');
    console.log(`| first writes, no snapshot | ${plain.mibps.toFixed(0)} MiB/s | - | - |`);
    console.log(row('first writes, 1 snapshot / no snapshot', one.mibps / plain.mibps, 0.5));
    console.log(row('first writes, 4 snapshots / 1 snapshot', four.mibps / one.mibps, 0.8));
    console.log(row('snapshot read / origin read throughput', one.readRatio!));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
