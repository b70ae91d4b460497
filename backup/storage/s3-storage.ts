// A repository in an S3 bucket (AWS, Ceph's RADOS Gateway, MinIO...) under a prefix, laid out as
// the directory repository is, so the two can be copied into each other. An object is written by
// one PUT, so it is whole or absent; transient failures are retried by the SDK with backoff.
import {
  CreateBucketCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  type ListObjectsV2CommandOutput,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { BackupErrors } from '../errors.js';
import type { S3Options } from './s3-location.js';
import { type FileKind, type FileStat, type RepoStorage, relativePath } from './storage.js';

const HEX64 = /^[0-9a-f]{64}$/;
/** Attempts per request, with the SDK's exponential backoff, to ride out a gateway restart; see docs/tuning.md, S3_MAX_ATTEMPTS. */
export const S3_MAX_ATTEMPTS = 6;
/** Packs uploaded at once: a PUT waits on the network, not on us; see docs/tuning.md, S3_PARALLEL_SAVES. */
export const S3_PARALLEL_SAVES = 4;

/** The options AWS's own tools would take from the environment, overridden by those given. */
export function s3OptionsFromEnv(given: S3Options = {}, env: NodeJS.ProcessEnv = process.env): S3Options {
  const endpoint = given.endpoint ?? env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL;
  return {
    endpoint: endpoint || undefined,
    region: given.region ?? env.AWS_REGION ?? env.AWS_DEFAULT_REGION ?? 'us-east-1',
    pathStyle: given.pathStyle ?? Boolean(endpoint),
  };
}

function status(e: unknown): number | undefined {
  return (e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
}

function notFound(e: unknown): boolean {
  const name = (e as Error).name;
  return name === 'NoSuchKey' || name === 'NotFound' || name === 'NoSuchBucket' || status(e) === 404;
}

export class S3Storage implements RepoStorage {
  readonly parallelSaves = S3_PARALLEL_SAVES;
  private readonly client: S3Client;

  constructor(
    readonly location: string,
    private readonly bucket: string,
    private readonly prefix: string,
    o: S3Options,
  ) {
    this.client = new S3Client({
      endpoint: o.endpoint,
      region: o.region,
      forcePathStyle: o.pathStyle,
      maxAttempts: S3_MAX_ATTEMPTS,
      retryMode: 'standard',
      // Trailing checksums need aws-chunked uploads, which S3-compatible stores (Ceph 16) refuse;
      // SigV4 already signs each payload's SHA-256, and every object is checked by its hash on read.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: { connectionTimeout: 10_000, requestTimeout: 300_000 },
    });
  }

  private key(kind: FileKind, name: string): string {
    return this.prefix + relativePath(kind, name);
  }

  private fail(op: string, key: string, e: unknown): Error {
    const why = status(e) ? `${(e as Error).name} (HTTP ${status(e)})` : (e as Error).message || (e as Error).name;
    return BackupErrors.storage(this.location, `${op} ${key}`, `${why}, after ${S3_MAX_ATTEMPTS} attempts`);
  }

  async isEmpty(): Promise<boolean> {
    try {
      const r = await this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix, MaxKeys: 1 }));
      return (r.KeyCount ?? 0) === 0;
    } catch (e) {
      if ((e as Error).name === 'NoSuchBucket') return true;
      throw this.fail('LIST', this.prefix, e);
    }
  }

  async create(): Promise<void> {
    try {
      await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
      return;
    } catch (e) {
      if (!notFound(e)) throw this.fail('HEAD bucket', this.bucket, e);
    }
    try {
      await this.client.send(new CreateBucketCommand({ Bucket: this.bucket }));
    } catch (e) {
      const name = (e as Error).name;
      if (name !== 'BucketAlreadyOwnedByYou') throw this.fail('CREATE bucket', this.bucket, e);
    }
  }

  async save(kind: FileKind, name: string, data: Buffer | string): Promise<void> {
    const key = this.key(kind, name);
    const body = typeof data === 'string' ? Buffer.from(data) : data;
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: key, Body: body, ContentLength: body.length }));
    } catch (e) {
      throw this.fail('PUT', key, e);
    }
  }

  async load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer | undefined> {
    const key = this.key(kind, name);
    if (range && range.length === 0) return Buffer.alloc(0);
    try {
      const r = await this.client.send(
        new GetObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Range: range ? `bytes=${range.offset}-${range.offset + range.length - 1}` : undefined,
        }),
      );
      const bytes = await r.Body!.transformToByteArray();
      return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } catch (e) {
      if (notFound(e)) return undefined;
      // A range past the end reads as what there is, as a file does.
      if (status(e) === 416) return Buffer.alloc(0);
      throw this.fail('GET', key, e);
    }
  }

  async stat(kind: FileKind, name: string): Promise<FileStat | undefined> {
    const key = this.key(kind, name);
    try {
      const r = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      return { size: r.ContentLength ?? 0, mtimeMs: r.LastModified?.getTime() ?? 0 };
    } catch (e) {
      if (notFound(e)) return undefined;
      throw this.fail('HEAD', key, e);
    }
  }

  async list(kind: FileKind): Promise<string[]> {
    const base = this.prefix + (kind === 'config' ? 'config' : `${kind}/`);
    const out: string[] = [];
    let token: string | undefined;
    do {
      let r: ListObjectsV2CommandOutput;
      try {
        r = await this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: base, ContinuationToken: token }));
      } catch (e) {
        if ((e as Error).name === 'NoSuchBucket') return [];
        throw this.fail('LIST', base, e);
      }
      for (const o of r.Contents ?? []) {
        const rel = o.Key!.slice(this.prefix.length);
        if (kind === 'config') {
          if (rel === 'config') out.push('config');
          continue;
        }
        const parts = rel.split('/');
        const name = parts[parts.length - 1]!;
        if (kind === 'data') {
          if (parts.length === 3 && HEX64.test(name) && name.startsWith(parts[1]!)) out.push(name);
        } else if (parts.length === 2 && name) out.push(name);
      }
      token = r.NextContinuationToken;
    } while (token);
    return out;
  }

  async remove(kind: FileKind, name: string): Promise<void> {
    const key = this.key(kind, name);
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
    } catch (e) {
      if (!notFound(e)) throw this.fail('DELETE', key, e);
    }
  }

  async removeLeftovers(): Promise<void> {}

  async close(): Promise<void> {
    this.client.destroy();
  }
}
