// A repository location as the user gives it: s3://BUCKET/PREFIX, or a directory.
import { DirStorage } from './dir-storage.js';
import { parseS3Location, type S3Options } from './s3-location.js';
import type { RepoStorage } from './storage.js';

export type { S3Options } from './s3-location.js';

export async function openStorage(location: string, s3: S3Options = {}): Promise<RepoStorage> {
  const parsed = parseS3Location(location);
  if (!parsed) return new DirStorage(location);
  // Node 20 is what the machines run; the SDK's notice that later releases want 22 would print on every command.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  // The SDK is loaded only for a bucket: directory repositories start without it.
  const { S3Storage, s3OptionsFromEnv } = await import('./s3-storage.js');
  const name = `s3://${parsed.bucket}/${parsed.prefix}`.replace(/\/$/, '');
  return new S3Storage(name, parsed.bucket, parsed.prefix, s3OptionsFromEnv(s3));
}
