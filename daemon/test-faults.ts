// TEST-ONLY fault injection, off unless COWBD_TEST_FAULTS names a JSON file of
// FaultRule objects (cow/fault-device.ts). Every file the daemon opens for volumes
// and snapshot stores is then wrapped in a FaultDevice that fails the matching reads,
// writes and syncs. The file is re-read whenever it changes, so a test can arm and
// disarm faults while the daemon runs: a rule applies to every I/O that starts after
// the file was written. Never set it outside tests: the daemon says so loudly.
import { readFileSync, statSync } from 'node:fs';
import type { Logger } from 'pino';
import { FaultDevice, FaultPlan, type FaultRule } from '../cow/fault-device.js';
import type { CowManagerOptions } from '../cow/manager.js';

export const TEST_FAULTS_ENV = 'COWBD_TEST_FAULTS';

/** The wrapDevice hook for CowManager when COWBD_TEST_FAULTS is set; undefined otherwise. */
export function testFaults(log: Logger, env: NodeJS.ProcessEnv = process.env): CowManagerOptions['wrapDevice'] {
  const file = env[TEST_FAULTS_ENV];
  if (!file) return undefined;
  log.warn({ file }, `TEST-ONLY fault injection is on (${TEST_FAULTS_ENV}): I/O errors will be injected on purpose`);
  const plan = new FaultPlan();
  let seen = '';
  const current = (): FaultPlan => {
    let stamp: string;
    try {
      const st = statSync(file, { bigint: true });
      stamp = `${st.ino}:${st.size}:${st.mtimeNs}`;
    } catch {
      stamp = 'missing';
    }
    if (stamp !== seen) {
      seen = stamp;
      let rules: FaultRule[] = [];
      if (stamp !== 'missing') {
        try {
          const parsed: unknown = JSON.parse(readFileSync(file, 'utf8'));
          rules = Array.isArray(parsed) ? (parsed as FaultRule[]) : [];
        } catch (err) {
          log.error({ err, file }, 'test faults: unreadable rules file; injecting nothing');
        }
      }
      plan.set(rules);
      log.info({ file, rules }, 'test faults loaded');
    }
    return plan;
  };
  current();
  return (dev) => new FaultDevice(dev, dev.path, current);
}
