"""Chaos: one daemon, well-behaved ranks of one job, and around them, in an order drawn
from a seed, processes and events that misbehave. The brief's promise: nothing is lost
and nothing panics; a daemon keeps serving the clients that behave.

The corpus is written with numpy (two Megatron domains, one raw-array domain, and a
fourth Megatron domain of weight 0 that nothing reads); slots are compact. Job `main`
has two dp ranks: rank 0 is a TP pair (two peers of one ring) of Python clients, each
in its own process (serve_worker.py), paced so that the events land mid-run, killed
together with SIGKILL and restarted, each from the cursor of its own last whole record
(they may be a step apart: the ring is rebuilt from their blobs); rank 1 is `millrace
consume`, run in two parts, the second resumed from the first one's saved cursor after
the chaos. Around them: `ctl set-weights` and `set-stage` (`--late next`: they land at
whatever step is still changeable, and the reply says which) and a refused
`set-weights`; SIGHUP with the config unchanged and with a broken config (the old one
must stay); the daemon killed and restarted; a second job that comes and goes; clients
that hold a ring and never read, close their fds at once, fill their eventfd and make it
blocking, or release a step never published (by frame or page); garbage, half a HELLO, a
HELLO of protocol 1, an HTTP request, a frame of 4 GiB, a HELLO on a control connection,
a third peer of rank 0 and a rank of `main` with another dp_size; the unused domain's
shard truncated.

Checked afterwards: the daemon is alive and never panicked; every well-behaved stream
(rank 0 across its kills, consume's two parts, the second job) equals `millrace
explain` byte for byte under a config that writes the accepted live changes as
schedule points and `[[plan.stage]]`s; each broken reload was refused, naming the file;
the daemon's fds and RSS are back near their level before the chaos.

CI runs a fixed seed in well under a minute. MILLRACE_CHAOS_LONG=1 runs more steps and
every event several times; MILLRACE_CHAOS_SEED=N draws another order.

Separately: a ring whose shard is truncated under it stops with a clear error, and a
late joiner of that ring (a TP peer that connects after the failure) gets the error
promptly instead of waiting for a ring that will never publish.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serve_helpers import (Daemon, IndexedShard, Worker, count_flat, explain, frame,
                           import_path_for_package, read_flat, read_frame, wait_until)
from writers import write_megatron, write_raw

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

LONG = bool(os.environ.get("MILLRACE_CHAOS_LONG"))
SEED = int(os.environ.get("MILLRACE_CHAOS_SEED", "1"))
STEPS = 400 if LONG else 40
PACE = 0.02 if LONG else 0.08  # seconds per step of rank 0: the events land mid-run
REPEAT = 6 if LONG else 1  # how often each event happens
FIRST_PART = 6  # consume's steps before the chaos
SIDE_STEPS = 12  # the second job's
DOMAINS = ("web", "code", "books", "spare")
EOS, PAD = 1, 0
W0 = {"web": 0.5, "code": 0.3, "books": 0.2, "spare": 0.0}
W1 = {"web": 0.2, "code": 0.5, "books": 0.3, "spare": 0.0}
W2 = {"web": 0.6, "code": 0.1, "books": 0.3, "spare": 0.0}
ROWS0, SEQ0, ROWS1, SEQ1 = 8, 64, 4, 128
BOOKS_FORMAT = f'format = "raw"\nraw = {{ dtype = "uint16", eos = {EOS} }}'
HELLO, WELCOME, REFUSED, RELEASE, ERROR, CONTROL, CONTROL_REPLY = 1, 2, 3, 4, 5, 7, 8


def write_corpus(d: Path, seed: int):
    """The four domains; returns the raw domain's documents (each ending in EOS)."""
    rng = np.random.default_rng(seed)
    for name, n in (("web", 160), ("code", 120), ("spare", 50)):
        lens = rng.integers(1, 60, n)
        lens[::17] = rng.integers(70, 300, len(lens[::17]))
        write_megatron(d / name, [rng.integers(3, 30000, int(k)).astype(np.uint16)
                                  for k in lens], np.uint16)
    books = [np.append(rng.integers(3, 30000, int(k)), EOS).astype(np.uint16)
             for k in rng.integers(1, 90, 80)]
    write_raw(d / "books.bin", np.concatenate(books), np.uint16)
    return books


def config_text(changes=(), seed=SEED) -> str:
    """The run's config; with `changes` ((step, weights) or (step, "stage")), the accepted
    live changes written as schedule points and stages: the config the reference
    `explain` reads."""
    def w(ws):
        return "{ " + ", ".join(f"{k} = {v}" for k, v in ws.items()) + " }"

    schedule = f"[[plan.schedule]]\nstep = 0\nweights = {w(W0)}\n"
    stage = ""
    # A change from step A replaces the curve (or the stages) from A on: earlier changes
    # of its kind at or after A are dropped (src/plan/journal.rs). After a daemon restart
    # a change may land below one accepted before it.
    kept = []
    for step, what in changes:
        kept = [(a, x) for a, x in kept if a < step or (x == "stage") != (what == "stage")]
        kept.append((step, what))
    for step, what in sorted(kept, key=lambda c: c[0]):
        if what != "stage":
            schedule += (f"\n[[plan.schedule]]\nstep = {step}\nramp = false\n"
                         f"weights = {w(what)}\n")
        else:
            stage += (f"\n[[plan.stage]]\nstep = {step}\nseq_len = {SEQ1}\n"
                      f"global_batch_rows = {ROWS1}\n")
    domains = "".join(f'[[corpus.domain]]\nname = "{n}"\nshards = ["{f}"]\n{more}\n'
                      for n, f, more in (("web", "web", ""), ("code", "code", ""),
                                         ("books", "books.bin", BOOKS_FORMAT),
                                         ("spare", "spare", "")))
    plan = {"seed": seed, "seq_len": SEQ0, "global_batch_rows": ROWS0,
            "packing": '"best_fit"', "best_fit_window": 16, "pad_token": PAD}
    return f"""
[corpus]
{domains}
[plan]
{chr(10).join(f"{k} = {v}" for k, v in plan.items())}
{schedule}
{stage}
[serve]
socket = "unused.sock"
ring_slots = 4
stage_reserve_tokens = {ROWS1 * (SEQ1 + 1)}
handshake_timeout_ms = 1500
watch_config = false
"""


class Reference:
    """Expected full rows, position ids and domains of a step range of one rank, from
    `explain` and the shards read with numpy (none of millrace's reading code)."""

    def __init__(self, millrace, config: Path, books):
        self.millrace, self.config = millrace, config
        self.shards = {n: IndexedShard(config.parent / n) for n in ("web", "code", "spare")}
        self.books = books

    def doc(self, shard: str, doc: int) -> np.ndarray:
        if shard.endswith("books.bin"):
            return self.books[doc].astype(np.int64)
        return self.shards[Path(shard).name].doc(doc).astype(np.int64)

    def steps(self, start: int, count: int, rank: int, size: int):
        """Per step (step, rows [rows, seq+1], position_ids [rows, seq], domains)."""
        out = []
        for s in explain(self.millrace, self.config, start, count, rank, size):
            seq = s["seq_len"]
            rows, pos, dom = [], [], []
            for row in s["rows"]:
                parts, p = [], []
                for g in row["segments"]:
                    parts.append(self.doc(g["shard"], g["doc"])[g["start"]:g["end"]])
                    p += list(range(g["end"] - g["start"]))
                pad = seq + 1 - sum(len(x) for x in parts)
                rows.append(np.concatenate(parts + [np.full(pad, PAD, np.int64)]))
                pos.append(np.array(p + list(range(pad)))[:seq])
                dom.append(DOMAINS.index(row["domain"]))
            out.append((s["step"], np.array(rows), np.array(pos), np.array(dom)))
        return out


def assert_flat_equal(recs, want, what):
    """Worker records (serve_helpers.flat_dtype) equal the reference, step by step."""
    assert [int(r["step"]) for r in recs] == [w[0] for w in want], \
        f"{what}: steps {[int(r['step']) for r in recs]}"
    for r, (step, rows, pos, dom) in zip(recs, want):
        n, seq = rows.shape[0], rows.shape[1] - 1
        assert (int(r["rows"]), int(r["seq_len"])) == (n, seq), (what, step)
        got = r["tokens"][: rows.size].reshape(rows.shape)
        assert np.array_equal(got, rows), f"{what}: step {step} tokens differ"
        assert np.array_equal(r["position_ids"][: n * seq].reshape(n, seq), pos), \
            f"{what}: step {step} position_ids differ"
        assert np.array_equal(r["domain"][:n], dom), f"{what}: step {step} domains differ"


def xxh3_64(data: bytes):
    """XXH3-64 (seed 0) through the system's libxxhash, or None where it is missing."""
    try:
        lib = ctypes.CDLL("libxxhash.so.0")
    except OSError:
        return None
    lib.XXH3_64bits.restype = ctypes.c_uint64
    lib.XXH3_64bits.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
    return f"{lib.XXH3_64bits(data, len(data)):016x}"


def check_consume(summary: dict, want, what: str):
    """consume's summary against the reference: steps, the wrapping sum of the inputs,
    real tokens per domain, and (with libxxhash) the digest of the compact rows."""
    assert (summary["first_step"], summary["steps"]) == (want[0][0], len(want)), what
    checksum, real = 0, dict.fromkeys(DOMAINS, 0)
    blob = b""
    for _step, rows, _pos, dom in want:
        checksum += int(rows[:, :-1].sum())
        for r, d in enumerate(dom):
            real[DOMAINS[d]] += int(np.count_nonzero(rows[r] != PAD))
        blob += rows.astype("<u2").tobytes()
    assert summary["checksum"] == checksum, what
    assert {k: v for k, v in summary["domain_tokens"].items() if v} == \
        {k: v for k, v in real.items() if v}, what
    digest = xxh3_64(blob)
    if digest is not None:
        assert summary["digest"] == digest, f"{what}: digest of the rows differs"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def status(sock) -> dict:
    with mr.Control(sock) as c:
        return c.status()


def rank0_joined(sock) -> bool:
    """Whether both TP peers of job main's rank 0 are joined to its ring: after a kill or
    a daemon restart they reconnect a while, and a client of job main that arrives first
    (a wrong dp_size, a third peer) would make the job itself, so that the real ranks
    are refused instead of it."""
    for job in status(sock).get("jobs", []):
        if job.get("job") == "main":
            return any(r.get("dp_rank") == 0 and len(r.get("peers", [])) == 2
                       for r in job.get("rings", []))
    return False


def hello(**kw) -> bytes:
    h = {"protocol": 2, "job": "x", "dp_rank": 0, "dp_size": 1, "stages": True}
    h.update(kw)
    return frame(HELLO, json.dumps(h).encode())


class Chaos:
    """The misbehaving side: every event, and what it leaves open until the end."""

    def __init__(self, millrace, tmp, d, sock, rng):
        self.millrace, self.tmp, self.d, self.sock, self.rng = millrace, tmp, d, sock, rng
        self.held = []  # sockets kept open (and closed) at the end
        self.refusals = []  # (what, code) of the frames the daemon answered with
        self.changes = []  # (applied step, weights or "stage") of the accepted changes
        self.sides = []
        self.n = 0

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.sock))
        return s

    def answer(self, s, what, timeout=10.0):
        """The daemon's answer to a bad first frame: REFUSED or ERROR, then EOF."""
        f = read_frame(s, timeout)
        assert f is not None and f[0] in (REFUSED, ERROR), (what, f)
        code = json.loads(f[1])["code"]
        self.refusals.append((what, code))
        s.close()
        return code

    def ctl(self, *args):
        proc = self.millrace.run("ctl", "--socket", self.sock, *args, "--late", "next",
                                 "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    # -- the events ----------------------------------------------------------------------

    def garbage(self):
        s = self.connect()
        s.sendall(self.rng.randbytes(self.rng.randint(1, 300)))
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.held.append(s)  # its answer (or none, for a short frame) is not awaited

    def half_hello(self):
        s = self.connect()
        whole = hello(job="half")
        s.sendall(whole[: self.rng.randint(1, len(whole) - 1)])
        self.held.append(s)  # left open: the handshake timeout closes it

    def old_protocol(self):
        s = self.connect()
        s.sendall(hello(protocol=1, job="old"))
        assert self.answer(s, "protocol 1") == "protocol"

    def http(self):
        s = self.connect()
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.answer(s, "http")

    def idle(self):
        """A client that takes a ring and never reads anything, WELCOME included."""
        self.n += 1
        s = self.connect()
        s.sendall(hello(job=f"idle{self.n}"))
        self.held.append(s)

    def close_fds(self):
        """A client that closes its ring and eventfd (and page) at once and stays."""
        self.n += 1
        s = self.connect()
        s.sendall(hello(job=f"rude{self.n}", release_page=True))
        f = read_frame(s, 30.0, fds=3)
        assert f is not None and f[0] == WELCOME, f
        for fd in f[2]:
            os.close(fd)
        self.held.append(s)

    def huge_frame(self):
        s = self.connect()
        s.sendall(struct.pack("<IB", 0xFFFFFFFF, HELLO) + b"{")
        assert self.answer(s, "huge frame") == "protocol"

    def bad_release(self):
        """A client of its own ring that releases a step never published."""
        self.n += 1
        s = self.connect()
        s.sendall(hello(job=f"rel{self.n}"))
        f = read_frame(s, 30.0, fds=3)
        assert f is not None and f[0] == WELCOME, f
        for fd in f[2]:
            os.close(fd)
        s.sendall(frame(RELEASE, struct.pack("<Q", 1 << 40)))
        assert self.answer(s, "release past published") == "protocol"

    def bad_page(self):
        """A client that writes a release its ring never published into its page."""
        self.n += 1
        s = self.connect()
        s.sendall(hello(job=f"page{self.n}", release_page=True))
        f = read_frame(s, 30.0, fds=3)
        assert f is not None and f[0] == WELCOME and len(f[2]) == 3, f
        page = mmap.mmap(f[2][2], 4096, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for fd in f[2]:
            os.close(fd)
        struct.pack_into("<Q", page, 0, 1 << 40)
        page.close()
        try:
            s.sendall(frame(RELEASE, struct.pack("<Q", 1)))  # the wake-up
        except (BrokenPipeError, ConnectionResetError):
            pass  # a claim read the page first: the ERROR is already sent, the socket shut
        assert self.answer(s, "page past published") == "protocol"

    def extra_peer(self):
        """A third peer of the well-behaved job's rank 0, which announced two."""
        s = self.connect()
        s.sendall(hello(job="main", dp_size=2, replica="evil", replicas=3))
        assert self.answer(s, "extra peer") == "replicas"

    def wrong_dp_size(self):
        """A rank of the well-behaved job that disagrees about its dp_size."""
        s = self.connect()
        s.sendall(hello(job="main", dp_size=4, dp_rank=3))
        assert self.answer(s, "wrong dp_size") == "dp_size"

    def control_then_hello(self):
        """A control connection that then sends a HELLO."""
        s = self.connect()
        s.sendall(frame(CONTROL, json.dumps({"protocol": 1, "op": "status"}).encode()))
        f = read_frame(s, 30.0)
        assert f is not None and f[0] == CONTROL_REPLY, f
        s.sendall(hello(job="sneak"))
        self.answer(s, "hello on a control connection")

    def bad_weights(self):
        """A live change the daemon must refuse whole, changing nothing."""
        proc = self.millrace.run("ctl", "--socket", self.sock, "set-weights", "web=0.5",
                                 "nosuch=0.5", "--late", "next")
        assert proc.returncode != 0 and "nosuch" in proc.stderr, proc.stderr

    def full_eventfd(self):
        """A client that makes its eventfd blocking, fills its counter, and releases what
        is published so that the daemon publishes (and signals) again."""
        self.n += 1
        s = self.connect()
        s.sendall(hello(job=f"full{self.n}"))
        f = read_frame(s, 30.0, fds=3)
        assert f is not None and f[0] == WELCOME, f
        ring_fd, ready = f[2][:2]
        # Full: the counter at its most (2^64 - 2), set while non-blocking (a write that
        # would pass it fails with EAGAIN instead of waiting), then made blocking.
        while True:
            try:
                os.read(ready, 8)
            except BlockingIOError:
                pass
            try:
                os.write(ready, struct.pack("<Q", (1 << 64) - 2))
                break
            except BlockingIOError:
                continue
        os.set_blocking(ready, True)
        ring = mmap.mmap(ring_fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        for fd in f[2]:
            os.close(fd)
        released = 0
        for _ in range(3):
            published = struct.unpack_from("<Q", ring, 64)[0]
            if published > released:
                s.sendall(frame(RELEASE, struct.pack("<Q", published)))
                released = published
            time.sleep(0.02)
        ring.close()
        self.held.append(s)

    def set_weights(self):
        ws = (W1, W2)[len(self.changes) % 2]
        reply = self.ctl("set-weights", *[f"{k}={v}" for k, v in ws.items()],
                         "--at-step", "0")
        self.changes.append((reply["applied_step"], ws))

    def set_stage(self):
        reply = self.ctl("set-stage", "--seq-len", str(SEQ1), "--global-batch-rows",
                         str(ROWS1), "--at-step", "0")
        self.changes.append((reply["applied_step"], "stage"))

    def hup_same(self, daemon):
        """SIGHUP with the file unchanged: answered (counted by source), not refused."""
        def hups(st):
            return (st["reloads_by_source"].get("sighup", 0)
                    + st["failed_reloads_by_source"].get("sighup", 0))

        before = status(self.sock)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: hups(status(self.sock)) > hups(before), 20, "the SIGHUP reload")
        assert status(self.sock)["failed_reloads"] == before["failed_reloads"]

    def hup_broken(self, daemon, config: Path):
        before = status(self.sock)["failed_reloads"]
        good = config.read_text()
        tmp = config.with_suffix(".tmp")
        tmp.write_text(good.replace("[plan]", "[plan\nseed = ", 1))
        os.replace(tmp, config)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: status(self.sock)["failed_reloads"] > before, 20,
                   "the broken reload to be refused and counted")
        tmp.write_text(good)
        os.replace(tmp, config)

    def side_job(self):
        self.n += 1
        w = Worker(self.tmp, f"side{self.n}", socket=str(self.sock), dp_rank=0, dp_size=1,
                   job=f"side{self.n}", until=SIDE_STEPS, flat=True, reconnect_timeout=30,
                   connect_timeout=30)
        self.sides.append(w.start())

    def truncate_unused(self):
        p = self.d / "spare.bin"
        os.truncate(p, os.path.getsize(p) // 2)

    def close(self):
        for s in self.held:
            s.close()


def test_chaos_keeps_serving_the_clients_that_behave(tmp_path, short_dir, millrace):
    d = tmp_path / "c"
    d.mkdir()
    books = write_corpus(d, SEED)
    config = d / "run.toml"
    config.write_text(config_text())
    sock = short_dir / "m.sock"
    daemon = Daemon(millrace.path, config, sock, tmp_path / "daemon.log").start()
    rng = random.Random(SEED)
    chaos = Chaos(millrace, tmp_path, d, sock, rng)
    try:
        # Warm up (the first client maps the shards and starts the threads), then the
        # level the daemon must come back to.
        warm = Worker(tmp_path, "warm", socket=str(sock), dp_rank=0, dp_size=1, job="warm",
                      until=8, flat=True, reconnect_timeout=0).start()
        warm.wait(60)
        wait_until(lambda: status(sock)["clients"] == 0, 20, "the warm-up client to leave")
        fds0, rss0 = daemon.steady_fd_count(), rss_kib(daemon.pid)

        # consume, rank 1, first part.
        cur = tmp_path / "consume.cursor"
        first = subprocess.run(
            [str(millrace.path), "consume", "--socket", str(sock), "--dp-rank", "1",
             "--dp-size", "2", "--job", "main", "--steps", str(FIRST_PART), "--json",
             "--save-cursor", str(cur)], capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr

        # Rank 0 is a TP pair: two peers read one ring.
        rank0 = [Worker(tmp_path, f"rank0-{r}", socket=str(sock), dp_rank=0, dp_size=2,
                        job="main", replica=r, replicas=2, until=STEPS, flat=True, pace=PACE,
                        reconnect_timeout=30, connect_timeout=30).start()
                  for r in ("tp0", "tp1")]
        events = ["kill", "idle", "garbage", "half_hello", "old_protocol", "http",
                  "close_fds", "set_weights", "set_stage", "hup_same", "hup_broken",
                  "side_job", "truncate_unused", "huge_frame", "bad_release", "extra_peer",
                  "control_then_hello", "bad_weights", "daemon_restart", "full_eventfd",
                  "wrong_dp_size", "bad_page"]
        order = [e for e in events for _ in range(REPEAT)]
        rng.shuffle(order)
        # Each event fires once rank 0 has recorded its share of the run; the last ones
        # leave room for the live changes to land before STEPS.
        at = np.linspace(2, STEPS - 14, len(order)).astype(int)
        for step, event in zip(at, order):
            wait_until(lambda: min(count_flat(w.out) for w in rank0) >= step, 120,
                       f"rank 0 to reach step {step} (before {event}):\n"
                       f"{rank0[0].stderr()}\n{rank0[1].stderr()}")
            assert daemon.alive(), daemon.log_tail()
            if event == "kill":
                # A TP group dies together (its peers block in collectives without each
                # other; a lone peer would read on, docs/PROTOCOL.md section 5) and
                # restarts, each peer from the cursor of its own last whole record.
                for w in rng.sample(rank0, 2):
                    w.kill()
                for w in rng.sample(rank0, 2):
                    w.start(resume=True)
            elif event == "daemon_restart":
                # The daemon dies (SIGKILL) and comes back with the file's config: the
                # ranks reconnect with their blobs, which bring it the live changes. A
                # second job served by the new daemon before them would have it refuse
                # those blobs for good (one journal per daemon: docs/OPERATIONS.md,
                # "Limits of live changes"), so the second jobs finish first.
                for w in chaos.sides:
                    w.wait(60)
                # The daemon keeps its journal in memory, and a restarted one learns it
                # from the blobs its clients bring: only a blob of a step past a change's
                # applied step is sure to carry it (docs/OPERATIONS.md, "Changes,
                # checkpoints and restarts"). Killed before rank 0 read one, the daemon
                # comes back without the change, as documented, and an operator
                # re-issues it (seeds 206 and 223: a set-stage 30-50 ms before the kill,
                # then steps at the old shape). The reference holds every accepted
                # change, so the kill waits for rank 0's blobs to carry them; and where
                # rank 0 has no step left to carry them in (or has left), the restart
                # is left out.
                carried = max((a + 2 for a, _ in chaos.changes), default=0)
                if carried >= STEPS or all(w.proc.poll() is not None for w in rank0):
                    continue
                wait_until(lambda: min(count_flat(w.out) for w in rank0) >= carried, 120,
                           f"rank 0 to read step {carried - 1}, past the last accepted "
                           "change, before the daemon restart")
                daemon.kill()
                write_corpus(d, SEED)  # the operator restores a truncated shard first
                daemon.start()
                # Two more steps, unless rank 0 has read its last step meanwhile (the
                # events before took long on a loaded machine): then it has nothing left
                # to resume, and waiting for step STEPS + 1 timed out (seed 130).
                want = min(min(count_flat(w.out) for w in rank0) + 2, STEPS)
                wait_until(lambda: min(count_flat(w.out) for w in rank0) >= want, 120,
                           "rank 0 to resume on the restarted daemon")
            elif event in ("hup_same",):
                chaos.hup_same(daemon)
            elif event == "hup_broken":
                chaos.hup_broken(daemon, config)
            elif event in ("extra_peer", "wrong_dp_size") and all(
                    w.proc.poll() is not None for w in rank0):
                # Rank 0 has read its last step and left (a restart above may have waited
                # for that long): job main has no ring left to refuse them by.
                pass
            else:
                getattr(chaos, event)()
            if event in ("kill", "daemon_restart"):
                # (or done: a late event may leave them few steps to read)
                wait_until(lambda: rank0_joined(sock)
                           or all(w.proc.poll() is not None for w in rank0), 120,
                           f"rank 0's peers to rejoin after {event}:\n"
                           f"{rank0[0].stderr()}\n{rank0[1].stderr()}")
        for w in rank0:
            w.wait(180)
        for w in chaos.sides:
            w.wait(60)

        # consume, rank 1, the rest, from the first part's cursor.
        rest = subprocess.run(
            [str(millrace.path), "consume", "--socket", str(sock), "--dp-rank", "1",
             "--dp-size", "2", "--job", "main", "--steps", str(STEPS - FIRST_PART),
             "--json", "--cursor-file", str(cur)], capture_output=True, text=True,
            timeout=120)
        assert rest.returncode == 0, rest.stderr
        st = status(sock)
        chaos.close()
        assert daemon.alive(), daemon.log_tail()

        # Back near the level before the chaos once the misbehaving clients are gone.
        wait_until(lambda: daemon.steady_fd_count(samples=3) <= fds0, 30,
                   f"the daemon's fds to come back to {fds0}")
        rss1 = rss_kib(daemon.pid)
        assert rss1 <= rss0 + 32 * 1024, (rss0, rss1)
    finally:
        chaos.close()
        daemon.stop()
    daemon.assert_no_panic()
    log = daemon.log_tail(1 << 30)

    # The broken reload was refused, naming the file, and counted; the old config stayed
    # (the streams below are the old config's plus the live changes).
    # (Counted in status, which a restarted daemon starts afresh: the log keeps them.)
    refused = [line for line in log.splitlines() if "reload refused, the old weights stay" in line]
    assert len(refused) == REPEAT and all(str(config) in line for line in refused), refused
    assert all(code == "protocol" for what, code in chaos.refusals if what == "protocol 1")

    # The reference: the accepted live changes written into the config.
    ref = d / "ref.toml"
    ref.write_text(config_text(chaos.changes))
    # The unused shard was truncated: restore what explain reads (it is never read for
    # rows, weight 0, but explain opens every shard).
    write_corpus(d, SEED)
    reference = Reference(millrace, ref, books)
    want0 = reference.steps(0, STEPS, 0, 2)
    for w in rank0:
        assert_flat_equal(read_flat(w.out), want0, f"{w.name} (killed and resumed)")
    want1 = reference.steps(0, STEPS, 1, 2)
    check_consume(json.loads(first.stdout), want1[:FIRST_PART], "consume, first part")
    check_consume(json.loads(rest.stdout), want1[FIRST_PART:], "consume, resumed")
    for w in chaos.sides:
        assert_flat_equal(read_flat(w.out), reference.steps(0, SIDE_STEPS, 0, 1), w.name)
    print(f"seed {SEED}: order {order}, changes {chaos.changes}, refusals "
          f"{chaos.refusals}, fds {fds0}, rss {rss0} -> {rss1} KiB")


def read_until_error(clients, limit: int, timeout: float = 20.0):
    """Peers of one ring read in turn (the ring refills a slot only once every peer
    released it) until each got the daemon's ERROR: per peer the steps read, the error
    and the seconds it took. Fails on a hang."""
    steps, errors, took = [[] for _ in clients], [None] * len(clients), [0.0] * len(clients)
    t0 = time.monotonic()
    for _ in range(limit):
        for k, c in enumerate(clients):
            if errors[k] is None:
                try:
                    steps[k].append(c.next_batch(timeout=timeout).step)
                except mr.DaemonError as e:
                    errors[k], took[k] = e, time.monotonic() - t0
        if all(errors):
            return list(zip(steps, errors, took))
    raise AssertionError(f"no ERROR within {limit} steps (read {steps})")


def test_a_used_shard_truncated_stops_its_rings_and_late_peers_learn_it(tmp_path, short_dir,
                                                                        millrace):
    """A used domain's `.bin` truncated under a TP pair: both peers get ERROR
    materialize naming the file; a late joiner of that ring (a peer that connects after
    the failure) gets the same error at once, and so do peers that rejoin from their blobs
    (after the steps the ring can still fill); the daemon stays up."""
    d = tmp_path / "c"
    d.mkdir()
    write_corpus(d, SEED)
    config = d / "run.toml"
    config.write_text(config_text())
    sock = short_dir / "m.sock"
    daemon = Daemon(millrace.path, config, sock, tmp_path / "daemon.log").start()

    def peer(name):
        return mr.Client(sock, 0, 1, job="tp", replica=name, replicas=2, reconnect_timeout=0,
                         register_cuda=False)

    try:
        a, b = peer("tp0"), peer("tp1")
        for _ in range(5):
            a.next_batch(timeout=20)
            b.next_batch(timeout=20)
        blobs = a.state_dict(), b.state_dict()
        os.truncate(d / "web.bin", 0)
        for _, err, _ in read_until_error([a, b], 100):
            assert err.code == "materialize" and "web.bin" in err.message, err
        # The daemon closes both after the ERROR; the stopped ring goes with the last of
        # them. (A peer that joins before is refused `materialize` with the ring's error:
        # src/serve/hub/join.rs; seed 225 under load joined first and was refused
        # `peer_position`, before the daemon said why.)
        def ring_gone():
            return not any(j.get("rings") for j in status(sock).get("jobs", [])
                           if j.get("job") == "tp")

        wait_until(ring_gone, 20, "the stopped ring of job tp to go")
        # A late joiner without a blob: a new ring, stopped at its first read of web.
        [(_, err, took)] = read_until_error([peer("tp0")], 100)
        assert err.code == "materialize" and "web.bin" in err.message, err
        assert took < 10, took
        wait_until(ring_gone, 20, "the late joiner's stopped ring to go")
        # Both peers back from their blobs: the steps before the failing one, then the
        # same error, for both.
        again = [peer(n) for n in ("tp0", "tp1")]
        for c, blob in zip(again, blobs):
            c.load_state_dict(blob)
            c.connect()
        got = read_until_error(again, 100)
        for steps, err, took in got:
            assert err.code == "materialize" and "web.bin" in err.message, err
            assert took < 10, took
        assert got[0][0] == got[1][0]
        assert daemon.alive(), daemon.log_tail()
        st = status(sock)
        assert any(p["shard"].endswith("web") for p in st["poisoned_shards"]), st
    finally:
        daemon.stop()
    daemon.assert_no_panic()
