// Where a repository's files live, in the manner of restic's backend interface: a few operations
// on named files of a few kinds, each whole or absent. The repository's format (docs/backup-
// repository.md) sits above this and is the same whether the files are a directory or a bucket.

export type FileKind = 'config' | 'keys' | 'data' | 'index' | 'backups' | 'locks';
export const FILE_KINDS: readonly FileKind[] = ['config', 'keys', 'data', 'index', 'backups', 'locks'];

export interface FileStat {
  size: number;
  /** When the file was last written, as the storage reports it (mtime, or an object's Last-Modified). */
  mtimeMs: number;
}

export interface RepoStorage {
  /** The repository as the user named it: a directory, or s3://BUCKET/PREFIX; never a credential. */
  readonly location: string;
  /** Saves beside which another save may run; the writer keeps at most this many in flight. */
  readonly parallelSaves: number;
  /** Whether anything is stored at the location (init wants nothing). */
  isEmpty(): Promise<boolean>;
  /** Prepares an empty location for a new repository. */
  create(): Promise<void>;
  /** Stores a file whole and durably: after a crash or a failure it is either all there or absent. */
  save(kind: FileKind, name: string, data: Buffer | string): Promise<void>;
  /** A file's bytes, or `length` bytes of it from `offset`; undefined when it does not exist. */
  load(kind: FileKind, name: string, range?: { offset: number; length: number }): Promise<Buffer | undefined>;
  stat(kind: FileKind, name: string): Promise<FileStat | undefined>;
  /** The names of a kind's files (for data, the pack ids), temporary files left out. */
  list(kind: FileKind): Promise<string[]>;
  /** Removes a file; removing one that is gone is not an error. */
  remove(kind: FileKind, name: string): Promise<void>;
  /** Leftovers of writers that died (temporary files); only called under the exclusive lock. */
  removeLeftovers(): Promise<void>;
  close(): Promise<void>;
}

/** The path of a file relative to the repository's root, the same in a directory and a bucket. */
export function relativePath(kind: FileKind, name: string): string {
  if (kind === 'config') return 'config';
  if (kind === 'data') return `data/${name.slice(0, 2)}/${name}`;
  return `${kind}/${name}`;
}
