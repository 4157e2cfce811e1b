"""Helpers of test_serve.py: a numpy-written corpus, an independent reader of it, the
expected arrays of every row (from `millrace explain` and docs/PROTOCOL.md section 4), the
daemon as a subprocess, and client worker processes (serve_worker.py).

Nothing here uses millrace's own reading code: the expected data is rebuilt from the
.bin/.idx files with numpy and the definitions in PROTOCOL.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from writers import write_megatron

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
WORKER = HERE / "serve_worker.py"

SEQ_LEN = 64
GLOBAL_ROWS = 8
DOMAINS = ("web", "code")
PAD = 0
CURSOR_MAX = 4096


def import_path_for_package() -> str:
    """Directory to put on sys.path so that `import millrace` finds python/millrace."""
    return str(REPO_ROOT / "python")


# ---------------------------------------------------------------------------- corpus


def write_corpus(dir: Path, seed: int = 7, plan_seed: int = 11, ring_slots: int = 4,
                 extra_serve: str = "") -> Path:
    """Two domains of uint16 Megatron shards; returns the config path."""
    dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("web", 300), ("code", 200)):
        lens = rng.integers(1, 50, size=n)
        lens[::37] = rng.integers(SEQ_LEN + 2, 5 * SEQ_LEN, size=len(lens[::37]))
        docs = [rng.integers(3, 30000, size=int(k)).astype(np.uint16) for k in lens]
        write_megatron(dir / name, docs, np.uint16)
    cfg = dir / "run.toml"
    cfg.write_text(f"""
[corpus]
[[corpus.domain]]
name = "web"
shards = ["web"]
[[corpus.domain]]
name = "code"
shards = ["code"]

[plan]
seed = {plan_seed}
seq_len = {SEQ_LEN}
global_batch_rows = {GLOBAL_ROWS}
packing = "best_fit"
best_fit_window = 64
pad_token = {PAD}
eod_token = 2
weights = {{ web = 0.6, code = 0.4 }}

[serve]
socket = "unused.sock"
ring_slots = {ring_slots}
materialize_threads = 2
token_dtype = "int32"
{extra_serve}
""")
    return cfg


class IndexedShard:
    """An independent reader of a Megatron .bin/.idx pair (layout in writers.py)."""

    CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
             7: np.float32, 8: np.uint16}

    def __init__(self, prefix: Path):
        idx = Path(f"{prefix}.idx").read_bytes()
        assert idx[:9] == b"MMIDIDX\x00\x00"
        _version, code, nseq, ndoc = struct.unpack_from("<QBQQ", idx, 9)
        self.dtype = np.dtype(self.CODES[code]).newbyteorder("<")
        at = 34
        self.lengths = np.frombuffer(idx, "<i4", nseq, at)
        at += 4 * nseq
        self.pointers = np.frombuffer(idx, "<i8", nseq, at)
        at += 8 * nseq
        self.doc_index = np.frombuffer(idx, "<i8", ndoc, at)
        self.bin = np.fromfile(f"{prefix}.bin", dtype=np.uint8)

    def doc(self, d: int) -> np.ndarray:
        parts = []
        for s in range(self.doc_index[d], self.doc_index[d + 1]):
            off, n = int(self.pointers[s]), int(self.lengths[s])
            parts.append(self.bin[off : off + n * self.dtype.itemsize].view(self.dtype))
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def explain(millrace, config: Path, step: int, count: int, rank: int, size: int) -> list:
    proc = millrace.run("explain", "--config", config, "--step", step, "--count", count,
                        "--dp-rank", rank, "--dp-size", size, "--json")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["step"] for o in out] == list(range(step, step + count))
    return out


def rec_dtype(rows: int = None, seq_len: int = SEQ_LEN) -> np.dtype:
    """One delivered (or expected) step of one rank, as the worker records it."""
    rows = rows if rows is not None else GLOBAL_ROWS
    n = rows * seq_len
    return np.dtype([
        ("step", "<i8"), ("plan_step", "<i8"), ("max_seqlen", "<i8"), ("loss_tokens", "<i8"),
        ("real_tokens", "<i8"), ("cu_len", "<i8"),
        ("tokens", "<i4", (rows, seq_len)), ("labels", "<i4", (rows, seq_len)),
        ("loss_mask", "u1", (rows, seq_len)), ("position_ids", "<i4", (rows, seq_len)),
        ("cu_seqlens", "<i4", (n + 1,)), ("domain", "<i4", (rows,)),
        ("row_loss_tokens", "<i4", (rows,)),
        ("cursor_len", "<i8"), ("cursor", "u1", (CURSOR_MAX,)),
    ])


class Expected:
    """Expected records built from explain + the shards, per PROTOCOL.md section 4."""

    def __init__(self, millrace, config: Path):
        self.millrace = millrace
        self.config = Path(config)
        self.shards = {}
        self.cache = {}

    def shard(self, name: str) -> IndexedShard:
        if name not in self.shards:
            self.shards[name] = IndexedShard(self.config.parent / name)
        return self.shards[name]

    def records(self, start: int, count: int, rank: int, size: int) -> np.ndarray:
        key = (start, count, rank, size)
        if key in self.cache:
            return self.cache[key]
        steps = explain(self.millrace, self.config, start, count, rank, size)
        rows = GLOBAL_ROWS // size
        out = np.zeros(count, rec_dtype(rows))
        for k, s in enumerate(steps):
            self._fill(out[k], s, rows)
        self.cache[key] = out
        return out

    def _fill(self, rec, s, rows):
        L = SEQ_LEN
        rec["step"] = s["step"]
        rec["plan_step"] = s["plan_step"]
        assert len(s["rows"]) == rows
        cu = [0]
        real = 0
        for r, row in enumerate(s["rows"]):
            parts, piece, pos = [], [], []
            for k, g in enumerate(row["segments"]):
                toks = self.shard(g["shard"]).doc(g["doc"])
                assert len(toks) == g["doc_len"]
                parts.append(toks[g["start"] : g["end"]].astype(np.int64))
                n = g["end"] - g["start"]
                piece += [k] * n
                pos += list(range(n))
            used = sum(len(p) for p in parts)
            pad = L + 1 - used
            assert pad == row["padding"] and used == row["tokens"]
            t = np.concatenate(parts + [np.full(pad, PAD, np.int64)])
            piece += [-1] * pad
            pos += list(range(pad))
            piece = np.array(piece)
            rec["tokens"][r] = t[:L]
            rec["labels"][r] = t[1:]
            mask = (piece[:L] == piece[1:]) & (piece[:L] >= 0)
            rec["loss_mask"][r] = mask
            rec["position_ids"][r] = pos[:L]
            rec["row_loss_tokens"][r] = mask.sum()
            assert mask.sum() == row["loss_tokens"], (s["step"], r)
            rec["domain"][r] = DOMAINS.index(row["domain"])
            # Piece ends over the flattened inputs; a piece starting at the label-only
            # last token adds nothing.
            a = 0
            lens = [g["end"] - g["start"] for g in row["segments"]] + ([pad] if pad else [])
            for n in lens:
                if a < L:
                    cu.append(r * L + min(a + n, L))
                a += n
            real += used
        cu = np.array(cu)
        rec["cu_len"] = len(cu)
        rec["cu_seqlens"][: len(cu)] = cu
        rec["max_seqlen"] = int(np.diff(cu).max())
        rec["loss_tokens"] = int(rec["row_loss_tokens"].sum())
        rec["real_tokens"] = real


DATA_FIELDS = ("step", "plan_step", "max_seqlen", "loss_tokens", "real_tokens", "cu_len",
               "tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "domain",
               "row_loss_tokens")


def assert_records_equal(got: np.ndarray, want: np.ndarray, what: str = ""):
    """Field by field, naming the first step and field that differ."""
    assert len(got) == len(want), f"{what}: {len(got)} steps received, {len(want)} expected"
    for f in DATA_FIELDS:
        a, b = got[f], want[f]
        if f == "cu_seqlens":
            # Entries past cu_len are unspecified in the ring; compare the used prefix.
            idx = np.arange(a.shape[1])[None, :] < want["cu_len"][:, None]
            a, b = np.where(idx, a, 0), np.where(idx, b, 0)
        if not np.array_equal(a, b):
            bad = np.flatnonzero([not np.array_equal(x, y) for x, y in zip(a, b)])[0]
            raise AssertionError(
                f"{what}: field {f} differs first at step {int(want['step'][bad])}:\n"
                f"got  {a[bad]!r}\nwant {b[bad]!r}")


def record_of_batch(batch, rec):
    """Fills one record from a millrace.Batch (used in-process and by the worker)."""
    rec["step"] = batch.step
    rec["plan_step"] = batch.plan_step
    rec["max_seqlen"] = batch.max_seqlen
    rec["loss_tokens"] = batch.loss_tokens
    rec["real_tokens"] = batch.real_tokens
    cu = batch.cu_seqlens
    rec["cu_len"] = len(cu)
    rec["tokens"] = batch.tokens
    rec["labels"] = batch.labels
    rec["loss_mask"] = batch.loss_mask
    rec["position_ids"] = batch.position_ids
    rec["cu_seqlens"][: len(cu)] = cu
    rec["domain"] = batch.domain
    rec["row_loss_tokens"] = batch.row_loss_tokens
    c = batch.cursor
    assert len(c) <= CURSOR_MAX
    rec["cursor_len"] = len(c)
    rec["cursor"][: len(c)] = np.frombuffer(c, np.uint8)


def cursor_of(rec) -> bytes:
    return rec["cursor"][: int(rec["cursor_len"])].tobytes()


def read_records(path: Path, rows: int) -> np.ndarray:
    """Whole records of a worker's output (a partial last one, from a kill, is dropped)."""
    dt = rec_dtype(rows)
    data = Path(path).read_bytes() if Path(path).exists() else b""
    n = len(data) // dt.itemsize
    return np.frombuffer(data[: n * dt.itemsize], dt)


def count_records(path: Path, rows: int) -> int:
    try:
        return os.path.getsize(path) // rec_dtype(rows).itemsize
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------- daemon


class Daemon:
    """`millrace serve` as a subprocess with its stderr in a log file."""

    def __init__(self, binary: Path, config: Path, sock: Path, log: Path):
        self.binary, self.config, self.sock, self.log = binary, config, sock, log
        self.proc = None

    def start(self, timeout: float = 60.0) -> "Daemon":
        assert self.proc is None or self.proc.poll() is not None
        logf = open(self.log, "ab")
        env = dict(os.environ)
        env.setdefault("MILLRACE_LOG", "info")
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--config", str(self.config), "--socket",
             str(self.sock)], stdout=logf, stderr=logf, env=env)
        logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"millrace serve exited {self.proc.returncode}:\n"
                                     f"{self.log_tail()}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.sock))
                return self
            except OSError:
                pass
            finally:
                s.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"millrace serve did not accept within {timeout} s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL and reap."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self):
        """SIGTERM, then SIGKILL after 10 s."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def fd_count(self) -> int:
        """Open fds, leaving out the config file, which the watcher opens for a moment
        every tick."""
        n = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except FileNotFoundError:
                continue  # closed while we looked
            n += target != os.path.realpath(self.config)
        return n

    def steady_fd_count(self, samples: int = 10, gap: float = 0.05) -> int:
        """The fewest fds seen over a short while: the count with nothing transient open
        (a probe connection still being closed, a blocking task's file)."""
        counts = []
        for _ in range(samples):
            counts.append(self.fd_count())
            time.sleep(gap)
        return min(counts)

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def assert_no_panic(self):
        text = self.log_tail(1 << 30)
        assert "panicked" not in text, text[-6000:]


# ---------------------------------------------------------------------------- workers


class Worker:
    """A client in its own process (serve_worker.py); records every batch to ``out``."""

    def __init__(self, tmp: Path, name: str, **args):
        self.name = name
        self.out = tmp / f"{name}.rec"
        self.errf = tmp / f"{name}.err"
        self.args = dict(args, out=str(self.out))
        self.rows = GLOBAL_ROWS // args["dp_size"]
        self.proc = None

    def start(self, **override) -> "Worker":
        args = dict(self.args, **override)
        env = dict(os.environ)
        env["PYTHONPATH"] = import_path_for_package() + os.pathsep + env.get("PYTHONPATH", "")
        err = open(self.errf, "ab")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)],
                                     stdout=err, stderr=err, env=env)
        err.close()
        return self

    def records(self) -> np.ndarray:
        return read_records(self.out, self.rows)

    def count(self) -> int:
        return count_records(self.out, self.rows)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker {self.name} did not finish within {timeout} s "
                                 f"({self.count()} steps recorded):\n{self.stderr()}")
        assert rc == 0, f"worker {self.name} exited {rc}:\n{self.stderr()}"
        return rc

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stderr(self) -> str:
        try:
            return self.errf.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (SIGSTOP takes effect asynchronously)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(s == "T" for s in states)


def wait_until(pred, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


# ---------------------------------------------------------------------------- flat records


FLAT_ROWS, FLAT_TOKENS, FLAT_CURSOR = 8, 1 << 11, 1 << 14


def flat_dtype() -> np.dtype:
    """One delivered step of any shape (stages change rows and seq_len): the full rows
    (inputs and the last label, seq_len + 1 a row), flattened, and the position ids."""
    return np.dtype([
        ("step", "<i8"), ("plan_step", "<i8"), ("rows", "<i4"), ("seq_len", "<i4"),
        ("domain", "<i4", (FLAT_ROWS,)), ("tokens", "<i8", (FLAT_TOKENS,)),
        ("position_ids", "<i4", (FLAT_TOKENS,)),
        ("cursor_len", "<i8"), ("cursor", "u1", (FLAT_CURSOR,)),
    ])


def flat_record_of_batch(batch, rec):
    """Fills one flat record from a millrace.Batch."""
    rows, seq = batch.tokens.shape
    assert rows <= FLAT_ROWS and rows * (seq + 1) <= FLAT_TOKENS
    rec["step"], rec["plan_step"] = batch.step, batch.plan_step
    rec["rows"], rec["seq_len"] = rows, seq
    rec["domain"][:rows] = batch.domain
    full = np.concatenate([batch.tokens, batch.labels[:, -1:]], axis=1).astype(np.int64)
    rec["tokens"][: full.size] = full.ravel()
    rec["position_ids"][: rows * seq] = np.asarray(batch.position_ids).ravel()
    c = batch.cursor
    assert len(c) <= FLAT_CURSOR, len(c)
    rec["cursor_len"] = len(c)
    rec["cursor"][: len(c)] = np.frombuffer(c, np.uint8)


def read_flat(path: Path) -> np.ndarray:
    """Whole flat records of a worker's output (a partial last one, from a kill, is
    dropped)."""
    dt = flat_dtype()
    data = Path(path).read_bytes() if Path(path).exists() else b""
    n = len(data) // dt.itemsize
    return np.frombuffer(data[: n * dt.itemsize], dt)


def count_flat(path: Path) -> int:
    try:
        return os.path.getsize(path) // flat_dtype().itemsize
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------- raw frames


def frame(kind: int, payload: bytes) -> bytes:
    """One protocol frame (docs/PROTOCOL.md section 1): u32 length, u8 type, payload."""
    return struct.pack("<IB", len(payload) + 1, kind) + payload


def read_frame(sock: socket.socket, timeout: float, fds: int = 0):
    """(type, payload, fds) of the next frame, or None at EOF; fds with the first byte."""
    sock.settimeout(timeout)
    got, got_fds = b"", []
    while len(got) < 5:
        data, more, _flags, _addr = socket.recv_fds(sock, 5 - len(got), max(fds, 1))
        if not data:
            return None
        got += data
        got_fds += more
    n, kind = struct.unpack("<IB", got)
    payload = b""
    while len(payload) < n - 1:
        data = sock.recv(n - 1 - len(payload))
        if not data:
            return None
        payload += data
    return kind, payload, got_fds
