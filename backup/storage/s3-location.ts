// Naming a repository in a bucket: s3://BUCKET/PREFIX, and the endpoint options beside it. Kept
// apart from the S3 client so that commands that never touch S3 never load the SDK.
import { BackupErrors } from '../errors.js';

export interface S3Options {
  /** An S3-compatible endpoint such as http://127.0.0.1:7480; AWS itself when absent. */
  endpoint?: string;
  region?: string;
  /** Bucket in the path (http://host/bucket/key) rather than in the host name; the default with an endpoint. */
  pathStyle?: boolean;
}

/** s3://BUCKET/PREFIX → its parts; undefined when `location` is not an S3 URL. */
export function parseS3Location(location: string): { bucket: string; prefix: string } | undefined {
  const m = /^s3:\/\/([^/]+)(?:\/(.*))?$/.exec(location);
  if (!m) return undefined;
  const bucket = m[1]!;
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket))
    throw BackupErrors.badLocation(location, `"${bucket}" is not a valid bucket name`);
  const prefix = (m[2] ?? '').replace(/^\/+|\/+$/g, '');
  return { bucket, prefix: prefix ? `${prefix}/` : '' };
}
