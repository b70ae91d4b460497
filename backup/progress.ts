// Progress of a long backup or restore: a live bar on a terminal (cli-progress), one
// JSON line a second with --json, nothing otherwise; the final summary is the caller's.
import { SingleBar } from 'cli-progress';

export interface ProgressFigures {
  /** Bytes of the volume accounted for: read, or known unchanged or zero without reading. */
  done: number;
  total: number;
  /** Bytes read from the snapshot (or the repository, for a restore). */
  read: number;
  /** Bytes of chunks the repository did not have, and of chunks it had. */
  newBytes: number;
  dedupBytes: number;
}

export interface Progress {
  update(f: ProgressFigures): void;
  stop(): void;
}

function mib(n: number): string {
  return n >= 10 * 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : `${(n / 2 ** 20).toFixed(1)} MiB`;
}

export function progress(mode: 'bar' | 'json' | 'none', label: string, out: NodeJS.WriteStream = process.stderr): Progress {
  const started = Date.now();
  let last: ProgressFigures | undefined;
  const rate = (f: ProgressFigures) => f.done / Math.max(0.001, (Date.now() - started) / 1000);
  if (mode === 'none') return { update: () => undefined, stop: () => undefined };
  if (mode === 'json') {
    const emit = () => {
      if (!last) return;
      const r = rate(last);
      const eta = r > 0 ? (last.total - last.done) / r : null;
      process.stdout.write(
        `${JSON.stringify({ type: 'progress', what: label, ...last, bytesPerSecond: Math.round(r), etaSeconds: eta === null ? null : Math.round(eta) })}\n`,
      );
    };
    const timer = setInterval(emit, 1000);
    timer.unref();
    return {
      update: (f) => {
        last = { ...f };
      },
      stop: () => clearInterval(timer),
    };
  }
  const bar = new SingleBar(
    {
      stream: out,
      format: `${label} [{bar}] {percentage}% | {doneText} of {totalText} | {rateText}/s | ETA {eta_formatted} | new {newText}, dedup {dedupText}`,
      hideCursor: true,
      etaBuffer: 50,
      fps: 5,
    },
    { format: '', barCompleteChar: '#', barIncompleteChar: '.' },
  );
  let startedBar = false;
  return {
    update: (f) => {
      const payload = {
        doneText: mib(f.done),
        totalText: mib(f.total),
        rateText: mib(rate(f)),
        newText: mib(f.newBytes),
        dedupText: mib(f.dedupBytes),
      };
      if (!startedBar) {
        bar.start(f.total, f.done, payload);
        startedBar = true;
      } else bar.update(f.done, payload);
    },
    stop: () => {
      if (startedBar) bar.stop();
    },
  };
}
