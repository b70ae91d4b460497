#!/usr/bin/python3
"""Protocol checks through libnbd's Python binding (python3-libnbd).

Run with Debian's /usr/bin/python3, which has the nbd module:

    libnbd_checks.py --rw nbd://127.0.0.1:PORT/vol0 --ro nbd://127.0.0.1:PORT2/vol0 \
        --size 67108864 [--target cowbd|nbdkit]

--rw must name a fresh (all-zero) writable export of --size bytes, and --ro
a fresh read-only export. Prints one line per check, "ok - NAME" or
"not ok - NAME: DETAIL", and exits 1 if any check failed, so a caller can
assert each line separately.
"""

import argparse
import errno
import os
import sys
import traceback

import nbd

KiB = 1024
MiB = 1024 * KiB

results = []


def check(name):
    """Runs the decorated function now as one named check; an exception fails it."""
    def run(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure becomes a report line
            detail = f"{type(e).__name__}: {e}".replace("\n", " ")
            if not isinstance(e, AssertionError):
                detail += " @ " + traceback.extract_tb(e.__traceback__)[-1].line
            print(f"not ok - {name}: {detail}", flush=True)
            results.append(False)
        else:
            print(f"ok - {name}", flush=True)
            results.append(True)
        return fn
    return run


def expect(cond, detail):
    if not cond:
        raise AssertionError(detail)


def expect_errno(fn, wanted, what):
    """Runs fn, which must fail with an nbd.Error whose errno is in `wanted`.

    nbd.Error.errno is the symbolic name ("EINVAL"); .errnum is the number.
    """
    wanted = wanted if isinstance(wanted, (set, tuple, list)) else {wanted}
    try:
        fn()
    except nbd.Error as e:
        expect(e.errnum in wanted,
               f"{what}: expected {'/'.join(errno.errorcode[w] for w in wanted)}, "
               f"got errno {errno.errorcode.get(e.errnum, e.errnum)} ({e})")
        return
    raise AssertionError(f"{what}: expected {'/'.join(errno.errorcode[w] for w in wanted)}, got success")


def pattern(seed, length):
    """Bytes that differ per seed and per position, so misplaced data shows."""
    unit = bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(4096))
    reps = length // len(unit) + 1
    return (unit * reps)[:length]


def connect(uri, meta=True, strict=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri)
    return h


def relaxed(h, *flags):
    mode = h.get_strict_mode()
    for f in flags:
        mode &= ~f
    h.set_strict_mode(mode)


def extents(h, count, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.append((off, list(entries)))
        return 0

    h.block_status(count, offset, cb, flags)
    expect(len(got) == 1, f"expected one base:allocation reply, got {len(got)}")
    off, entries = got[0]
    expect(off == offset, f"block status answered for offset {off}, asked {offset}")
    pairs = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
    expect(pairs and all(length > 0 for length, _ in pairs), f"empty or zero-length extents: {pairs}")
    return pairs


def state_at(pairs, rel):
    """Flags of the extent covering byte `rel` relative to the queried offset."""
    pos = 0
    for length, flags in pairs:
        if pos <= rel < pos + length:
            return flags
        pos += length
    raise AssertionError(f"no extent covers +{rel} in {pairs}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rw", required=True)
    ap.add_argument("--ro", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--target", default="cowbd")
    args = ap.parse_args()
    size = args.size
    cowbd = args.target == "cowbd"
    # Fixed regions below 64 MiB are used by the checks; the last 32 MiB by the largest request.
    if size < 96 * MiB:
        ap.error("--size must be at least 96 MiB")

    h = connect(args.rw)

    @check("handshake: size, flags, structured replies, base:allocation")
    def _():
        expect(h.get_size() == size, f"size {h.get_size()} != {size}")
        expect(h.get_protocol() == "newstyle-fixed", h.get_protocol())
        expect(h.get_structured_replies_negotiated(), "structured replies not negotiated")
        expect(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
        expect(not h.is_read_only(), "read-write export reports READ_ONLY")
        for name in ("flush", "fua", "trim", "zero", "cache", "multi_conn"):
            expect(getattr(h, "can_" + name)(), f"can_{name} is false")
        if cowbd:
            expect(h.can_fast_zero(), "can_fast_zero is false")

    # 64 requests in flight at once, each to its own 64 KiB slot with its own pattern.
    slots = 64
    slot = 64 * KiB
    base = 8 * MiB

    @check("64 writes in flight")
    def _():
        cookies = []
        bufs = []
        for i in range(slots):
            buf = nbd.Buffer.from_bytearray(pattern(i, slot))
            bufs.append(buf)
            flags = nbd.CMD_FLAG_FUA if i % 8 == 0 else 0
            cookies.append(h.aio_pwrite(buf, base + i * slot, flags=flags))
        expect(h.aio_in_flight() == slots, f"in flight {h.aio_in_flight()}, wanted {slots}")
        pending = set(cookies)
        while pending:
            h.poll(-1)
            pending = {c for c in pending if not h.aio_command_completed(c)}

    @check("64 reads in flight return the written data")
    def _():
        bufs = [nbd.Buffer(slot) for _ in range(slots)]
        # Submitted in reverse order so replies cannot line up with submission by accident.
        cookies = {h.aio_pread(bufs[i], base + i * slot): i for i in reversed(range(slots))}
        expect(h.aio_in_flight() == slots, f"in flight {h.aio_in_flight()}, wanted {slots}")
        pending = set(cookies)
        while pending:
            h.poll(-1)
            pending = {c for c in pending if not h.aio_command_completed(c)}
        for i, buf in enumerate(bufs):
            expect(bytes(buf.to_bytearray()) == pattern(i, slot), f"slot {i} read back wrong data")

    @check("64 mixed reads and writes in flight, unaligned")
    def _():
        off0 = 16 * MiB + 777
        n = 5555
        writes = {}
        reads = {}
        for i in range(slots // 2):
            writes[h.aio_pwrite(nbd.Buffer.from_bytearray(pattern(100 + i, n)), off0 + 2 * i * n)] = i
        for i in range(slots // 2):
            buf = nbd.Buffer(slot)
            reads[h.aio_pread(buf, base + i * slot)] = (i, buf)
        pending = set(writes) | set(reads)
        while pending:
            h.poll(-1)
            pending = {c for c in pending if not h.aio_command_completed(c)}
        for i, buf in reads.values():
            expect(bytes(buf.to_bytearray()) == pattern(i, slot), f"slot {i} read back wrong data")
        for i in range(slots // 2):
            got = h.pread(n, off0 + 2 * i * n)
            expect(got == pattern(100 + i, n), f"unaligned write {i} read back wrong")
            gap = h.pread(n, off0 + (2 * i + 1) * n)
            expect(gap == bytes(n), f"gap after unaligned write {i} is not zero")

    @check("largest advertised request (32 MiB) reads and writes")
    def _():
        big = h.get_block_size(nbd.SIZE_MAXIMUM) if cowbd else 32 * MiB
        expect(big == 32 * MiB, f"maximum block size {big}")
        data = pattern(7, big)
        h.pwrite(data, size - big)
        expect(h.pread(big, size - big) == data, "32 MiB read back wrong")

    # Out of range: libnbd would refuse these itself, so its bounds checks are relaxed.
    @check("read past the end: EINVAL, connection alive")
    def _():
        g = connect(args.rw)
        relaxed(g, nbd.STRICT_BOUNDS)
        expect_errno(lambda: g.pread(4096, size - 2048), errno.EINVAL, "read straddling the end")
        expect_errno(lambda: g.pread(512, size), errno.EINVAL, "read at the end")
        expect_errno(lambda: g.pread(512, size + 1 * MiB), errno.EINVAL, "read beyond the end")
        expect(g.pread(8, base) == pattern(0, 8), "read after the errors returned wrong data")
        g.shutdown()

    @check("write past the end: ENOSPC, connection alive, nothing written")
    def _():
        g = connect(args.rw)
        relaxed(g, nbd.STRICT_BOUNDS)
        before = g.pread(2048, size - 2048)
        expect_errno(lambda: g.pwrite(b"\x5a" * 4096, size - 2048), errno.ENOSPC, "write straddling the end")
        expect_errno(lambda: g.pwrite(b"\x5a" * 512, size + 4096), errno.ENOSPC, "write beyond the end")
        expect(g.pread(2048, size - 2048) == before, "the tail changed after a refused write")
        g.pwrite(b"x", size - 1)
        expect(g.pread(1, size - 1) == b"x", "last byte not writable after the errors")
        g.pwrite(before[-1:], size - 1)
        g.shutdown()

    @check("trim, write zeroes and cache past the end fail, connection alive")
    def _():
        g = connect(args.rw)
        relaxed(g, nbd.STRICT_BOUNDS)
        # The spec: EINVAL for trim beyond the end; ENOSPC for writes, which zeroing is.
        expect_errno(lambda: g.trim(8192, size - 4096), {errno.EINVAL, errno.ENOSPC}, "trim past the end")
        expect_errno(lambda: g.zero(8192, size - 4096), {errno.ENOSPC, errno.EINVAL}, "zero past the end")
        expect_errno(lambda: g.cache(8192, size - 4096), errno.EINVAL, "cache past the end")
        expect(g.pread(8, base) == pattern(0, 8), "read after the errors returned wrong data")
        g.shutdown()

    @check("zero-length requests are answered, connection alive")
    def _():
        g = connect(args.rw)
        relaxed(g, nbd.STRICT_ZERO_SIZE)
        for what, fn in (("read", lambda: g.pread(0, 0)), ("write", lambda: g.pwrite(b"", 0)),
                         ("trim", lambda: g.trim(0, 0)), ("zero", lambda: g.zero(0, 0))):
            try:
                fn()
            except nbd.Error as e:
                # The spec leaves zero-length requests undefined; an error is fine, a hang is not.
                expect(e.errnum in (errno.EINVAL, errno.ENOSPC), f"zero-length {what}: {e}")
        expect(g.pread(8, base) == pattern(0, 8), "read after zero-length requests returned wrong data")
        g.shutdown()

    @check("unknown command flag: EINVAL, connection alive")
    def _():
        g = connect(args.rw)
        relaxed(g, nbd.STRICT_FLAGS)
        # Bit 15 has no meaning; a server must reject what it does not understand.
        expect_errno(lambda: g.pread(512, 0, flags=1 << 15), errno.EINVAL, "read with flag 0x8000")
        expect(g.pread(8, base) == pattern(0, 8), "read afterwards returned wrong data")
        g.shutdown()

    @check("two connections see each other's flushed writes")
    def _():
        a = connect(args.rw)
        b = connect(args.rw)
        off = 20 * MiB
        a.pwrite(pattern(201, 12345), off)
        a.flush()
        expect(b.pread(12345, off) == pattern(201, 12345), "b does not see a's flushed write")
        b.pwrite(pattern(202, 4096), off + 4096, nbd.CMD_FLAG_FUA)
        expected = pattern(201, 12345)
        expected = expected[:4096] + pattern(202, 4096) + expected[8192:]
        expect(a.pread(12345, off) == expected, "a does not see b's FUA write")
        a.shutdown()
        b.shutdown()

    @check("NBD_OPT_INFO answers the same as NBD_OPT_GO")
    def _():
        g = nbd.NBD()
        g.set_opt_mode(True)
        g.set_full_info(True)
        g.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        g.connect_uri(args.rw)
        expect(g.aio_is_negotiating(), "not in option mode")

        def snapshot():
            s = {"size": g.get_size(), "read_only": g.is_read_only(),
                 "canonical": g.get_canonical_export_name()}
            for name in ("flush", "fua", "trim", "zero", "fast_zero", "cache", "multi_conn", "df", "rotational"):
                s[name] = (g.is_rotational() if name == "rotational" else getattr(g, "can_" + name)())
            for name in ("MINIMUM", "PREFERRED", "MAXIMUM"):
                s["block_" + name.lower()] = g.get_block_size(getattr(nbd, "SIZE_" + name))
            try:
                s["description"] = g.get_export_description()
            except nbd.Error:
                s["description"] = None
            return s

        g.opt_info()
        info = snapshot()
        expect(info["size"] == size, f"INFO size {info['size']}")
        if cowbd:
            expect(info["block_minimum"] == 1 and info["block_preferred"] == 4096
                   and info["block_maximum"] == 32 * MiB, f"INFO block sizes {info}")
            expect(info["description"], "INFO gave no description")
        g.opt_go()
        go = snapshot()
        expect(info == go, f"INFO {info} != GO {go}")
        expect(g.pread(8, base) == pattern(0, 8), "read after GO")
        g.shutdown()

    @check("options: LIST, LIST_META_CONTEXT, unknown export, then GO on the same connection")
    def _():
        g = nbd.NBD()
        g.set_opt_mode(True)
        g.connect_uri(args.rw)
        names = []
        g.opt_list(lambda name, desc: names.append((name, desc)))
        want = g.get_export_name()
        expect(any(n == want for n, _ in names), f"{want!r} not in LIST reply {names}")
        if cowbd:
            expect(all(d for _, d in names), f"an export has no description: {names}")
        contexts = []
        g.opt_list_meta_context(lambda ctx: contexts.append(ctx))
        expect(nbd.CONTEXT_BASE_ALLOCATION in contexts, f"LIST_META_CONTEXT gave {contexts}")
        g.set_export_name("no-such-export")
        # libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
        expect_errno(g.opt_info, errno.ENOENT, "INFO for an unknown export")
        expect_errno(g.opt_go, errno.ENOENT, "GO for an unknown export")
        expect(g.aio_is_negotiating(), "server hung up after an unknown export")
        g.set_export_name(want)
        g.opt_go()
        expect(g.get_size() == size, "size after GO")
        g.shutdown()

    @check("structured read of data and of a hole")
    def _():
        chunks = []

        def chunk(buf, offset, status, err):
            chunks.append((offset, len(buf), status, bytes(buf)))
            return 0

        off = base + 3 * slot - 1000
        data = h.pread_structured(2000, off, chunk)
        expect(data == h.pread(2000, off), "structured and simple reads differ")
        expect(data[:1000] == pattern(2, slot)[-1000:] and data[1000:] == pattern(3, 2000)[:1000],
               "structured read returned wrong data")
        expect(sum(c[1] for c in chunks) == 2000, f"chunks do not cover the request: {chunks}")
        hole_off = 40 * MiB
        chunks.clear()
        z = h.pread_structured(1 * MiB, hole_off, chunk)
        expect(z == bytes(1 * MiB), "hole did not read as zeroes")
        expect(sum(c[1] for c in chunks) == 1 * MiB, "hole chunks do not cover the request")

    # Reporting everything as data is always a safe answer, so the hole check is
    # its own line: a failure there is a missed optimisation, not corruption.
    @check("block status: a fresh sparse range is reported as hole+zero")
    def _():
        pairs = extents(h, 1 * MiB, 44 * MiB)
        expect(state_at(pairs, 0) == nbd.STATE_HOLE | nbd.STATE_ZERO, f"fresh range: {pairs}")

    @check("block status: well-formed extents, written range is data, REQ_ONE")
    def _():
        fresh = 44 * MiB
        h.pwrite(pattern(44, 64 * KiB), fresh + 128 * KiB)
        pairs = extents(h, 1 * MiB, fresh)
        expect(state_at(pairs, 128 * KiB) == 0, f"written range not reported as data: {pairs}")
        expect(state_at(pairs, 128 * KiB + 64 * KiB - 1) == 0, f"end of written range: {pairs}")
        one = extents(h, 1 * MiB, fresh, nbd.CMD_FLAG_REQ_ONE)
        expect(len(one) == 1 and one[0][0] <= 1 * MiB, f"REQ_ONE gave {one}")
        at_data = extents(h, 64 * KiB, fresh + 128 * KiB)
        expect(at_data[0][1] == 0, f"status asked at the data: {at_data}")
        whole = extents(h, size, 0)
        expect(sum(length for length, _ in whole) <= size, f"extents run past the end: {whole}")

    @check("write zeroes, with and without NO_HOLE")
    def _():
        off = 48 * MiB
        h.pwrite(pattern(48, 2 * MiB), off)
        h.zero(256 * KiB, off + 1000)
        h.zero(256 * KiB, off + 1 * MiB, nbd.CMD_FLAG_NO_HOLE)
        h.zero(4096, off + 1536 * KiB, nbd.CMD_FLAG_FUA)
        got = h.pread(2 * MiB, off)
        want = bytearray(pattern(48, 2 * MiB))
        want[1000:1000 + 256 * KiB] = bytes(256 * KiB)
        want[1 * MiB:1 * MiB + 256 * KiB] = bytes(256 * KiB)
        want[1536 * KiB:1536 * KiB + 4096] = bytes(4096)
        expect(got == bytes(want), "zeroed ranges or their neighbours read back wrong")
        pairs = extents(h, 256 * KiB, off + 1000)
        expect(all(f == 0 or f & nbd.STATE_ZERO for _, f in pairs), f"zeroed range: {pairs}")

    @check("write zeroes with FAST_ZERO: zeroed or ENOTSUP with data untouched")
    def _():
        off = 52 * MiB
        h.pwrite(pattern(52, 1 * MiB), off)
        if not h.can_fast_zero():
            expect(not cowbd, "cowbd must offer SEND_FAST_ZERO")
            return
        try:
            h.zero(1 * MiB, off, nbd.CMD_FLAG_FAST_ZERO)
        except nbd.Error as e:
            expect(e.errnum == errno.ENOTSUP, f"FAST_ZERO failed with {e.errnum} ({e})")
            expect(h.pread(1 * MiB, off) == pattern(52, 1 * MiB), "a refused FAST_ZERO changed data")
        else:
            expect(h.pread(1 * MiB, off) == bytes(1 * MiB), "FAST_ZERO range is not zero")
        h.pwrite(pattern(53, 64 * KiB), off)
        try:
            h.zero(64 * KiB, off, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        except nbd.Error as e:
            expect(e.errnum == errno.ENOTSUP, f"FAST_ZERO|NO_HOLE failed with {e.errnum} ({e})")
        else:
            expect(h.pread(64 * KiB, off) == bytes(64 * KiB), "FAST_ZERO|NO_HOLE range is not zero")

    @check("trim, then the range is writable again")
    def _():
        off = 56 * MiB
        h.pwrite(pattern(56, 1 * MiB), off)
        h.trim(512 * KiB, off)
        h.trim(4096, off + 768 * KiB, nbd.CMD_FLAG_FUA)
        h.flush()
        # Trimmed content is unspecified by the spec; the untrimmed neighbours are not.
        expect(h.pread(256 * KiB - 4096, off + 512 * KiB) == pattern(56, 1 * MiB)[512 * KiB:768 * KiB - 4096],
               "data after the trimmed range changed")
        h.pwrite(pattern(57, 4096), off)
        expect(h.pread(4096, off) == pattern(57, 4096), "write after trim")

    @check("cache and flush")
    def _():
        h.cache(4 * MiB, 0)
        h.cache(5555, 1234)
        h.flush()
        expect(h.pread(8, base) == pattern(0, 8), "read after cache")

    h.shutdown()

    # A read-only export: the client is told so, and the server refuses on its own too.
    @check("read-only export: flags")
    def _():
        r = connect(args.ro)
        expect(r.is_read_only(), "READ_ONLY not set")
        expect(not r.can_trim() and not r.can_zero(), "trim/zero offered on a read-only export")
        r.shutdown()

    @check("read-only export: libnbd refuses writes itself (EPERM)")
    def _():
        r = connect(args.ro)
        expect_errno(lambda: r.pwrite(b"x" * 512, 0), errno.EPERM, "client-side write")
        r.shutdown()

    @check("read-only export: server refuses write, trim, zero with EPERM, connection alive")
    def _():
        r = connect(args.ro)
        relaxed(r, nbd.STRICT_COMMANDS)
        expect_errno(lambda: r.pwrite(b"x" * 4096, 0), errno.EPERM, "write")
        expect_errno(lambda: r.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA), errno.EPERM, "FUA write")
        expect_errno(lambda: r.trim(4096, 0), errno.EPERM, "trim")
        expect_errno(lambda: r.zero(4096, 0), errno.EPERM, "write zeroes")
        expect(r.pread(16384, 0) == bytes(16384), "data changed after refused writes")
        r.flush()
        r.shutdown()

    failed = results.count(False)
    print(f"# {len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
