// Positional file I/O on raw fds (one libuv threadpool hop per call), looping
// over short transfers. Reads past EOF come back as zeros, as a sparse volume would.
import { read, write, fdatasync } from 'node:fs';
import { execFile } from 'node:child_process';

export function preadFull(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      read(fd, buf, done, buf.length - done, position + done, (err, n) => {
        if (err) return reject(Object.assign(err, { offset: position + done }));
        if (n === 0) {
          buf.fill(0, done);
          return resolve();
        }
        done += n;
        if (done < buf.length) step();
        else resolve();
      });
    };
    step();
  });
}

export function pwriteFull(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      write(fd, buf, done, buf.length - done, position + done, (err, n) => {
        if (err) return reject(Object.assign(err, { offset: position + done }));
        done += n;
        if (done < buf.length) step();
        else resolve();
      });
    };
    step();
  });
}

export function datasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/**
 * Node has no fallocate(2); util-linux's fallocate does it for us. Used only for
 * large ranges, where one process spawn is cheap next to writing zeros.
 */
export function fallocate(path: string, mode: 'punch' | 'zero', offset: number, length: number): Promise<void> {
  const args = [mode === 'punch' ? '--punch-hole' : '--zero-range', '--keep-size', '-o', String(offset), '-l', String(length), path];
  return new Promise((resolve, reject) => {
    execFile('fallocate', args, (err, _out, stderr) => {
      if (err) reject(Object.assign(new Error(`fallocate ${mode} failed: ${stderr.trim() || err.message}`), { code: 'ENOTSUP' }));
      else resolve();
    });
  });
}
