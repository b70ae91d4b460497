// Opens or creates the repository a command names (repo-access.ts), reading its key first.
import { readSecret } from '../backup/key-file.js';
import { type OpenOptions, Repository } from '../backup/repository.js';
import type { RepoAccess } from './repo-access.js';

async function openOptions(o: RepoAccess, warn: (msg: string) => void): Promise<OpenOptions> {
  const secret = await readSecret({ secretFile: o.encryption });
  if (secret?.warning) warn(secret.warning);
  return { s3: { endpoint: o.s3Endpoint, region: o.s3Region, pathStyle: o.s3PathStyle }, secret: secret?.bytes };
}

const stderrWarn = (msg: string): void => {
  process.stderr.write(`cowbd: warning: ${msg}\n`);
};

export async function openRepository(o: RepoAccess, warn: (msg: string) => void = stderrWarn): Promise<Repository> {
  return Repository.open(o.repo, await openOptions(o, warn));
}

export async function initRepository(o: RepoAccess, warn: (msg: string) => void = stderrWarn): Promise<Repository> {
  return Repository.init(o.repo, await openOptions(o, warn));
}
