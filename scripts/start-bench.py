#!/usr/bin/env python3
"""Start-up figures for docs/BENCHMARKS.md ("Start in time proportional to shards").

Usage: scripts/start-bench.py [--cold] CONFIG REPS NAME=BINARY[@CONFIG] [...]

For each binary, in alternation, REPS times: `millrace serve` spawn to accepting (the
socket polled every 0.5 ms) and to first batch (then `millrace consume --steps 1`); the
daemon's CPU time (user + system, all threads) at first batch, which a loaded machine
disturbs less than wall time; and its RssAnon (/proc/PID/status) at first batch: the
memory a start holds that is not page cache. `@CONFIG` gives one binary a config of
its own (its own `cache_dir` and socket), so that two builds never share cache entries.
Before the timed runs each binary starts once, which writes its identity cache and pages
the indexes in (`millrace plan` is not timed: its EOD check reads a page of `.bin` per
document). Prints medians and min-max.

`--cold` evicts, before every start, the page cache of every file under the config's
directory (the corpus `synth` writes there), of the `cache_dir` and of the binary, with
posix_fadvise(DONTNEED) per file: a cold start without a machine-wide drop_caches,
which would hit everyone else on a shared machine. It checks that the eviction took
(mincore through a mapping of the first index) and says so when it did not.
"""
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
import tomllib


def load(config):
    with open(config, "rb") as f:
        t = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(config))
    cache = t.get("corpus", {}).get("cache_dir")
    cache = os.path.join(base, cache) if cache else None
    return t["serve"]["socket"], base, cache


def files_under(*roots):
    for root in roots:
        if root is None or not os.path.exists(root):
            continue
        if os.path.isfile(root):
            yield root
            continue
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    yield p


def evict(paths):
    """posix_fadvise(DONTNEED) on each file; returns the number of files evicted."""
    n = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def resident_pages(path):
    """Pages of `path` in the page cache (mincore through a fresh mapping), or None."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    if size == 0:
        return 0
    vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        a = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if a is None or a == ctypes.c_void_p(-1).value:
        return None
    try:
        if libc.mincore(ctypes.c_void_p(a), ctypes.c_size_t(size), vec) != 0:
            return None
        return sum(b & 1 for b in vec)
    finally:
        libc.munmap(ctypes.c_void_p(a), ctypes.c_size_t(size))


def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


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
        anon = rss_anon_kib(d.pid)
        with open(f"/proc/{d.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return t_listen, t_first, cpu, anon
    finally:
        d.terminate()
        d.wait()


def main():
    args = sys.argv[1:]
    cold = "--cold" in args
    args = [a for a in args if a != "--cold"]
    config, reps, bins = args[0], int(args[1]), args[2:]
    runs = []
    for spec in bins:
        name, rest = spec.split("=", 1)
        binary, _, cfg = rest.partition("@")
        cfg = cfg or config
        runs.append((name, binary, cfg, load(cfg)))
    for _, b, cfg, (sock, _, _) in runs:
        serve_time(b, cfg, sock)  # page the indexes in, write the cache
    res = {}
    for _ in range(reps):
        for name, b, cfg, (sock, base, cache) in runs:
            if cold:
                evict(files_under(base, cache, b))
                probe = next((p for p in files_under(base) if p.endswith(".idx")), None)
                left = resident_pages(probe) if probe else None
                if left:
                    print(f"warning: {probe}: {left} pages still cached after DONTNEED")
            r = res.setdefault(name, {"listen": [], "first": [], "cpu": [], "anon": []})
            for k, v in zip(("listen", "first", "cpu", "anon"), serve_time(b, cfg, sock)):
                r[k].append(v)
    for name, r in res.items():
        cells = []
        for k in ("listen", "first", "cpu"):
            v = [x * 1000 for x in r[k]]
            cells.append(f"{k} {statistics.median(v):.0f} ms ({min(v):.0f}-{max(v):.0f})")
        a = [x / 1024 for x in r["anon"]]
        cells.append(f"RssAnon {statistics.median(a):.1f} MiB ({min(a):.1f}-{max(a):.1f})")
        print(f"{name:8} " + " | ".join(cells) + (" | cold" if cold else ""))


main()
