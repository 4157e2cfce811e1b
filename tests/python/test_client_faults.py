"""The Python client (python/millrace/client.py) where a connection goes wrong: a daemon
that starts after the trainer, a daemon that accepts but is slow to WELCOME, slot headers
that break docs/PROTOCOL.md section 4, field shapes that overflow, and a connection the
daemon ended with an ERROR frame. Real daemons and real unix sockets; a ring is
tampered with only in a private copy of its bytes.
"""

from __future__ import annotations

import copy
import fcntl
import gc
import inspect
import linecache
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time
import weakref

import pytest

import numpy as np
from serve_helpers import (Daemon, explain, import_path_for_package, stopped, wait_until,
                           write_corpus)

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

from millrace.client import _field_view, _require_sealed  # noqa: E402

# Offsets in a slot header (docs/PROTOCOL.md section 4): step, plan_step, rows, seq_len,
# cu_len, max_seqlen, ...
CU_LEN_AT, MAX_SEQLEN_AT = 24, 28
U32 = struct.Struct("<I")


@pytest.fixture
def daemons(millrace, short_dir, tmp_path):
    """Daemons on demand (not started: start() them), killed and checked at the end."""
    made = []

    def make(config, name="d"):
        d = Daemon(millrace.path, config, short_dir / f"{name}.sock",
                   tmp_path / f"{name}.log")
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()
    for d in made:
        if d.proc is not None:
            d.assert_no_panic()


# ---------------------------------------------------------------------------- connecting


def test_connect_timeout_is_not_cut_short_by_reconnect_timeout(daemons, tmp_path):
    """A trainer started with its daemon passes connect_timeout; with reconnect_timeout=0
    the first connection used to give up at once ("within 0 s"). Now it waits for the
    socket that appears half a second later, however long the daemon takes to start."""
    d = daemons(write_corpus(tmp_path / "late"))
    assert not d.sock.exists()
    starter = threading.Timer(0.5, d.start)
    starter.start()
    try:
        t0 = time.monotonic()
        with mr.Client(d.sock, 0, 4, reconnect_timeout=0, connect_timeout=60,
                       register_cuda=False) as c:
            assert c.next_batch(timeout=60).step == 0
        assert time.monotonic() - t0 >= 0.5
    finally:
        starter.join()
    # Without connect_timeout a missing socket is still an error at once (a wrong path).
    t0 = time.monotonic()
    with pytest.raises(mr.DaemonGone, match="no such socket"):
        mr.Client(tmp_path / "nobody.sock", 0, 4, reconnect_timeout=5).connect()
    assert time.monotonic() - t0 < 2


def test_a_socket_path_too_long_for_unix_sockets_is_named_with_the_limit(daemons,
                                                                       tmp_path):
    """A socket path over the 107 bytes a unix socket takes failed with Python's bare
    `OSError: AF_UNIX path too long`, naming neither the path nor the limit (and not a
    MillraceError). Here the long path even leads to a live daemon (through `x/..`
    pieces): it is refused at once, for its length, by the client and by Control."""
    d = daemons(write_corpus(tmp_path / "long")).start()
    (d.sock.parent / "x").mkdir()
    long = str(d.sock.parent) + "/x/.." * 20 + "/" + d.sock.name
    assert len(long) > 107 and os.path.samefile(long, d.sock)
    for connect in (lambda: mr.Client(long, 0, 4, connect_timeout=30, reconnect_timeout=30,
                                      register_cuda=False).connect(),
                    lambda: mr.Control(long, timeout=30).status()):
        t0 = time.monotonic()
        with pytest.raises(mr.DaemonGone) as e:
            connect()
        assert time.monotonic() - t0 < 2
        assert str(e.value) == (f"cannot connect to {long}: the path is {len(long)} bytes; "
                                "a unix socket path may have at most 107")
    (d.sock.parent / "x").rmdir()
    with mr.Client(d.sock, 0, 4, register_cuda=False) as c:  # the short path serves
        assert c.next_batch(timeout=60).step == 0


def test_a_first_connect_refused_duplicate_logs_the_limit_that_applies(daemons, tmp_path,
                                                                      caplog):
    """A first connect refused `duplicate` (a restarted trainer that reached the daemon
    before it noticed its predecessor's death) is retried for min(3 s, reconnect_timeout)
    only, but the log said "retrying for 60 s" (max(reconnect_timeout, connect_timeout)),
    and the Refused came long before that. The log now says the limit that applies."""
    d = daemons(write_corpus(tmp_path / "dup")).start()
    with mr.Client(d.sock, 0, 4, job="dup", register_cuda=False) as holder:
        assert holder.next_batch(timeout=60).step == 0
        t0 = time.monotonic()
        with pytest.raises(mr.Refused) as e:
            mr.Client(d.sock, 0, 4, job="dup", connect_timeout=60, reconnect_timeout=0.5,
                      register_cuda=False).connect()
        took = time.monotonic() - t0
    assert e.value.code == "duplicate" and 0.5 <= took < 5, took
    said = [r.getMessage() for r in caplog.records if "retrying for" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("retrying for 0.5 s"), said


class FullBacklog:
    """A unix socket that listens with a backlog of 0 and never accepts, its one place
    in the queue taken: every further connect() fails with EAGAIN, as on a daemon whose
    backlog something floods (a real flood of a daemon races its accept loop)."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(0)
        self.queued = []
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            self.queued.append(s)
        assert self.queued, "the backlog took no connection"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(5)  # as the clients' sockets have
        with pytest.raises(BlockingIOError):
            probe.connect(str(path))
        probe.close()

    def close(self):
        self.listener.close()
        for s in self.queued:
            s.close()


def test_a_full_listen_backlog_is_retried_not_a_blocking_io_error(daemons, tmp_path,
                                                                   caplog):
    """connect() on a unix socket with a timeout fails at once with EAGAIN when the
    daemon's listen backlog is full. The client did not retry it: a trainer with
    connect_timeout (or reconnecting after a restart, every rank at once) died with
    `BlockingIOError: [Errno 11] Resource temporarily unavailable` while the daemon was
    there. It is now retried like `busy`: a client given connect_timeout=30 waits
    through it and reads its batch once a daemon takes connections; past its limit it
    raises DaemonGone naming the full backlog. Control retries it within its timeout."""
    d = daemons(write_corpus(tmp_path / "backlog"))
    full = FullBacklog(d.sock)
    try:
        t0 = time.monotonic()
        with pytest.raises(mr.DaemonGone) as e:
            mr.Client(d.sock, 0, 4, connect_timeout=0.3, reconnect_timeout=0,
                      register_cuda=False).connect()
        assert time.monotonic() - t0 >= 0.3
        assert str(e.value).startswith(f"the millrace daemon at {d.sock} took no new "
                                       "connection within 0.3 s: its listen backlog is full")
        t0 = time.monotonic()
        with pytest.raises(mr.DaemonGone, match="listen backlog is full"):
            mr.Control(d.sock, timeout=0.3).status()
        assert time.monotonic() - t0 >= 0.3

        got = []
        c = mr.Client(d.sock, 0, 4, connect_timeout=30, reconnect_timeout=0,
                      register_cuda=False)

        def read():
            try:
                got.append(c.next_batch(timeout=60).step)
            except Exception as e:  # noqa: BLE001 - what the reader met is the result
                got.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_until(lambda: any("listen backlog is full" in r.getMessage()
                               for r in caplog.records), 30, "the client to meet the backlog")
        time.sleep(0.3)  # a few retries
        assert not got
    finally:
        full.close()
    d.sock.unlink()
    d.start()
    reader.join(60)
    assert got == [0]
    c.close()


class Silent:
    """A unix socket that accepts connections and never answers (a daemon busy seeking)."""

    def __init__(self, path):
        self.conns = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            self.accepted(c)

    def accepted(self, c):
        self.conns.append(c)

    def close(self):
        self.listener.close()
        for c in self.conns:
            c.close()


def test_a_slow_welcome_is_a_handshake_timeout_not_a_gone_daemon(short_dir):
    """A daemon that accepted and has the HELLO but sends no WELCOME within
    handshake_timeout is there, busy: HandshakeTimeout at once, naming the option, on
    the one connection. It used to be retried as a gone daemon (each retry cancelling
    the daemon's seek and starting it over) and end in "no millrace daemon"."""
    srv = Silent(short_dir / "silent.sock")
    try:
        t0 = time.monotonic()
        with pytest.raises(mr.HandshakeTimeout) as e:
            mr.Client(short_dir / "silent.sock", 0, 1, handshake_timeout=0.5,
                      reconnect_timeout=5, register_cuda=False).connect()
        took = time.monotonic() - t0
        assert 0.4 < took < 3, took
        assert "handshake_timeout" in str(e.value) and "accepted" in str(e.value)
        assert not isinstance(e.value, mr.DaemonGone)
        assert len(srv.conns) == 1
    finally:
        srv.close()


def test_next_batch_timeout_bounds_a_reconnect_too(daemons, tmp_path):
    """next_batch(timeout) promises a TimeoutError after `timeout` seconds; while the
    daemon was away it blocked for all of reconnect_timeout instead. Now each call gives
    up at its own timeout and the next call retries within the same window, so
    reconnect_timeout still bounds the outage (DaemonGone), and a daemon back in time
    continues the stream at the exact step."""
    d = daemons(write_corpus(tmp_path / "timeouts")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=3, register_cuda=False)
    assert c.next_batch(timeout=60).step == 0
    d.kill()
    step = 1
    while True:  # what the daemon published before it died is still served
        try:
            assert c.next_batch(timeout=0.5).step == step
            step += 1
        except TimeoutError:
            break
    t0 = time.monotonic()
    timeouts = 1
    with pytest.raises(mr.DaemonGone, match="within 3 s"):
        while True:
            t = time.monotonic()
            with pytest.raises(TimeoutError, match=f"no batch for step {step}"):
                c.next_batch(timeout=0.5)
            assert time.monotonic() - t < 2
            timeouts += 1
    assert timeouts >= 4 and time.monotonic() - t0 < 6
    # A new outage window: the daemon comes back while the caller keeps timing out.
    starter = threading.Timer(1.0, d.start)
    starter.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                b = c.next_batch(timeout=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline
    finally:
        starter.join()
    assert b.step == step and c.reconnects == 1
    c.close()


# ---------------------------------------------------------------------------- headers


def test_slot_headers_with_a_wild_max_seqlen_or_cu_len_are_protocol_errors(daemons,
                                                                           tmp_path):
    """max_seqlen goes to flash attention as is and a compact slot's cu_len sizes the
    cu_seqlens a GPU derives, so a header must have 0 < max_seqlen <= seq_len and, with
    row_bounds, cu_len = the last row's end entry + 1. Checked on a private, writable
    copy of a live ring, then the untouched header reads as before."""
    d = daemons(write_corpus(tmp_path / "hdr")).start()
    with mr.Client(d.sock, 0, 4, job="hdr", reconnect_timeout=0, register_cuda=False) as c:
        assert c.next_batch(timeout=60).step == 0
        conn = c._conn
        wait_until(lambda: conn.published() >= 2, 30, "step 1 published")
        # The client maps rings read only (and checks its views are): a memfd mapped
        # read only for it and read-write for the tampering.
        fd = os.memfd_create("ring-copy")
        os.ftruncate(fd, len(conn.mm))
        copy = mmap.mmap(fd, len(conn.mm))
        copy[:] = conn.mm[:]
        conn.mm = mmap.mmap(fd, len(copy), prot=mmap.PROT_READ)
        os.close(fd)
        conn.by_header.clear()  # views of the copy from here on
        base = conn.slot_base[1 % conn.slots]
        seq_len = U32.unpack_from(copy, base + 20)[0]
        cu_len = U32.unpack_from(copy, base + CU_LEN_AT)[0]
        max_seqlen = U32.unpack_from(copy, base + MAX_SEQLEN_AT)[0]
        for at, value, what in [(MAX_SEQLEN_AT, 0, "max_seqlen 0 "),
                                (MAX_SEQLEN_AT, seq_len + 1, f"max_seqlen {seq_len + 1} "),
                                (CU_LEN_AT, cu_len + 1, "row_bounds"),
                                # row_bounds, or the older range check (rows < cu_len)
                                (CU_LEN_AT, cu_len - 1, "cu_len")]:
            U32.pack_into(copy, base + at, value)
            with pytest.raises(mr.ProtocolError, match=what):
                c.next_batch(timeout=10)
            U32.pack_into(copy, base + CU_LEN_AT, cu_len)
            U32.pack_into(copy, base + MAX_SEQLEN_AT, max_seqlen)
        b = c.next_batch(timeout=10)
        assert (b.step, b.cu_len, b.max_seqlen) == (1, cu_len, max_seqlen)
        assert len(b.cu_seqlens) == cu_len


def test_field_shapes_that_overflow_int64_are_protocol_errors():
    """A WELCOME (or header) field's element count is a Python integer: np.prod wrapped
    2**32 x 2**32 around int64 to 0 bytes, which passed the bound check and failed later
    with a ValueError. Negative extents are refused too."""
    mm = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    ok = _field_view(mm, 0, "rows", {"dtype": "int32", "shape": [2, 8], "offset": 256}, 4096)
    assert ok.shape == (2, 8)
    for shape in ([2**32, 2**32], [2**63, 2], [-1, 4], [-2, -8]):
        with pytest.raises(mr.ProtocolError):
            _field_view(mm, 0, "rows", {"dtype": "int32", "shape": shape, "offset": 256},
                        4096)


def test_a_memfd_that_can_shrink_is_refused():
    """The client checks a ring's and a release page's size once, when it maps them; a
    memfd cut after that raises SIGBUS in the trainer at its next read. So a memfd
    without F_SEAL_SHRINK is refused, naming the seal (the daemon seals both; every
    test that streams from a real daemon passes this check)."""
    import fcntl
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(mr.ProtocolError, match="ring memfd is not sealed against shrinking"):
            _require_sealed(fd, "ring")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        with pytest.raises(mr.ProtocolError, match="seals 0x4"):
            _require_sealed(fd, "release page")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        _require_sealed(fd, "ring")
    finally:
        os.close(fd)
    # A memfd made without MFD_ALLOW_SEALING carries F_SEAL_SEAL only.
    fd = os.memfd_create("no-sealing")
    try:
        with pytest.raises(mr.ProtocolError, match="not sealed"):
            _require_sealed(fd, "ring")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- errors


def test_after_a_daemon_error_the_next_call_says_why_the_connection_ended(daemons, tmp_path):
    """An ERROR frame (here `materialize`: an id past vocab_size) ends the connection.
    The next call used to find it failed with no reason ("the connection failed
    earlier"); it now names the daemon's error."""
    config = write_corpus(tmp_path / "vocab")  # ids 3..30000
    config.write_text(config.read_text().replace("eod_token = 2",
                                                 "eod_token = 2\nvocab_size = 1000"))
    d = daemons(config).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    with pytest.raises(mr.DaemonError) as e:
        for _ in range(10):
            c.next_batch(timeout=60)
    assert e.value.code == "materialize"
    assert c._conn is not None and c._conn.gone
    assert c._conn.gone_reason == f"materialize: {e.value.message}"
    with pytest.raises(mr.DaemonGone, match="went away: materialize: "):
        c.next_batch(timeout=60)
    c.close()


def test_a_daemon_restarted_with_another_plan_before_the_first_batch_is_refused(daemons,
                                                                             tmp_path):
    """A reconnection before the first batch has no cursor blob (whose check refuses a
    blob of another plan): its HELLO carried start_step alone. A daemon that ended the
    connection before publishing anything (here an ERROR at step 0, an id past
    vocab_size) and was restarted with another config (seed 12 for 11) then streamed
    the new plan's step 0 silently. The reconnection now pins the first WELCOME's
    fingerprint: REFUSED `fingerprint`, while the same plan is still taken."""
    dir = tmp_path / "replan"
    bad = write_corpus(dir)  # ids 3..30000
    bad.write_text(bad.read_text().replace("eod_token = 2",
                                           "eod_token = 2\nvocab_size = 1000"))
    d = daemons(bad).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=30, register_cuda=False)
    first = c.fingerprint
    with pytest.raises(mr.DaemonError, match="vocab_size"):
        c.next_batch(timeout=60)
    assert c.state_dict() == {"cursor": None, "step": -1}
    # The same plan again: the reconnection is taken (and meets the same ERROR).
    d.kill()
    d.start()
    with pytest.raises(mr.DaemonError, match="vocab_size"):
        c.next_batch(timeout=60)
    assert c.reconnects == 1
    # Another plan: refused, not streamed.
    d.kill()
    write_corpus(dir, plan_seed=12)
    d.start()
    other = mr.Client(d.sock, 1, 4, register_cuda=False)
    assert other.fingerprint != first
    other.close()
    with pytest.raises(mr.Refused) as e:
        c.next_batch(timeout=60)
    assert e.value.code == "fingerprint" and c.state_dict()["step"] == -1
    c.close()


def test_a_daemon_error_met_by_a_release_frame_is_raised_not_reconnected(daemons, tmp_path):
    """A trainer busy between steps does not read the socket: the daemon's ERROR (here
    `materialize`, an id past vocab_size at a later step) and its close wait there. With
    release frames the next call's RELEASE met the closed socket first, and the broken
    pipe passed for a restart: the client reconnected (and again, once per step
    published before the bad one) instead of raising the daemon's error."""
    config = write_corpus(tmp_path / "late-vocab")  # ids 3..30000: a few are past 29990
    config.write_text(config.read_text().replace("eod_token = 2",
                                                 "eod_token = 2\nvocab_size = 29990"))
    d = daemons(config).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=5, register_cuda=False,
                  release_page=False)
    taken = 0
    with pytest.raises(mr.DaemonError) as e:
        while True:
            c.next_batch(timeout=60)
            taken += 1
            conn = c._conn
            hup = select.poll()
            hup.register(conn.sock.fileno(), select.POLLIN)
            # Never wait inside next_batch (which would read the ERROR): call it once
            # the next step is published or the daemon has sent its ERROR and closed.
            # Every call sends a RELEASE frame first (one per (slots - hold) // 2 = 1).
            wait_until(lambda: conn.published() > c._next_step
                       or any(ev & select.POLLHUP for _, ev in hup.poll(0)), 60,
                       "the next step or the daemon's close")
    assert taken > 1
    assert e.value.code == "materialize" and "vocab_size 29990" in e.value.message
    assert c.reconnects == 0
    c.close()


def test_tp_peers_with_release_frames_rejoin_together_after_a_daemon_crash(daemons,
                                                                           tmp_path):
    """Two TP peers of one dp rank read with RELEASE frames, and one of them sent a frame
    at another step than its twin (a release_all at step 1). After a SIGKILL and a
    restart of the daemon, the next frame of one met the dead socket and it reconnected
    at once, at its own next step, while its twin read on from the old mapping: the new
    ring waited for the twin, and the twin for it in the step's collective (a barrier
    here; NCCL's watchdog in a run). A peer whose RELEASE finds the daemon gone now reads
    the steps published before it first, so both rejoin at the ring's published step."""
    config = write_corpus(tmp_path / "tp", ring_slots=8)
    d = daemons(config).start()
    collective = threading.Barrier(2)
    both_at_10 = threading.Barrier(3)
    restarted = threading.Event()
    out, clients = {}, {}

    def peer(name):
        c = clients[name] = mr.Client(d.sock, 0, 2, job="tp", replica=name, replicas=2,
                                      release_page=False, reconnect_timeout=60,
                                      register_cuda=False)
        steps = []
        try:
            for i in range(20):
                steps.append(c.next_batch(timeout=30).step)
                if name == "b" and i == 1:
                    c.release_all()
                if i == 10:
                    both_at_10.wait(60)
                    restarted.wait(60)
                collective.wait(30)
            out[name] = (steps, c.reconnects, None)
        except Exception as e:  # noqa: BLE001 - reported below
            out[name] = (steps, c.reconnects, e)
            collective.abort()
        finally:
            c.close()

    threads = [threading.Thread(target=peer, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    both_at_10.wait(60)
    # Steps past the next published: a peer whose frame falls due at step 11 finds the
    # daemon gone while its twin, whose frame does not, can read step 11 from the ring.
    wait_until(lambda: all(c._conn.published() > 12 for c in clients.values()), 30,
               "the ring to publish steps 11 and 12")
    d.kill()
    if os.path.exists(d.sock):
        os.unlink(d.sock)
    d.start()
    restarted.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for name in "ab":
        steps, reconnects, err = out[name]
        assert err is None, f"peer {name}: {err!r} after steps {steps}\n{d.log_tail()}"
        assert steps == list(range(20)), f"peer {name}: {steps}"
        assert reconnects == 1, f"peer {name}"


def test_a_stale_ring_that_handed_out_no_step_of_the_change_reconnects_with_it(
        daemons, millrace, tmp_path):
    """Two ranks of one job resumed from blobs on either side of a live change's arrival,
    the one lacking it first: when the other brings it, the daemon adopts it and stops
    the stale rank's ring at the change's step (ERROR `cursor`), taking back the steps it
    published from there. The Python client raised that error even when it had handed
    out no step at or past the change, so the trainer crashed where a reconnect from its
    last blob goes on with the change. Now it reconnects, and reads the run's own steps
    (those of a daemon that had the change all along); it still raises once a step
    without the change was handed out."""
    at, last = 12, 22
    config = write_corpus(tmp_path / "stale")
    d = daemons(config).start()
    run = {0: {}, 1: {}}  # the run with the change: step -> (domains, tokens), per rank
    blobs = {}  # step -> rank 0's cursor blob after it

    def take(c, rank):
        b = c.next_batch(timeout=60)
        run[rank][b.step] = (np.array(b.domain), np.array(b.tokens))
        if rank == 0:
            blobs[b.step] = c.state_dict()["cursor"]
        return b.step

    first = [mr.Client(d.sock, r, 2, job="train", register_cuda=False) for r in (0, 1)]
    for _ in range(3):
        assert [take(c, r) for r, c in enumerate(first)] == [_, _]
    mr.Control(d.sock).set_weights({"web": 0.02, "code": 0.98}, at_step=at)
    for s in range(3, last + 1):
        assert [take(c, r) for r, c in enumerate(first)] == [s, s]
    for c in first:
        c.close()
    old, new = blobs[2], blobs[at + 2]  # before the change reached the daemon; after
    plain = explain(millrace, config, at, 4, 0, 2)
    assert any([r["domain"] for r in p["rows"]] != list(run[0][p["step"]][0]) for p in plain), \
        "test setup: the change moves none of rank 0's rows in steps 12..15"

    # A fresh daemon, which knows the change only from a blob.
    d.stop()
    d.start()
    stale = mr.Client(d.sock, 0, 2, job="train", cursor=old, register_cuda=False)
    for s in range(3, at - 1):
        b = stale.next_batch(timeout=60)
        assert b.step == s and np.array_equal(np.array(b.tokens), run[0][s][1]), s
    # Its ring holds steps past the change's step, planned without the change.
    wait_until(lambda: stale._conn.published() > at + 1, 30, "rank 0's ring past the change")
    bringer = mr.Client(d.sock, 1, 2, job="train", cursor=new, register_cuda=False)
    b = bringer.next_batch(timeout=60)
    assert b.step == at + 3 and np.array_equal(np.array(b.tokens), run[1][at + 3][1])
    for s in range(at - 1, last + 1):
        b = stale.next_batch(timeout=60)
        assert b.step == s, (b.step, s)
        assert np.array_equal(np.array(b.domain), run[0][s][0]), f"step {s}: domains"
        assert np.array_equal(np.array(b.tokens), run[0][s][1]), f"step {s}: tokens"
    assert stale.reconnects == 1
    stale.close()
    bringer.close()

    # Again, the stale rank having handed out steps past the change's: those were wrong,
    # so it raises, with the daemon's word on what to do, and does not reconnect.
    d.stop()
    d.start()
    stale = mr.Client(d.sock, 0, 2, job="train", cursor=old, register_cuda=False)
    while stale.next_batch(timeout=60).step < at + 1:
        pass
    bringer = mr.Client(d.sock, 1, 2, job="train", cursor=new, register_cuda=False)
    assert bringer.next_batch(timeout=60).step == at + 3
    with pytest.raises(mr.DaemonError) as e:
        while True:
            assert stale.next_batch(timeout=60).step < at + 4
    assert e.value.code == "cursor" and "resume from a checkpoint" in e.value.message
    assert stale.reconnects == 0
    stale.close()
    bringer.close()


# ---------------------------------------------------------------------------- processes


def test_close_from_a_signal_handler_during_next_batch_says_closed(daemons, tmp_path):
    """A trainer's signal handler (a graceful-shutdown SIGTERM, here SIGALRM) runs inside
    next_batch's poll and may close the client. The wait then went on over the dropped
    connection: TypeError ("a bytes-like object is required, not 'NoneType'"), or a
    ProtocolError about the closed ready_fd. It now raises MillraceError: closed."""
    d = daemons(write_corpus(tmp_path / "handler")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    assert c.next_batch(timeout=60).step == 0
    conn = c._conn
    os.kill(d.pid, signal.SIGSTOP)  # nothing more is published: the next call waits

    def handler(*_):
        os.kill(d.pid, signal.SIGCONT)  # so close()'s BYE is answered at once
        c.close()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        wait_until(lambda: stopped(d.pid), 30, "the daemon's threads to stop")
        while conn.published() > c._next_step:
            c.next_batch(timeout=10)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(mr.MillraceError, match="closed"):
            c.next_batch(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.kill(d.pid, signal.SIGCONT)
    assert c._closed and c._conn is None


def test_a_close_interrupted_by_ctrl_c_still_closes_its_fds(daemons, tmp_path):
    """close() says BYE and waits (up to 5 s) for the daemon's EOF; a KeyboardInterrupt
    there (a second Ctrl-C while a stalled daemon has not answered) left the connection
    unhooked but its ready fd open, for good: close() again did nothing."""
    d = daemons(write_corpus(tmp_path / "ctrl-c")).start()
    gc.collect()
    before = sorted(os.listdir("/proc/self/fd"))
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    assert c.next_batch(timeout=60).step == 0
    os.kill(d.pid, signal.SIGSTOP)  # BYE goes unanswered

    old = signal.signal(signal.SIGALRM, _raise_keyboard_interrupt)
    try:
        wait_until(lambda: stopped(d.pid), 30, "the daemon's threads to stop")
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            c.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.kill(d.pid, signal.SIGCONT)
    c.close()
    del c
    gc.collect()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_second_thread_inside_next_batch_is_refused(daemons, tmp_path):
    """The client is not thread safe. A second thread calling next_batch while one waits
    inside it raced for the same slot and poller: a ProtocolError that blamed the daemon
    ("slot 3 holds step 3 where step 7 was expected"), "concurrent poll() invocation",
    or the same step twice. It is now refused at once, naming the misuse, and the
    waiting call goes on."""
    d = daemons(write_corpus(tmp_path / "threads")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    assert c.next_batch(timeout=60).step == 0
    conn = c._conn
    os.kill(d.pid, signal.SIGSTOP)  # nothing more is published: the next call waits
    got = []
    waiter = None
    try:
        wait_until(lambda: stopped(d.pid), 30, "the daemon's threads to stop")
        while conn.published() > c._next_step:
            c.next_batch(timeout=10)
        step = c._next_step
        waiter = threading.Thread(target=lambda: got.append(c.next_batch(timeout=60).step))
        waiter.start()
        wait_until(c._busy.locked, 30, "the first thread inside next_batch")
        with pytest.raises(mr.MillraceError, match="another thread is inside next_batch"):
            c.next_batch(timeout=5)
    finally:
        os.kill(d.pid, signal.SIGCONT)
        if waiter is not None:
            waiter.join(60)
    assert got == [step]
    assert c.next_batch(timeout=60).step == step + 1
    c.close()
    # A client not yet connected still pickles (to a spawned worker), guard and all.
    fresh = pickle.loads(pickle.dumps(mr.Client(d.sock, 1, 4, register_cuda=False)))
    assert fresh.next_batch(timeout=60).step == 0
    # A connected one (reading `domains` connects) is refused plainly, not as pickle's
    # "cannot pickle 'socket' object".
    for dump in (pickle.dumps, copy.deepcopy):
        with pytest.raises(mr.MillraceError, match="a connected millrace.Client cannot be"):
            dump(fresh)
    assert fresh.next_batch(timeout=60).step == 1
    fresh.close()


def _interrupt_where(when, call) -> tuple:
    """Runs ``call`` with a trace function that raises KeyboardInterrupt at the first
    trace event (frame, event) for which ``when`` holds, as a Ctrl-C whose handler runs
    at that point would; returns (function, line) where it was raised."""
    fired = []

    def tracer(frame, event, arg):
        if not fired and when(frame, event):
            fired.append((frame.f_code.co_name, frame.f_lineno))
            raise KeyboardInterrupt
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        sys.settrace(old)
    assert fired, "the point to interrupt was never reached"
    return fired[0]


def test_a_ctrl_c_just_after_the_thread_guard_is_taken_does_not_leave_it_held(daemons,
                                                                            tmp_path):
    """connect and next_batch took the thread guard in a call before their try: a
    KeyboardInterrupt landing between the acquire and the try (a signal handler runs at
    the first check after the acquire's call returns) left it held, and every later call
    was refused as "another thread is inside next_batch" (an interrupted notebook cell
    could not read again). The interrupt is raised here at the first Python-level point
    after the guard is taken, which is now inside the region that lets it go."""
    d = daemons(write_corpus(tmp_path / "guard")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    for call in (c.connect, lambda: c.next_batch(timeout=60)):
        _interrupt_where(lambda frame, event: c._busy.locked(), call)
        assert not c._busy.locked()
    assert c.next_batch(timeout=60).step == 0
    c.close()


def test_a_ctrl_c_as_a_connection_is_stored_leaves_the_client_usable(daemons, tmp_path):
    """_open stored the new connection, then called os.getpid() before it stored the
    WELCOME and the start step: a KeyboardInterrupt at the check after that call (raised
    here at the first line that sees the connection stored) left a connection with no
    step, and every later call raised TypeError ("'>' not supported between instances
    of 'int' and 'NoneType"). The client now reads on from step 0."""
    d = daemons(write_corpus(tmp_path / "open")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    code = mr.Client._open.__code__
    _interrupt_where(lambda frame, event: frame.f_code is code and event == "line"
                     and c._conn is not None, lambda: c.next_batch(timeout=60))
    assert [c.next_batch(timeout=60).step for _ in range(3)] == [0, 1, 2]
    c.close()


def test_a_ctrl_c_just_before_a_connection_is_stored_leaks_no_fd(daemons, tmp_path):
    """Between the WELCOME's fds becoming the new connection's and the connection being
    stored, _open makes several calls (os.getpid(), int(), the start-step checks): a
    KeyboardInterrupt at one of them dropped the connection unstored, and with it its
    ready eventfd, open for good (one fd per interrupt; the socket and the mappings close
    as their objects go). Raised here at the check after os.getpid() (the first line
    that sees its result); the client then reads on, and closing it leaves no fd
    behind."""
    d = daemons(write_corpus(tmp_path / "leak")).start()
    gc.collect()
    before = sorted(os.listdir("/proc/self/fd"))
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=5, register_cuda=False)
    code = mr.Client._open.__code__
    _interrupt_where(lambda frame, event: frame.f_code is code and event == "line"
                     and "pid" in frame.f_locals and c._conn is None,
                     lambda: c.next_batch(timeout=60))
    assert [c.next_batch(timeout=60).step for _ in range(3)] == [0, 1, 2]
    c.close()
    del c
    gc.collect()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_close_while_connecting_leaves_no_connection_behind(daemons, tmp_path):
    """close() from a signal handler (a graceful-shutdown SIGTERM) or another thread
    while next_batch connects found no connection to close yet, and _open then stored
    the new one in the closed client: next_batch handed out a batch of a closed client,
    and the connection stayed open with no way to close it (close() again did nothing),
    holding the rank: a new client of it was refused `duplicate`. The close is run
    here at the check after a call inside _open; the connection is now dropped with a
    BYE and next_batch says the client was closed."""
    d = daemons(write_corpus(tmp_path / "closing")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    code = mr.Client._open.__code__
    closed = []

    def closer(frame, event, arg):
        if frame.f_code is code and event == "line" and "pid" in frame.f_locals \
                and not closed:
            closed.append(frame.f_lineno)
            c.close()
        return closer

    sys.settrace(closer)
    try:
        with pytest.raises(mr.MillraceError, match="closed"):
            c.next_batch(timeout=60)
    finally:
        sys.settrace(None)
    assert closed and c._closed and c._conn is None
    with mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False) as again:
        assert again.next_batch(timeout=60).step == 0


def test_a_long_wait_for_a_step_is_said_on_the_trainer_side(daemons, tmp_path, caplog,
                                                           monkeypatch):
    """A rank announced with two replicas whose second never joins stops once its ring
    is full, and next_batch waited with no word: the trainer hung silently while `millrace
    status` knew why. It now warns after a while, and again at twice as long, naming the
    job, the rank and the step, and pointing at `millrace status`."""
    monkeypatch.setattr(mr.client, "_SLOW_WAIT_WARN", 0.3)
    d = daemons(write_corpus(tmp_path / "slow-wait")).start()
    c = mr.Client(d.sock, 0, 1, job="lonely", replicas=2, register_cuda=False)
    assert [c.next_batch(timeout=60).step for _ in range(4)] == [0, 1, 2, 3]
    caplog.set_level(logging.WARNING, logger="millrace")
    with pytest.raises(TimeoutError):
        c.next_batch(timeout=1.0)
    said = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
    # At 0.3 s and 0.6 s of the 1 s wait (1.2 s is past it, unless the machine stalled).
    assert 2 <= len(said) <= 3, said
    waited = [float(m.split("has waited ")[1].split(" s")[0]) for m in said]
    assert 0.3 <= waited[0] < waited[1] and waited[1] >= 0.6, said
    assert "job 'lonely' dp_rank 0" in said[0] and "for step 4" in said[0], said
    assert "millrace status" in said[0], said
    c.close()


def test_a_close_from_another_thread_while_next_batch_waits_does_not_reconnect(daemons,
                                                                             tmp_path,
                                                                             caplog):
    """close() from another thread sets the client closed, says BYE and waits for the
    daemon's EOF before it lets go of the ring. That EOF woke the thread waiting in
    next_batch first, which took it for a lost daemon and reconnected: a whole new HELLO
    with the cursor, a new ring built by the daemon, before it noticed the close ("the
    client was closed while it connected"). The closing thread is held here after the
    EOF, before it lets go of the ring, until the waiter is done: the waiter now says
    the client was closed while it waited, and nothing more reaches the daemon."""
    d = daemons(write_corpus(tmp_path / "thread-close")).start()
    # The second replica never joins: the ring stops once its 4 slots hold steps 0-3
    # (a slot is refilled when both replicas released it), so the 5th call waits.
    c = mr.Client(d.sock, 0, 1, job="closing", replicas=2, reconnect_timeout=60,
                  register_cuda=False)
    assert [c.next_batch(timeout=60).step for _ in range(4)] == [0, 1, 2, 3]
    got = []

    def wait():
        try:
            got.append(c.next_batch(timeout=60))
        except Exception as e:  # noqa: BLE001 - what the waiter met is the result
            got.append(e)

    waiter = threading.Thread(target=wait)
    drop = mr.Client._drop_conn.__code__
    lines, first = inspect.getsourcelines(mr.Client._drop_conn)
    let_go = first + next(i for i, line in enumerate(lines) if "conn.close_fds()" in line)
    held = []

    def hold_after_the_eof(frame, event, arg):
        if frame.f_code is drop and event == "line" and frame.f_lineno == let_go:
            held.append(frame.f_lineno)
            waiter.join(60)
        return hold_after_the_eof

    def close():
        sys.settrace(hold_after_the_eof)
        try:
            c.close()
        finally:
            sys.settrace(None)

    waiter.start()
    wait_until(c._busy.locked, 30, "the waiter inside next_batch")
    time.sleep(0.2)  # into its poll
    closer = threading.Thread(target=close)
    closer.start()
    closer.join(60)
    waiter.join(60)
    assert held and not closer.is_alive() and not waiter.is_alive()
    assert len(got) == 1 and isinstance(got[0], mr.MillraceError), got
    assert "closed while next_batch waited for step 4" in str(got[0])
    assert not [r for r in caplog.records if "reconnect" in r.getMessage()]
    assert c._closed and c._conn is None
    d.stop()
    joined = [line for line in d.log.read_text().splitlines()
              if "client joined" in line and "job=closing" in line]
    assert len(joined) == 1, joined


def test_a_close_from_another_thread_ends_a_reconnect_at_once(daemons, tmp_path):
    """A next_batch retrying the connection to a daemon that went away went on retrying
    after another thread closed the client, until reconnect_timeout (and a daemon back
    meanwhile got a HELLO from the closed client). It now stops at its next pass."""
    d = daemons(write_corpus(tmp_path / "retry-close")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=20, register_cuda=False)
    assert c.next_batch(timeout=60).step == 0
    d.kill()
    conn = c._conn
    while conn.published() > c._next_step:  # what the ring holds is read first
        c.next_batch(timeout=10)
    got = []

    def wait():
        try:
            got.append(c.next_batch(timeout=60))
        except Exception as e:  # noqa: BLE001 - what the waiter met is the result
            got.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: c._retry_since is not None, 30, "the waiter retrying")
    time.sleep(0.3)  # a few passes
    t0 = time.monotonic()
    c.close()
    waiter.join(20)
    assert not waiter.is_alive()
    assert time.monotonic() - t0 < 2
    assert len(got) == 1 and isinstance(got[0], mr.MillraceError), got
    assert "closed" in str(got[0])


def test_a_ctrl_c_as_a_batch_is_taken_never_hands_out_a_released_slot(daemons, tmp_path):
    """_take queued the batch for release before it moved the stream on: a
    KeyboardInterrupt at the check after that call (raised here at the next line) left a
    batch queued that no caller had, with the stream still at its step. The next call
    released it and took the same step from the same slot, which the daemon then
    refilled under the trainer: "step 1" held step 5's tokens. Now the stream moves on
    first: the interrupted call's batch is skipped, every batch handed out holds its own
    step's data, and the slot of the one held is not refilled."""
    d = daemons(write_corpus(tmp_path / "take")).start()
    ref = mr.Client(d.sock, 1, 4, register_cuda=False)
    want = [ref.next_batch(timeout=60).tokens.copy() for _ in range(12)]
    ref.close()
    c = mr.Client(d.sock, 1, 4, reconnect_timeout=0, register_cuda=False)
    assert (c.next_batch(timeout=60).tokens == want[0]).all()
    take = mr.Client._take.__code__

    def after_the_append(frame, event):
        return frame.f_code is take and event == "line" and "self._outstanding.append(" \
            in linecache.getline(take.co_filename, frame.f_lineno - 1)

    _interrupt_where(after_the_append, lambda: c.next_batch(timeout=60))
    for _ in range(3):
        b = c.next_batch(timeout=60)
        conn = c._conn
        # The daemon fills every slot it was given back; then the batch is compared.
        wait_until(lambda: conn.published() >= conn.done + conn.slots, 30, "a full ring")
        assert (b.tokens == want[b.step]).all(), f"step {b.step} holds another step's tokens"
        assert c.state_dict()["step"] == b.step
    c.close()


def test_a_ctrl_c_as_a_batch_is_retired_still_makes_it_stale(daemons, tmp_path):
    """A batch past `hold` is retired (StaleBatch on access, since the daemon refills its
    slot). next_batch took it off the queue before retiring it: a KeyboardInterrupt
    between the two (raised here as _retire is called) left it neither queued nor stale,
    and once the daemon refilled its slot its views read another step's tokens silently.
    It is now retired before it leaves the queue."""
    d = daemons(write_corpus(tmp_path / "retire")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    b0 = c.next_batch(timeout=60)
    retire = mr.Client._retire.__code__
    _interrupt_where(lambda frame, event: frame.f_code is retire and event == "call",
                     lambda: c.next_batch(timeout=60))
    assert [c.next_batch(timeout=60).step for _ in range(2)] == [1, 2]
    conn = c._conn
    wait_until(lambda: conn.published() >= conn.done + conn.slots, 30, "a full ring")
    assert conn.published() > conn.slots  # step 0's slot holds a later step now
    with pytest.raises(mr.StaleBatch, match="step 0 was released"):
        b0.tokens
    c.close()


class SplitProxy(Silent):
    """A unix socket in front of a daemon that forwards every byte both ways (with the
    fds WELCOME carries), one thread per direction of each connection. ``cut(n)`` makes
    it pass on only the first ``n`` bytes the daemon sends next and keep the rest, so a
    client is left inside a frame, until ``let_go()``."""

    def __init__(self, path, upstream):
        self.upstream = str(upstream)
        self._cut = None
        self._resume = threading.Event()
        self.client_side = None  # the socket to the client of the connection cut
        super().__init__(path)

    def cut(self, n: int):
        self._resume.clear()
        self._cut = n

    def let_go(self):
        self._resume.set()

    def unread(self) -> int:
        """Bytes passed on to the client of the cut connection that it has not read yet
        (SIOCOUTQ of a unix socket)."""
        out = fcntl.ioctl(self.client_side.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return struct.unpack("i", out)[0]

    def accepted(self, down):
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(self.upstream)
        except OSError:  # no daemon now: the client sees EOF and retries
            up.close()
            down.close()
            return
        threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(up, down, True), daemon=True).start()

    def _pump(self, src, dst, from_daemon):
        try:
            while True:
                data, fds, _flags, _addr = socket.recv_fds(src, 65536, 8)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if from_daemon and self._cut is not None:
                    n, self._cut = self._cut, None
                    self.client_side = dst
                    dst.sendall(data[:n])
                    self._resume.wait(60)
                    data = data[n:]
                if fds:
                    socket.send_fds(dst, [data], fds)
                    for fd in fds:
                        os.close(fd)
                elif data:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if from_daemon:  # the connection ends with the daemon's side
                src.close()
                dst.close()

    def close(self):
        super().close()
        self._resume.set()


@pytest.mark.parametrize("cut", [2, 4, 7], ids=["in-the-length", "after-the-length",
                                                "in-the-body"])
def test_a_ctrl_c_inside_a_frame_never_misparses_the_rest(daemons, tmp_path, short_dir, cut):
    """A real SIGINT while the client reads a frame the daemon sends in pieces (a proxy
    passes on ``cut`` bytes of its ERROR `shutdown` and holds the rest) left the socket
    inside the frame: the next call read the rest as a frame header and raised
    ProtocolError ("the daemon sent a frame of length 1701080931") instead of
    reconnecting to the restarted daemon. Now the interrupted read ends the connection,
    and the next call reconnects and reads on at the exact step."""
    d = daemons(write_corpus(tmp_path / "cut", extra_serve="drain_timeout_ms = 100")).start()
    ref = mr.Client(d.sock, 1, 4, register_cuda=False)
    want = [ref.next_batch(timeout=60).tokens.copy() for _ in range(12)]
    ref.close()
    proxy = SplitProxy(short_dir / "proxy.sock", d.sock)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        c = mr.Client(short_dir / "proxy.sock", 1, 4, reconnect_timeout=30,
                      register_cuda=False)
        assert (c.next_batch(timeout=60).tokens == want[0]).all()
        conn = c._conn
        proxy.cut(cut)  # the next bytes from the daemon: its ERROR shutdown
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(30)
        while conn.published() > c._next_step:  # what it published is still read
            b = c.next_batch(timeout=10)
            assert (b.tokens == want[b.step]).all()
        main = threading.main_thread().ident
        # Once the client has read the bytes passed on, it is inside the frame (the rest
        # is held back) until the interrupt.
        ctrl_c = threading.Thread(target=lambda: (
            wait_until(lambda: proxy.client_side is not None and proxy.unread() == 0, 30,
                       "the client to read the first part"),
            signal.pthread_kill(main, signal.SIGINT)))
        ctrl_c.start()
        with pytest.raises(KeyboardInterrupt) as e:
            c.next_batch(timeout=30)
        ctrl_c.join()
        assert any(entry.name == "_recv_exact" for entry in e.traceback)
        proxy.let_go()
        d.proc = None
        d.start()
        step = c._next_step
        for s in range(step, step + 3):
            b = c.next_batch(timeout=60)
            assert b.step == s and (b.tokens == want[s]).all()
        assert c.reconnects == 1
        c.close()
    finally:
        signal.signal(signal.SIGINT, old)
        proxy.close()


def test_a_release_frame_interrupted_while_the_socket_is_full_is_not_sent_in_part():
    """What the client relies on for its writes (module docstring, "Faults"): a RELEASE
    frame (13 bytes) goes out whole or not at all, so a Ctrl-C never leaves half of one
    on the connection. A unix stream socket whose buffer is full (the smallest
    SO_SNDBUF, a peer that does not read) makes _send wait for room; the interrupt
    (SIGALRM raising KeyboardInterrupt) ends the wait having sent nothing, every time,
    and the peer reads whole frames only."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    old = signal.signal(signal.SIGALRM, _raise_keyboard_interrupt)
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
        frame = mr.client.encode_frame(mr.client.RELEASE, struct.pack("<Q", 7))
        assert len(frame) == 13
        a.setblocking(False)
        queued = 0
        with pytest.raises(BlockingIOError):
            while True:
                a.send(frame)
                queued += 1
        a.setblocking(True)
        for _ in range(3):
            signal.setitimer(signal.ITIMER_REAL, 0.05)
            with pytest.raises(KeyboardInterrupt):
                mr.client._send(a, frame)
        b.setblocking(False)
        got = b""
        with pytest.raises(BlockingIOError):
            while True:
                got += b.recv(65536)
        assert queued > 0 and got == frame * queued
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        a.close()
        b.close()


def _raise_keyboard_interrupt(*_):
    raise KeyboardInterrupt


def test_a_forked_child_refuses_the_parents_connection_and_leaves_it_alone(daemons,
                                                                           tmp_path):
    """After os.fork() (a DataLoader worker started with fork) the child shares the
    parent's socket, ring and release page. The child's next_batch used to read the
    parent's stream and release its slots, and its close() (or its garbage collection at
    exit) said BYE on the parent's connection: the daemon dropped the parent, whose next
    call failed with DaemonGone (reconnect_timeout=0). Now the child is refused, naming
    the fork, and its close lets go of its own fd copies only."""
    d = daemons(write_corpus(tmp_path / "fork")).start()
    c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
    assert c.next_batch(timeout=60).step == 0
    page = c._conn.page
    assert page is not None and int(page[0]) == 0
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            try:
                c.next_batch(timeout=5)
            except mr.MillraceError as e:
                status = 0 if "fork" in str(e) and "new Client" in str(e) else 2
            try:
                c.release_all()
                status = status or 3
            except mr.MillraceError:
                pass
            c.close()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert int(page[0]) == 0, "the child released the parent's slots"
    assert [c.next_batch(timeout=60).step for _ in range(12)] == list(range(1, 13))
    assert c.reconnects == 0 and c.connected
    c.close()


def test_a_batch_held_at_a_fork_keeps_its_data_in_the_child(daemons, tmp_path):
    """A batch handed out before os.fork() (a process forked to write an async
    checkpoint, a DataLoader worker started with fork) and every array taken out of it
    are views of the ring, which a fork shares rather than copies: once the parent moved
    on, the daemon refilled the slot, and an array taken before the fork read another
    step's tokens in the child, silently; the batch itself was refused (StaleBatch),
    though the parent still held it at the fork. Now the slots of the batches held at a
    fork are copied for the child: both read the batch as it was, for as long as the
    child likes. A batch released before the fork stays stale there."""
    d = daemons(write_corpus(tmp_path / "forkbatch", ring_slots=2)).start()
    c = mr.Client(d.sock, 0, 2, register_cuda=False)
    b0 = c.next_batch(timeout=60)
    b1 = c.next_batch(timeout=60)  # b0 is released (hold=1)
    tokens, positions = b1.tokens, b1.position_ids  # a view, a derived array
    want, want_pos = tokens.copy(), positions.copy()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        status = 1
        try:
            os.close(go_w)
            os.read(go_r, 1)  # the parent moved on: the slot of b1 was refilled
            if not (tokens == want).all():
                status = 4  # another step's data, silently
            else:
                try:
                    ok = (b1.step == 1 and not b1.released and (b1.tokens == want).all()
                          and (b1.position_ids == want_pos).all()
                          and (b1.copy().labels == b1.labels).all())
                    status = 0 if ok else 3
                except mr.StaleBatch:
                    status = 2
                c.close()  # the parent's connection: the child's copy of b1 stays
                if status == 0 and not (b1.tokens == want).all():
                    status = 6
                try:
                    b0.tokens
                    status = status or 5
                except mr.StaleBatch:
                    pass
        finally:
            os._exit(status)
    os.close(go_r)
    for step in range(2, 7):  # a 2-slot ring: slot 1 holds step 3, then 5 (or 7)
        assert c.next_batch(timeout=60).step == step
    conn = c._conn
    wait_until(lambda: conn.published() >= 7, 30, "step 5 in the slot of step 1")
    assert struct.unpack_from("<Q", conn.mm, conn.slot_base[1])[0] in (5, 7)  # refilled
    assert not (tokens == want).all()  # the parent's view: the ring as it is now
    os.write(go_w, b"x")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(mr.StaleBatch):  # in the parent, b1 was released long ago
        b1.tokens
    c.close()


def test_a_dropped_client_closes_at_once_and_its_rank_can_connect_again(daemons, tmp_path):
    """A client dropped without close() (rebound each epoch, lost in an exception) must
    say BYE when its last reference goes. Its outstanding batches referred back to it, a
    cycle that kept it and its connection alive until a cyclic collection: a new client
    of the same rank was refused `duplicate` (after 3 s of retries with the default
    reconnect_timeout). Batches now refer to their client weakly."""
    d = daemons(write_corpus(tmp_path / "drop")).start()
    was = gc.isenabled()
    gc.disable()  # when the cyclic collector runs is up to allocation counts
    try:
        c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
        kept = c.next_batch(timeout=60)
        gone = weakref.ref(c)
        del c
        assert gone() is None, "the dropped client is still alive"
        assert kept.released
        with pytest.raises(mr.StaleBatch):
            kept.tokens
        c = mr.Client(d.sock, 0, 4, reconnect_timeout=0, register_cuda=False)
        assert c.next_batch(timeout=60).step == 0
        c.close()
    finally:
        if was:
            gc.enable()



def test_a_fallback_socket_dir_of_another_user_is_refused(monkeypatch):
    """The fallback socket /tmp/millrace-UID/millrace.sock is refused when its directory
    is not this user's own or is a symlink: another user could make it first in /tmp and
    listen there as an impostor daemon. (The uid is faked, so the directory this test
    makes belongs to "another user"; the impostor must see no connection.)"""
    fake = 4_000_000_000 - os.getpid() % 1000
    monkeypatch.setattr(mr.client.os, "geteuid", lambda: fake)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    d = f"/tmp/millrace-{fake}"
    os.mkdir(d)
    impostor = socket.socket(socket.AF_UNIX)
    try:
        impostor.bind(os.path.join(d, "millrace.sock"))
        impostor.listen(1)
        impostor.setblocking(False)
        with pytest.raises(PermissionError, match=f"{d} is owned by uid {os.getuid()}"):
            mr.Client(None, 0, 1).connect()
        # A control connection sends changes and trusts the replies: refused too.
        with pytest.raises(PermissionError, match=f"{d} is owned by uid {os.getuid()}"):
            mr.Control(None).status()
        with pytest.raises(BlockingIOError):
            impostor.accept()
    finally:
        impostor.close()
        os.unlink(os.path.join(d, "millrace.sock"))
        os.rmdir(d)
    os.symlink("/tmp", d)
    try:
        with pytest.raises(PermissionError, match="is a symlink"):
            mr.Client(None, 0, 1).connect()
    finally:
        os.unlink(d)
