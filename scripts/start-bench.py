#!/usr/bin/env python3
"""Start-up figures for docs/BENCHMARKS.md ("Start in time proportional to shards").

Usage: scripts/start-bench.py CONFIG REPS NAME=BINARY [NAME=BINARY ...]

For each binary, in alternation, REPS times: `millrace serve` spawn to accepting (the
socket polled every 0.5 ms) and to first batch (then `millrace consume --steps 1`).
(`millrace plan` is not timed: its EOD check reads a page of `.bin` per document.) "warm": corpus files in the page cache; "cold": every
.idx/.bin/.npy of the corpus evicted first with posix_fadvise(DONTNEED) (this corpus
only, not the whole page cache). Prints medians and min-max in ms.
"""
import os
import socket
import statistics
import subprocess
import sys
import time
import tomllib


def evict(root):
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith((".idx", ".bin", ".npy")):
                fd = os.open(os.path.join(d, f), os.O_RDONLY)
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def serve_time(binary, config, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    t0 = time.perf_counter()
    d = subprocess.Popen([binary, "serve", "--config", config],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
                break
            except OSError:
                if d.poll() is not None:
                    raise SystemExit(f"{binary} serve exited")
                time.sleep(0.0005)
        t_listen = time.perf_counter() - t0
        subprocess.run([binary, "consume", "--config", config, "--socket", sock,
                        "--dp-rank", "0", "--dp-size", "1", "--steps", "1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return t_listen, time.perf_counter() - t0
    finally:
        d.terminate()
        d.wait()


def main():
    config, reps, bins = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    bins = [b.split("=", 1) for b in bins]
    with open(config, "rb") as f:
        sock = tomllib.load(f)["serve"]["socket"]
    root = os.path.dirname(os.path.abspath(config))
    res = {}
    for mode in ("warm", "cold"):
        if mode == "warm":
            for _, b in bins:
                serve_time(b, config, sock)  # page the indexes in, write the cache
        for _ in range(reps):
            for name, b in bins:
                r = res.setdefault((mode, name), {"listen": [], "first": []})
                if mode == "cold":
                    evict(root)
                listen, first = serve_time(b, config, sock)
                r["listen"].append(listen)
                r["first"].append(first)
    for (mode, name), r in res.items():
        cells = []
        for k in ("listen", "first"):
            v = [x * 1000 for x in r[k]]
            cells.append(f"{k} {statistics.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f})")
        print(f"{mode:5} {name:8} " + " | ".join(cells))


main()
