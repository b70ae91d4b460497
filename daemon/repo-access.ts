// How a command reaches a backup repository: its location (a directory or s3://BUCKET/PREFIX),
// the S3 endpoint options, and the key of an encrypted one. Credentials come from the AWS
// variables (or ~/.aws) through the SDK and never pass through here, so nothing logs them.
// Opening is in repo-open.ts, so the CLI's start loads neither zstd nor the SDK.
import { resolve } from 'node:path';
import type { Argv } from 'yargs';
import { PASSPHRASE_ENV } from '../backup/key-file.js';
import { parseS3Location } from '../backup/storage/s3-location.js';

export interface RepoAccess {
  repo: string;
  s3Endpoint?: string;
  s3Region?: string;
  s3PathStyle?: boolean;
  /** A file holding the repository's key or passphrase. */
  encryption?: string;
}

/** The flags every repository command takes besides --repo. */
export function repoAccessOptions<T>(y: Argv<T>) {
  return y
    .option('encryption', {
      type: 'string',
      describe: `file holding the key or passphrase of an encrypted repository (or set ${PASSPHRASE_ENV}); with init, encrypts the new one`,
    })
    .option('s3-endpoint', { type: 'string', describe: 'S3-compatible endpoint URL (default: AWS_ENDPOINT_URL, else AWS)' })
    .option('s3-region', { type: 'string', describe: 'S3 region (default: AWS_REGION, else us-east-1)' })
    .option('s3-path-style', {
      type: 'boolean',
      describe: 'bucket in the URL path, not the host name (default: on with an endpoint, off for AWS)',
    });
}

export function repoAccessFrom(a: {
  repo: string;
  encryption?: string;
  's3-endpoint'?: string;
  's3-region'?: string;
  's3-path-style'?: boolean;
}): RepoAccess {
  return {
    repo: a.repo,
    encryption: a.encryption,
    s3Endpoint: a['s3-endpoint'],
    s3Region: a['s3-region'],
    s3PathStyle: a['s3-path-style'],
  };
}

/** The repository as messages and reports name it: an absolute directory, or the s3:// URL. */
export function repoName(repo: string): string {
  return parseS3Location(repo) ? repo : resolve(repo);
}
