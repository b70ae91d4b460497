// Accepted sockets re-wrapped so that reads land in memory the connection picks
// (net.Socket's `onread` option, which net.Server cannot pass for accepted sockets).
//
// Why: a plain socket allocates a fresh 64 KiB buffer for every read. On a
// stream of 1 MiB writes that is 16 allocations per request, and the external
// memory they add drove V8 into back-to-back major GCs (a quarter of the CPU in
// a perf profile). With user buffers, a write payload is read straight into its
// pooled buffer and headers go through one reused staging buffer: no per-read
// allocation and one copy fewer.
import { Socket } from 'node:net';

export interface ReadTarget {
  /** Where the next read should land. */
  nextReadBuffer(): Uint8Array;
  /** n bytes arrived at the start of buf, which must not be kept after return. */
  onRead(n: number, buf: Uint8Array): void;
}

interface HandleOwner {
  _handle?: { readStart?: unknown } | null;
}

/**
 * Moves the handle of a socket accepted with pauseOnConnect into a new Socket
 * reading through `target`. Returns undefined (and leaves the socket as it was)
 * when this Node's sockets do not look as expected, so callers fall back.
 */
export function adoptSocket(accepted: Socket, target: () => ReadTarget | undefined, fallback: Buffer): Socket | undefined {
  const owner = accepted as unknown as HandleOwner;
  const handle = owner._handle;
  if (!handle || typeof handle.readStart !== 'function') return undefined;
  owner._handle = null;
  // With no handle, destroy only settles the old object (and the listener's count).
  accepted.destroy();
  // The callback may not keep buf: the connection copies what it does not consume.
  const options = {
    handle,
    readable: true,
    writable: true,
    allowHalfOpen: true,
    onread: {
      buffer: () => target()?.nextReadBuffer() ?? fallback,
      callback: (n: number, buf: Uint8Array) => {
        target()?.onRead(n, buf);
      },
    },
  };
  return new Socket(options as ConstructorParameters<typeof Socket>[0]);
}
