// TEST-ONLY. A BlockDevice wrapper that fails chosen reads, writes and syncs with an
// errno (EIO by default), so tests can watch the engine and the daemon meet a failing
// disk. Nothing in cow/ uses it by itself: the daemon wraps its files in it only when
// COWBD_TEST_FAULTS is set (daemon/test-faults.ts), and a production run never does.
import { basename } from 'node:path';
import type { BlockDevice } from './device.js';

export type FaultOp = 'read' | 'write' | 'sync';

export interface FaultRule {
  /** Files it applies to: a substring of the file's base name ("vol0.vol", ".cows"). */
  file: string;
  /** Operations it fails; default every one. */
  op?: FaultOp | FaultOp[];
  /** Byte range [from, to) a read or write must overlap; default the whole file. Syncs ignore it. */
  from?: number;
  to?: number;
  /** The error's code; default EIO. */
  errno?: string;
  /** Fails this many matching operations, then lets them pass; default every one. */
  times?: number;
}

const ERRNO: Record<string, number> = { EIO: 5, ENOSPC: 28, EROFS: 30, EPERM: 1, EDQUOT: 122, EFBIG: 27, ENOMEM: 12 };

/** What a failing syscall throws in Node: an Error with code, errno and syscall. */
export function injectedError(code: string, op: FaultOp, path: string, offset?: number): NodeJS.ErrnoException {
  const syscall = op === 'sync' ? 'fdatasync' : op;
  const where = offset === undefined ? '' : ` at ${offset}`;
  return Object.assign(new Error(`${code}: injected fault, ${syscall} '${path}'${where}`), {
    code,
    errno: -(ERRNO[code] ?? 5),
    syscall,
    path,
  });
}

/** A set of rules with their remaining counts. The rules may be swapped at any time. */
export class FaultPlan {
  private rules: FaultRule[] = [];
  private left: number[] = [];
  /** Operations failed so far. */
  injected = 0;

  constructor(rules: FaultRule[] = []) {
    this.set(rules);
  }

  set(rules: FaultRule[]): void {
    this.rules = rules;
    this.left = rules.map((r) => r.times ?? Infinity);
  }

  /** The error this operation must fail with, or undefined to let it through. */
  check(path: string, op: FaultOp, offset = 0, length = 0): NodeJS.ErrnoException | undefined {
    const name = basename(path);
    for (let i = 0; i < this.rules.length; i++) {
      const r = this.rules[i]!;
      if (this.left[i]! <= 0 || !name.includes(r.file)) continue;
      if (r.op !== undefined && (Array.isArray(r.op) ? !r.op.includes(op) : r.op !== op)) continue;
      if (op !== 'sync' && (offset + length <= (r.from ?? 0) || offset >= (r.to ?? Infinity))) continue;
      this.left[i]!--;
      this.injected++;
      return injectedError(r.errno ?? 'EIO', op, path, op === 'sync' ? undefined : offset);
    }
    return undefined;
  }
}

/** Delegates to `inner` except where the plan says fail; a failed write writes nothing. */
export class FaultDevice implements BlockDevice {
  constructor(
    readonly inner: BlockDevice,
    readonly path: string,
    private readonly plan: () => FaultPlan,
  ) {}

  get size(): number {
    return this.inner.size;
  }

  read(buf: Buffer, offset: number, background?: boolean): Promise<void> {
    const e = this.plan().check(this.path, 'read', offset, buf.length);
    return e ? Promise.reject(e) : this.inner.read(buf, offset, background);
  }

  write(buf: Buffer, offset: number, background?: boolean): Promise<void> {
    const e = this.plan().check(this.path, 'write', offset, buf.length);
    return e ? Promise.reject(e) : this.inner.write(buf, offset, background);
  }

  sync(): Promise<void> {
    const e = this.plan().check(this.path, 'sync');
    return e ? Promise.reject(e) : this.inner.sync();
  }

  /** Fails where a write or a sync would: an O_DSYNC write reports both kinds of error. */
  writeDurable(buf: Buffer, offset: number): Promise<void> {
    const plan = this.plan();
    const e = plan.check(this.path, 'write', offset, buf.length) ?? plan.check(this.path, 'sync');
    if (e) return Promise.reject(e);
    if (this.inner.writeDurable) return this.inner.writeDurable(buf, offset);
    return this.inner.write(buf, offset).then(() => this.inner.sync());
  }

  punchHole(offset: number, length: number): Promise<void> {
    return this.punchHoles([[offset, length]]);
  }

  punchHoles(ranges: ReadonlyArray<readonly [number, number]>): Promise<void> {
    return this.inner.punchHoles ? this.inner.punchHoles(ranges) : Promise.resolve();
  }

  truncate(size: number): Promise<void> {
    return this.inner.truncate ? this.inner.truncate(size) : Promise.reject(injectedError('EIO', 'write', this.path));
  }

  /** Fails where a write of the range would: a rule with errno ENOSPC models a full disk. */
  allocate(offset: number, length: number): Promise<void> {
    const e = this.plan().check(this.path, 'write', offset, length);
    if (e) return Promise.reject(e);
    return this.inner.allocate ? this.inner.allocate(offset, length) : Promise.reject(injectedError('EIO', 'write', this.path));
  }

  freeBytes(): Promise<number> {
    return this.inner.freeBytes ? this.inner.freeBytes() : Promise.resolve(0);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
