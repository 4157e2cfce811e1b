#!/usr/bin/env python3
"""The loader users would otherwise pick: nanoGPT's get_batch over a numpy memmap of raw
token files, as `millrace bench` runs it next to the daemon (docs/BENCHMARKS.md).

Every step takes ROWS random windows, `ix = randint(len - seq_len - 1, (rows,))` over the
concatenation of the given files (each file contributes its own valid starts, so a window
never crosses a file), and builds x = data[i:i+T] and y = data[i+1:i+1+T] as int64
arrays of shape (rows, seq_len), exactly what nanoGPT's train.py feeds the model.

    scripts/nanogpt-baseline.py --dtype uint16 --seq-len 4096 --rows 8 --steps 1000 \\
        --files a.bin b.bin [--offsets 0 0] [--mode best|rows|nanogpt] [--seed 0] \
        [--rank 0] [--barrier DIR]

Modes:
  best     memmaps opened once, x and y preallocated and filled in place (one
           uint16 -> int64 conversion per window and output): the fastest form of what
           nanoGPT hands its model (int64 x and y on the host).
  rows     the same windows delivered as millrace's compact slots deliver them: one
           preallocated (rows, seq_len + 1) array in the shards' dtype, filled in place,
           with x = rows[:, :-1] and y = rows[:, 1:] as views (the trainer widens on the
           GPU, as it does with millrace). The same bytes per token as millrace, so the
           comparison that charges neither side for a host-side widening.
  nanogpt  nanoGPT's code as written: a new np.memmap per batch (it re-opens the file
           every call to avoid a memmap leak) and np.stack of per-window astype(int64)
           copies for x and for y (torch.stack in nanoGPT; numpy here so no torch is
           needed, same copies).

With --touch (the default) every produced token of x and y is read once more (a sum;
in `rows` mode the array once, x and y being views of it), as the millrace consumers
read every byte of every slot.

With --barrier DIR, each process, once numpy is imported and its memmaps and buffers
are set up, creates DIR/ready-RANK and waits for DIR/go before its first batch, so the
processes start their timed loops together (the parent creates DIR/go once every
process is ready); without it, one process's import time counted as time in which only
the others delivered. It prints one JSON line:
timestamps are CLOCK_MONOTONIC nanoseconds (time.monotonic_ns), comparable with the
parent's clock, plus peak and final RSS from /proc/self/status and process CPU seconds.
"""
import argparse
import json
import os
import resource
import sys
import time

T_START = time.monotonic_ns()


def status_kb(field):
    """A `VmHWM`-style field of /proc/self/status in KiB (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="+", required=True)
    ap.add_argument("--offsets", nargs="*", type=int, default=None,
                    help="byte offset of the tokens in each file (0 for Megatron .bin)")
    ap.add_argument("--dtype", default="uint16")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--mode", choices=["best", "rows", "nanogpt"], default="best")
    ap.add_argument("--barrier", default=None)
    ap.add_argument("--no-touch", action="store_true")
    args = ap.parse_args()
    try:
        import numpy as np
    except ImportError as e:
        print(json.dumps({"error": f"numpy is missing: {e}"}))
        return 3
    t_import = time.monotonic_ns()

    dtype = np.dtype(args.dtype)
    T, B = args.seq_len, args.rows
    offsets = args.offsets or [0] * len(args.files)
    if len(offsets) != len(args.files):
        raise SystemExit("--offsets needs one value per file")
    lens = []
    for path, off in zip(args.files, offsets):
        lens.append((os.path.getsize(path) - off) // dtype.itemsize)
    # Valid window starts per file: i in [0, len - T - 1], as nanoGPT's randint(len - T).
    valid = np.array([max(0, n - T - 1) for n in lens], dtype=np.int64)
    if valid.sum() == 0:
        raise SystemExit("no file holds seq_len + 1 tokens")
    ends = np.cumsum(valid)
    starts = ends - valid
    rng = np.random.default_rng([args.seed, args.rank])

    def windows():
        g = rng.integers(0, int(ends[-1]), size=B)
        f = np.searchsorted(ends, g, side="right")
        return f, g - starts[f]

    if args.mode == "best":
        mms = [np.memmap(p, dtype=dtype, mode="r", offset=o) for p, o in zip(args.files, offsets)]
        x = np.empty((B, T), dtype=np.int64)
        y = np.empty((B, T), dtype=np.int64)

        def get_batch():
            f, ix = windows()
            for r in range(B):
                w = mms[f[r]][ix[r]:ix[r] + T + 1]
                x[r] = w[:-1]
                y[r] = w[1:]
            return x, y
    elif args.mode == "rows":
        mms = [np.memmap(p, dtype=dtype, mode="r", offset=o) for p, o in zip(args.files, offsets)]
        rows = np.empty((B, T + 1), dtype=dtype)

        def get_batch():
            f, ix = windows()
            for r in range(B):
                rows[r] = mms[f[r]][ix[r]:ix[r] + T + 1]
            return rows, None
    else:
        def get_batch():
            f, ix = windows()
            # nanoGPT: "recreate np.memmap every batch to avoid a memory leak"
            opened = {}
            for k in set(f.tolist()):
                opened[k] = np.memmap(args.files[k], dtype=dtype, mode="r", offset=offsets[k])
            xs = np.stack([opened[k][i:i + T].astype(np.int64) for k, i in zip(f, ix)])
            ys = np.stack([opened[k][i + 1:i + 1 + T].astype(np.int64) for k, i in zip(f, ix)])
            return xs, ys

    if args.barrier:
        open(os.path.join(args.barrier, f"ready-{args.rank}"), "w").close()
        go = os.path.join(args.barrier, "go")
        deadline = time.monotonic() + 600
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                print(json.dumps({"error": f"no {go} within 600 s"}))
                return 4
            time.sleep(0.0005)
    touch = not args.no_touch
    checksum = 0
    first = last = 0
    cpu_first = 0.0
    for s in range(args.steps):
        xb, yb = get_batch()
        if touch:
            total = int(xb.sum(dtype=np.int64)) + (0 if yb is None else int(yb.sum()))
            checksum = (checksum + total) & 0x7FFFFFFFFFFFFFFF
        now = time.monotonic_ns()
        if s == 0:
            first = now
            t0 = os.times()
            cpu_first = t0.user + t0.system
        last = now
    secs = (last - first) / 1e9
    tokens = args.steps * B * T
    after_first = (args.steps - 1) * B * T
    t = os.times()
    print(json.dumps({
        "rank": args.rank,
        "mode": args.mode,
        "steps": args.steps,
        "tokens": tokens,
        "start_ns": T_START,
        "import_ns": t_import,
        "first_batch_ns": first,
        "last_batch_ns": last,
        "seconds": secs,
        "tokens_per_s": after_first / secs if secs > 0 else 0.0,
        "cpu_seconds": t.user + t.system,
        "cpu_after_first_batch": t.user + t.system - cpu_first,
        "vmhwm_kb": status_kb("VmHWM"),
        "rss_anon_kb": status_kb("RssAnon"),
        "rss_file_kb": status_kb("RssFile"),
        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
        "checksum": checksum,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
