#!/usr/bin/env python3
"""Start-up figures for docs/BENCHMARKS.md ("Start in time proportional to shards").

Usage: scripts/start-bench.py CONFIG REPS NAME=BINARY [NAME=BINARY ...]

For each binary, in alternation, REPS times: `millrace serve` spawn to accepting (the
socket polled every 0.5 ms) and to first batch (then `millrace consume --steps 1`),
with the corpus in the page cache and the identity cache written by one start before
(`millrace plan` is not timed: its EOD check reads a page of `.bin` per document); and
the daemon's CPU time (user + system, all threads) at first batch, which a loaded
machine disturbs less than wall time. Prints medians and min-max in ms.
"""
import os
import socket
import statistics
import subprocess
import sys
import time
import tomllib


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
        t_first = time.perf_counter() - t0
        with open(f"/proc/{d.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return t_listen, t_first, cpu
    finally:
        d.terminate()
        d.wait()


def main():
    config, reps, bins = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    bins = [b.split("=", 1) for b in bins]
    with open(config, "rb") as f:
        sock = tomllib.load(f)["serve"]["socket"]
    res = {}
    for _, b in bins:
        serve_time(b, config, sock)  # page the indexes in, write the cache
    for _ in range(reps):
        for name, b in bins:
            r = res.setdefault(name, {"listen": [], "first": [], "cpu": []})
            for k, v in zip(("listen", "first", "cpu"), serve_time(b, config, sock)):
                r[k].append(v)
    for name, r in res.items():
        cells = []
        for k in ("listen", "first", "cpu"):
            v = [x * 1000 for x in r[k]]
            cells.append(f"{k} {statistics.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f})")
        print(f"{name:8} " + " | ".join(cells))


main()
