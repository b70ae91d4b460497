// What the daemon serves: origin and snapshot volumes share this shape.
import type { SnapshotStateName } from './format.js';

/** Takes a write's buffer over past the write's promise; returns the function that gives it back. */
export type KeepBuffer = () => () => void;

export interface Volume {
  readonly name: string;
  readonly size: number;
  /** Origins are always 'valid'. */
  readonly state: SnapshotStateName;
  read(buf: Buffer, offset: number): Promise<void>;
  /**
   * keep, when given, lets the volume take buf over past the returned promise (a write
   * held in memory): it returns the function that gives buf back. Otherwise buf is
   * the caller's again once the promise settles.
   */
  write(buf: Buffer, offset: number, fua: boolean, keep?: KeepBuffer): Promise<void>;
  flush(): Promise<void>;
  /** Advisory: may deallocate, may do nothing. Reads of the range afterwards are unspecified. */
  discard(offset: number, length: number, fua: boolean): Promise<void>;
  /** The range reads as zeros afterwards. */
  writeZeroes(offset: number, length: number, fua: boolean): Promise<void>;
}
