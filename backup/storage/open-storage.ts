// A repository location as the user gives it: s3://BUCKET/PREFIX, or a directory.
import { DirStorage } from './dir-storage.js';
import { parseS3Location, S3Storage, type S3Options, s3OptionsFromEnv } from './s3-storage.js';
import type { RepoStorage } from './storage.js';

export type { S3Options } from './s3-storage.js';

export function openStorage(location: string, s3: S3Options = {}): RepoStorage {
  const parsed = parseS3Location(location);
  if (!parsed) return new DirStorage(location);
  return new S3Storage(`s3://${parsed.bucket}/${parsed.prefix}`.replace(/\/$/, ''), parsed.bucket, parsed.prefix, s3OptionsFromEnv(s3));
}
