"""The daemon (`millrace serve`) and the Python client (python/millrace) end to end: real
processes, real sockets, no mocks.

Every delivered array is compared, token for token, with what the independent reader in
serve_helpers rebuilds from the .bin/.idx files, the rows `millrace explain` names, and
the definitions of docs/PROTOCOL.md section 4.
"""

from __future__ import annotations

import fcntl
import gc
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import (
    Daemon,
    Expected,
    Worker,
    assert_records_equal,
    cursor_of,
    import_path_for_package,
    rec_dtype,
    record_of_batch,
    wait_until,
    write_corpus,
)

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

from millrace.client import (  # noqa: E402
    BYE,
    ERROR,
    HELLO,
    REFUSED,
    RELEASE,
    WELCOME,
    encode_frame,
    read_frame,
)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("serve_corpus"))


@pytest.fixture(scope="module")
def expected(millrace, corpus):
    return Expected(millrace, corpus)


@pytest.fixture
def daemons(millrace, short_dir, tmp_path):
    """Starts daemons on demand; kills every one (and checks for panics) at the end."""
    started = []

    def start(config, name="d"):
        d = Daemon(millrace.path, config, short_dir / f"{name}.sock", tmp_path / f"{name}.log")
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.kill()
    for d in started:
        d.assert_no_panic()


@pytest.fixture
def workers():
    """Worker processes; every one is SIGKILLed at the end."""
    made = []

    def make(tmp, name, **args):
        w = Worker(tmp, name, **args)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def client(d: Daemon, dp_rank=0, dp_size=4, **kw) -> "mr.Client":
    kw.setdefault("reconnect_timeout", 0)
    kw.setdefault("register_cuda", False)
    return mr.Client(d.sock, dp_rank, dp_size, **kw)


def take(c, n: int) -> np.ndarray:
    """n batches from a client as records."""
    rows = None
    out = None
    for k in range(n):
        b = c.next_batch(timeout=60)
        if out is None:
            rows = b.rows
            out = np.zeros(n, rec_dtype(rows))
        record_of_batch(b, out[k])
    return out


# ---------------------------------------------------------------------------- acceptance


def test_eight_client_processes_receive_exactly_the_plan(corpus, expected, daemons, workers,
                                                         tmp_path):
    """dp_size 4 x two TP peers each, 1000 steps, every array checked."""
    d = daemons(corpus)
    ws = []
    for r in range(4):
        for tp in ("tp0", "tp1"):
            ws.append(workers(tmp_path, f"r{r}{tp}", socket=str(d.sock), dp_rank=r, dp_size=4,
                              replica=tp, replicas=2, until=1000).start())
    for w in ws:
        w.wait(timeout=300)
    assert d.alive()
    for r in range(4):
        want = expected.records(0, 1000, r, 4)
        a, b = ws[2 * r].records(), ws[2 * r + 1].records()
        assert_records_equal(a, want, f"rank {r} tp0")
        assert_records_equal(b, want, f"rank {r} tp1")
        assert a.tobytes() == b.tobytes(), f"rank {r}: TP peers received different bytes"
    # The ranks' slices are disjoint parts of each global batch.
    assert len({ws[2 * r].records()["tokens"][5].tobytes() for r in range(4)}) == 4


# ---------------------------------------------------------------------------- resume


def test_resume_from_state_dict_continues_exactly(corpus, expected, daemons):
    d = daemons(corpus)
    with client(d, 1, 4, job="ref") as ref:
        reference = take(ref, 60)
    assert_records_equal(reference, expected.records(0, 60, 1, 4), "reference")

    a = client(d, 1, 4, job="a")
    assert a.state_dict() == {"cursor": None, "step": -1}
    first = take(a, 23)
    state = a.state_dict()
    a.close()
    assert state["step"] == 22 and state["cursor"] == cursor_of(first[-1])

    b = client(d, 1, 4, job="a")
    b.load_state_dict(state)
    # A checkpoint taken before the resumed client connects holds the same position (its
    # step used to be -1 beside the blob of step 22).
    assert b.state_dict() == state
    assert b.welcome["start_step"] == 23
    rest = take(b, 37)
    b.close()
    assert_records_equal(np.concatenate([first, rest]), reference, "resumed")
    # The blobs are a function of the plan position: equal to the uninterrupted run's.
    assert [cursor_of(x) for x in rest] == [cursor_of(x) for x in reference[23:]]

    # A fresh client given the cursor directly (hex works too), and a seek by step.
    with client(d, 1, 4, job="c", cursor=state["cursor"].hex()) as c:
        assert_records_equal(take(c, 5), reference[23:28], "cursor=hex")
    with client(d, 1, 4, job="e", start_step=40) as e:
        assert_records_equal(take(e, 5), reference[40:45], "start_step")
    with client(d, 1, 4, job="f") as f:
        f.load_state_dict({"cursor": None, "step": 49})
        assert_records_equal(take(f, 3), reference[50:53], "state without cursor")
    # A checkpoint whose cursor and step come from different points used to resume at
    # the blob's step silently; it is refused, naming both. The step -1 that a client not
    # yet connected saved beside a blob, and a state without a step, still resume.
    with client(d, 1, 4, job="g") as g:
        g.load_state_dict({"cursor": state["cursor"], "step": 30})
        with pytest.raises(mr.MillraceError, match="says step 30.*after step 22"):
            g.next_batch(timeout=60)
    for old in ({"cursor": state["cursor"], "step": -1}, {"cursor": state["cursor"]}):
        with client(d, 1, 4, job="h") as h:
            h.load_state_dict(old)
            assert_records_equal(take(h, 2), reference[23:25], f"resumed from {old.keys()}")


def test_hold_micro_batches_and_copies(corpus, expected, daemons):
    d = daemons(corpus)
    want = expected.records(0, 10, 0, 2)
    c = client(d, 0, 2, micro_batch_rows=1, micro_batches=4, hold=2)
    assert c.welcome["micro_batch_rows"] == 1 and c.welcome["rows"] == 4
    b0 = c.next_batch()
    keep = b0.copy()
    b1 = c.next_batch()
    assert not b0.released  # hold=2: still valid
    np.testing.assert_array_equal(b0.tokens, want["tokens"][0])
    b2 = c.next_batch()
    assert b0.released and not b1.released
    with pytest.raises(mr.StaleBatch):
        b0.tokens
    for b, w in ((b1, want[1]), (b2, want[2])):
        mbs = b.micro_batches()
        assert len(mbs) == 4
        for m, mb in enumerate(mbs):
            np.testing.assert_array_equal(mb.tokens, w["tokens"][m : m + 1])
            np.testing.assert_array_equal(mb.labels, w["labels"][m : m + 1])
            np.testing.assert_array_equal(mb.position_ids, w["position_ids"][m : m + 1])
            assert mb.loss_tokens == w["row_loss_tokens"][m]
            assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == 64
            assert mb.max_seqlen == np.diff(mb.cu_seqlens).max()
        # The micro-batches' boundaries, shifted back, are the step's.
        joined = np.concatenate([[0]] + [mb.cu_seqlens[1:] + 64 * m for m, mb in enumerate(mbs)])
        np.testing.assert_array_equal(joined, b.cu_seqlens)
        assert not b.tokens.flags.writeable
    c.close()
    assert b1.released and b2.released
    np.testing.assert_array_equal(keep.tokens, want["tokens"][0])
    assert keep.step == 0 and len(keep.cursor) > 0 and not keep.released


def test_four_hundred_domains_resume_and_report(daemons, tmp_path):
    """A run of 400 domains (numpy-written shards): its cursor blob is longer than a
    64 KiB frame holds as hex and its status longer than one such frame. A live change
    is taken, `status` answers, and a client resumed from its state dict continues
    exactly as an uninterrupted one."""
    from serve_helpers import write_megatron

    rng = np.random.default_rng(400)
    names = [f"d{k:03d}" for k in range(400)]
    for name in names:
        docs = [rng.integers(3, 30000, size=int(n)).astype(np.uint16)
                for n in rng.integers(5, 120, size=6)]
        write_megatron(tmp_path / name, docs, np.uint16)
    domains = "".join(f'[[corpus.domain]]\nname = "{n}"\nshards = ["{n}"]\n' for n in names)
    even = ", ".join(f"{n} = 1.0" for n in names)
    cfg = tmp_path / "many.toml"
    cfg.write_text(f"""[corpus]
{domains}
[plan]
seed = 3
seq_len = 64
global_batch_rows = 8
packing = "best_fit"
pad_token = 0
eod_token = 2
weights = {{ {even} }}

[serve]
socket = "unused.sock"
ring_slots = 4
""")
    d = daemons(cfg, "many")
    ctl = mr.Control(d.sock)
    weights = {n: (20.0 if n == "d007" else 1.0) for n in names}
    assert ctl.set_weights(weights, at_step=4)["ok"]
    status = ctl.status()
    assert len(json.dumps(status, separators=(",", ":"))) > mr.client.MAX_FRAME
    assert len(status["journal"]) == 1 and len(status["domains"]) == 400

    def batches(c, n):
        out = []
        for _ in range(n):
            b = c.next_batch(timeout=60)
            out.append((b.step, b.tokens.copy(), b.position_ids.copy(), b.cu_seqlens.copy(),
                        b.domain.copy(), bytes(b.cursor)))
        return out

    with client(d, 0, 2, job="ref") as ref:
        reference = batches(ref, 16)
    a = client(d, 0, 2, job="a")
    first = batches(a, 9)
    state = a.state_dict()
    a.close()
    assert 2 * len(state["cursor"]) > mr.client.MAX_FRAME, len(state["cursor"])
    b = client(d, 0, 2, job="a")
    b.load_state_dict(state)
    assert b.welcome["start_step"] == 9
    rest = batches(b, 7)
    b.close()
    for got, want in zip(first + rest, reference):
        assert got[0] == want[0]
        for x, y in zip(got[1:], want[1:]):
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, got[0]
    ctl.close()


# ---------------------------------------------------------------------------- faults


def test_killed_client_resumes_from_its_blob_while_others_stream(corpus, expected, daemons,
                                                                 workers, tmp_path):
    rng = np.random.default_rng(1234)
    d = daemons(corpus)
    until = 400
    ws = [workers(tmp_path, f"r{r}", socket=str(d.sock), dp_rank=r, dp_size=4, until=until,
                  pace=0.001).start() for r in range(4)]
    victim = ws[2]
    kill_at = int(rng.integers(20, 200))
    wait_until(lambda: victim.count() >= kill_at, 120, f"rank 2 reaching step {kill_at}")
    victim.kill()
    died_at = victim.count()
    assert died_at < until, "the victim finished before it could be killed"
    # The others are not held up by the dead rank.
    for w in ws[:2] + ws[3:]:
        w.wait(timeout=300)
    assert victim.count() == died_at
    victim.start(resume=True)
    victim.wait(timeout=300)
    for r, w in enumerate(ws):
        assert_records_equal(w.records(), expected.records(0, until, r, 4), f"rank {r}")
    assert d.alive()


@pytest.mark.parametrize("kill", ["daemon", "client+daemon", "daemon SIGTERM"])
def test_daemon_sigkill_and_restart_continue_exactly(corpus, expected, daemons, workers,
                                                     tmp_path, kill):
    seed = {"daemon": 5, "client+daemon": 6, "daemon SIGTERM": 8}[kill]
    rng = np.random.default_rng(seed)
    d = daemons(corpus)
    until = 300
    # Paced so that a rank which started a second before the slowest one is still about
    # 100 steps short of `until` when the slowest reaches `kill_at`: every rank is cut
    # off mid-stream, however the four worker processes happened to start.
    ws = [workers(tmp_path, f"r{r}", socket=str(d.sock), dp_rank=r, dp_size=4,
                  until=until, pace=0.01).start() for r in range(4)]
    kill_at = int(rng.integers(20, 100))
    wait_until(lambda: min(w.count() for w in ws) >= kill_at, 120,
               f"every client reaching step {kill_at}")
    victim = ws[1] if kill == "client+daemon" else None
    if kill == "daemon SIGTERM":
        d.stop()
        assert d.proc.returncode == 0, d.log_tail()
        assert not d.sock.exists(), "a clean shutdown leaves no socket behind"
    else:
        d.kill()
    if victim is not None:
        victim.kill()
    assert all(w.count() < until for w in ws), "a client finished before the kill"
    time.sleep(float(rng.uniform(0.0, 1.0)))
    d.start()
    if victim is not None:
        victim.start(resume=True)
    for w in ws:
        w.wait(timeout=300)
    for w in ws:
        r = w.args["dp_rank"]
        assert_records_equal(w.records(), expected.records(0, until, r, 4), w.name)
    reconnects = [w.stderr() for w in ws if w is not victim]
    assert all("reconnects 0" not in text for text in reconnects), reconnects


def test_tp_peers_at_different_steps_survive_a_daemon_restart(corpus, expected, daemons):
    """TP peers of one dp rank may be a few steps apart when the daemon dies. Whichever
    reconnects first, the restarted daemon starts the ring at the lowest step once every
    announced peer has joined, and each peer continues exactly where it stopped."""
    import threading

    d = daemons(corpus)
    want = expected.records(0, 12, 0, 4)
    tp0 = client(d, 0, 4, job="tp", replica="tp0", replicas=2, reconnect_timeout=30)
    tp1 = client(d, 0, 4, job="tp", replica="tp1", replicas=2, reconnect_timeout=30)
    got0, got1 = [take(tp0, 3)], [take(tp1, 5)]  # tp0 stopped after step 2, tp1 after 4
    d.kill()
    d.start()
    out, errors = {}, []

    def run(name, c, n):
        try:
            out[name] = take(c, n)
        except Exception as e:  # surfaced below, with the peer's name
            errors.append((name, e))

    ahead = threading.Thread(target=run, args=("tp1", tp1, 7))
    behind = threading.Thread(target=run, args=("tp0", tp0, 9))
    ahead.start()  # the peer ahead reconnects first
    time.sleep(0.5)
    behind.start()
    ahead.join(120)
    behind.join(120)
    assert not errors, errors
    got0.append(out["tp0"])
    got1.append(out["tp1"])
    assert_records_equal(np.concatenate(got0), want, "tp0")
    assert_records_equal(np.concatenate(got1), want, "tp1")


def test_a_peer_with_a_corrupt_blob_cannot_join_a_live_ring(corpus, daemons):
    """The blob of a peer joining a live ring is checked like any other: a flipped byte
    is refused with `cursor`, and the peer already streaming is not disturbed."""
    d = daemons(corpus)
    a = client(d, 1, 4, job="live", replica="a", replicas=1)
    first = take(a, 4)
    blob = bytearray(a.state_dict()["cursor"])
    blob[20] ^= 0xFF
    with pytest.raises(mr.Refused) as err:
        take(client(d, 1, 4, job="live", replica="b", replicas=1, cursor=bytes(blob),
                    reconnect_timeout=2), 1)
    assert err.value.code == "cursor", err.value
    assert len(take(a, 3)) == 3 and len(first) == 4


# ---------------------------------------------------------------------------- ring


def test_ring_fd_is_read_only_sealed_and_laid_out_as_documented(corpus, daemons):
    d = daemons(corpus)
    s = _raw(d.sock)
    s.sendall(_hello(job="layout", dp_rank=2, slot_layout="expanded"))
    fds = []
    kind, payload = read_frame(s, fds)
    assert kind == WELCOME and len(fds) == 2
    ring_fd, ready_fd = fds
    try:
        w = json.loads(payload)
        assert w["protocol"] == 2 and w["start_step"] == 0 and w["dp_rank"] == 2
        assert w["slot_layout"] == "expanded"
        assert (w["rows"], w["seq_len"], w["slots"]) == (2, 64, 4)
        assert w["domains"] == ["web", "code"] and w["token_dtype"] == "int32"
        assert w["slot_bytes"] % 4096 == 0 and w["slot_offset"] >= 4096
        assert w["ring_bytes"] >= w["slot_offset"] + w["slots"] * w["slot_bytes"]
        assert os.fstat(ring_fd).st_size == w["ring_bytes"]
        for name, f in w["fields"].items():
            assert f["offset"] % 64 == 0 and f["offset"] >= 256, (name, f)
        assert w["fields"]["cu_seqlens"]["shape"] == [2 * 64 + 1]
        # Read-only, sealed, no writable mapping possible.
        assert fcntl.fcntl(ring_fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        seals = fcntl.fcntl(ring_fd, 1034)  # F_GET_SEALS
        assert seals & 0x7 == 0x7, f"seals {seals:#x}: want SEAL|SHRINK|GROW"
        with pytest.raises(OSError):
            mmap.mmap(ring_fd, w["ring_bytes"], flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.write(ring_fd, b"x")
        assert os.readlink(f"/proc/self/fd/{ready_fd}") == "anon_inode:[eventfd]"
        ring = mmap.mmap(ring_fd, w["ring_bytes"], flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        magic, version, slots, slot_bytes, slot_offset, first = struct.unpack_from(
            "<8sIIQQQ", ring, 0)
        assert (magic, version, slots, slot_bytes, slot_offset, first) == (
            b"MRRING01", 1, 4, w["slot_bytes"], w["slot_offset"], 0)
        wait_until(lambda: struct.unpack_from("<Q", ring, 64)[0] >= 4, 60, "4 published steps")
        published = struct.unpack_from("<Q", ring, 64)[0]
        assert published == 4, "the daemon published past the ring's 4 slots"
        assert len(os.read(ready_fd, 8)) == 8  # the eventfd was signalled
        now = time.monotonic_ns()
        for step in range(4):
            base = w["slot_offset"] + step * w["slot_bytes"]
            (st, plan_step, rows, seq_len, cu_len, max_seqlen, loss_tokens, real_tokens,
             cursor_len, publish_ns) = struct.unpack_from("<QQIIIIQQI4xQ", ring, base)
            assert (st, plan_step, rows, seq_len) == (step, step, 2, 64)
            assert 0 < publish_ns <= now
            assert 0 < cursor_len <= w["fields"]["cursor"]["shape"][0]
        # Releasing frees slots for the next steps.
        s.sendall(encode_frame(RELEASE, struct.pack("<Q", 2)))
        wait_until(lambda: struct.unpack_from("<Q", ring, 64)[0] >= 6, 60, "steps 4 and 5")
        assert struct.unpack_from("<Q", ring, base - 3 * w["slot_bytes"])[0] == 4
        ring.close()
        s.sendall(encode_frame(BYE))
        assert _frames_until_eof(s) == []
    finally:
        for fd in fds:
            os.close(fd)
        s.close()


def test_peers_share_a_ring_and_a_slow_rank_stalls_only_itself(corpus, expected, daemons):
    d = daemons(corpus)
    want0 = expected.records(0, 12, 0, 4)
    tp0 = client(d, 0, 4, job="p", replica="tp0", replicas=2)
    got0 = [take(tp0, 4)]
    # The ring holds step 0 for the missing peer: no fifth step yet.
    with pytest.raises(TimeoutError):
        tp0.next_batch(timeout=1.0)
    # Another dp rank is not held up by rank 0, which holds its slots and does nothing.
    with client(d, 1, 4, job="p") as other:
        assert_records_equal(take(other, 30), expected.records(0, 30, 1, 4), "rank 1")
    tp1 = client(d, 0, 4, job="p", replica="tp1", replicas=2)
    got1 = [take(tp1, 6)]
    got0.append(take(tp0, 2))
    # tp1 leaves and rejoins with its blob while the ring still holds its next step.
    state = tp1.state_dict()
    tp1.close()
    tp1 = client(d, 0, 4, job="p", replica="tp1", replicas=2)
    tp1.load_state_dict(state)
    assert tp1.welcome["start_step"] == 6
    # One thread drives both peers: neither may run more than the ring ahead of the other.
    got1.append(take(tp1, 3))
    got0.append(take(tp0, 6))
    got1.append(take(tp1, 3))
    assert_records_equal(np.concatenate(got0), want0, "tp0")
    assert_records_equal(np.concatenate(got1), want0, "tp1")
    # A peer asking for a step the live ring no longer holds is refused.
    e = _refused(client(d, 0, 4, job="p", replica="tp2", replicas=2))
    assert e.code == "peer_position", e
    # So is one asking for a step ahead of the ring without the blob of that step.
    e = _refused(client(d, 0, 4, job="p", replica="tp2", replicas=2, start_step=100))
    assert e.code == "peer_position" and "without a cursor blob" in e.message, e
    # And one resuming with a blob much further on than peers of one rank ever are (it is
    # from another checkpoint): waiting for it would hold every job's live changes there.
    with client(d, 0, 4, job="probe", start_step=1500) as probe:
        far = probe.next_batch(timeout=60).cursor
    e = _refused(client(d, 0, 4, job="p", replica="tp2", replicas=2, cursor=far))
    assert e.code == "peer_position" and "further ahead" in e.message, e
    # The same two checkpoints in the other order: a peer far behind the one waiting is
    # refused too. It was taken (the answer hung on who came first), and the waiting peer
    # then held every job's first changeable step at its own while it got no batch.
    waiting = client(d, 0, 4, job="q", replica="tp1", replicas=2, cursor=far).connect()
    e = _refused(client(d, 0, 4, job="q", replica="tp0", replicas=2))
    assert e.code == "peer_position" and "further behind" in e.message, e
    waiting.close()
    tp0.close()
    tp1.close()


def test_releases_go_through_the_page_and_no_frame_while_the_next_step_is_ready(
        corpus, expected, daemons):
    """The client publishes its releases in its release page (docs/PROTOCOL.md section 5).
    A trainer slower than the daemon always finds its next step ready when it releases,
    so it sends no RELEASE frame at all in steady state (the daemon reads the page when it
    looks for free slots, or at its 2 ms backstop while the ring is full); a client
    without a page sends one per two steps. Both read the same steps."""
    from millrace.control import Control

    d = daemons(corpus)
    paged = client(d, 0, 4, job="pg")
    framed = client(d, 0, 4, job="fr", release_page=False)
    got, got_f = [], []
    for _ in range(40):
        got.append(take(paged, 1))
        got_f.append(take(framed, 1))
        time.sleep(0.003)  # the trainer's work: the daemon refills and waits on the page
    want = expected.records(0, 40, 0, 4)
    assert_records_equal(np.concatenate(got), want, "paged")
    assert_records_equal(np.concatenate(got_f), want, "framed")
    with Control(d.sock) as ctl:
        st = ctl.status()
    rings = {j["job"]: j["rings"][0] for j in st["jobs"]}
    pg, fr = rings["pg"], rings["fr"]
    assert pg["peers"][0]["release_page"] is True, pg
    assert fr["peers"][0]["release_page"] is False, fr
    # hold=1: the 40th batch is still held, every earlier one was released.
    assert pg["released_step"] == 39, pg
    assert pg["page_releases"] > 0, pg
    # None expected; a couple at most if the machine stalled the daemon for > 3 ms.
    assert pg["release_frames"] <= 2, pg
    assert fr["release_frames"] >= 10 and fr["page_releases"] == 0, fr
    paged.close()
    framed.close()


def test_hold_larger_than_the_ring_is_rejected(corpus, daemons):
    d = daemons(corpus)
    c = client(d, 0, 4, hold=5)
    with pytest.raises(ValueError, match="hold"):
        c.connect()
    c.close()


# ---------------------------------------------------------------------------- garbage


def _raw(sock_path, timeout=20.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    return s


def _frames_until_eof(s: socket.socket) -> list:
    """Reads frames until the daemon closes; returns [(type, payload)]. Closes fds."""
    frames = []
    while True:
        fds = []
        try:
            kind, payload = read_frame(s, fds)
        except mr.client._Gone:
            return frames
        finally:
            for fd in fds:
                os.close(fd)
        frames.append((kind, payload))


def _hello(**kw) -> bytes:
    h = {"protocol": mr.PROTOCOL_VERSION, "job": "raw", "dp_rank": 0, "dp_size": 4}
    h.update(kw)
    return encode_frame(HELLO, json.dumps(h).encode())


def _welcomed(sock_path, published_at_least=0, **kw) -> socket.socket:
    """A raw connection past its WELCOME (optionally until `published` reaches a step)."""
    s = _raw(sock_path)
    s.sendall(_hello(**kw))
    fds = []
    kind, payload = read_frame(s, fds)
    try:
        assert kind == WELCOME, payload
        if published_at_least:
            ring = mmap.mmap(fds[0], json.loads(payload)["ring_bytes"], prot=mmap.PROT_READ)
            wait_until(lambda: struct.unpack_from("<Q", ring, 64)[0] >= published_at_least,
                       60, "the ring to publish")
            ring.close()
    finally:
        for fd in fds:
            os.close(fd)
    return s


def test_garbage_closes_only_that_connection(corpus, expected, daemons, tmp_path):
    cfg = tmp_path / "fast_handshake.toml"
    cfg.write_text(corpus.read_text() + "handshake_timeout_ms = 1500\n")
    # Shards resolve against the config's directory.
    for ext in ("bin", "idx"):
        for dom in ("web", "code"):
            os.symlink(corpus.parent / f"{dom}.{ext}", tmp_path / f"{dom}.{ext}")
    d = daemons(cfg)
    idle = _raw(d.sock, timeout=30)  # never says HELLO
    good = client(d, 3, 4, job="good")
    got = [take(good, 5)]
    rng = np.random.default_rng(99)

    def attack(data: bytes, expect_type=None, code=None):
        s = _raw(d.sock)
        try:
            s.sendall(data)
        except OSError:
            pass  # the daemon may already have closed
        frames = _frames_until_eof(s)
        s.close()
        assert len(frames) <= 1, frames
        if expect_type is not None:
            assert frames and frames[0][0] == expect_type, (data[:40], frames)
            if code is not None:
                assert json.loads(frames[0][1])["code"] == code, frames
        assert d.alive()
        got.append(take(good, 3))  # the well-behaved client keeps streaming
        return frames

    attack(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
    attack(struct.pack("<I", 1 << 31) + b"\x01" * 16, ERROR, "protocol")
    attack(struct.pack("<I", 0), ERROR, "protocol")
    attack(struct.pack("<I", 65537) + b"\x01", ERROR, "protocol")
    attack(encode_frame(HELLO, b"{not json"), REFUSED, "bad_hello")
    attack(encode_frame(HELLO, b"[1, 2]"), REFUSED, "bad_hello")
    f = attack(_hello(dp_sise=4), REFUSED, "bad_hello")
    assert "dp_sise" in json.loads(f[0][1])["message"]
    # A client of protocol 1 (before compact slots) hears which version to use.
    f = attack(_hello(protocol=1), REFUSED, "protocol")
    assert "speaks protocol 2" in json.loads(f[0][1])["message"]
    attack(_hello(protocol=3), REFUSED, "protocol")
    attack(_hello(dp_rank=4), REFUSED, "bad_hello")
    attack(_hello(replicas=0), REFUSED, "bad_hello")
    attack(_hello(dp_rank="0"), REFUSED, "bad_hello")
    attack(encode_frame(RELEASE, struct.pack("<Q", 1)), ERROR)  # RELEASE before HELLO
    attack(encode_frame(9, b"x"), ERROR)
    s = _raw(d.sock)  # EOF inside a frame
    s.sendall(struct.pack("<I", 100) + b"\x01{")
    s.shutdown(socket.SHUT_WR)
    assert len(_frames_until_eof(s)) <= 1
    s.close()
    # Protocol errors after a WELCOME.
    for bad in (encode_frame(RELEASE, b"\x01\x02"),           # wrong payload size
                encode_frame(RELEASE, struct.pack("<Q", 10**9)),  # past published
                encode_frame(BYE, b"x"),
                _hello(),                                      # a second HELLO
                encode_frame(7, b"")):
        s = _welcomed(d.sock, job="raw2")
        s.sendall(bad)
        frames = _frames_until_eof(s)
        s.close()
        assert [k for k, _ in frames] == [ERROR], (bad, frames)
        got.append(take(good, 3))
    # RELEASE going backwards.
    s = _welcomed(d.sock, published_at_least=2, job="raw3")
    s.sendall(encode_frame(RELEASE, struct.pack("<Q", 2)))
    s.sendall(encode_frame(RELEASE, struct.pack("<Q", 1)))
    assert [k for k, _ in _frames_until_eof(s)] == [ERROR]
    s.close()
    # The idle connection was closed after the handshake timeout (1.5 s).
    assert [k for k, _ in _frames_until_eof(idle)] in ([ERROR], [])
    idle.close()
    got.append(take(good, 3))
    good.close()
    got = np.concatenate(got)
    assert_records_equal(got, expected.records(0, len(got), 3, 4), "the good client")
    assert d.alive()


# ---------------------------------------------------------------------------- refusals


def _refused(c) -> "mr.Refused":
    with pytest.raises(mr.Refused) as e:
        c.connect()
    c.close()
    return e.value


def test_refusals_name_the_problem(corpus, daemons, short_dir, tmp_path):
    d = daemons(corpus)
    e = _refused(client(d, 0, 3))
    assert e.code == "dp_size" and "3" in e.message and "8" in e.message, e

    e = _refused(client(d, 0, 4, micro_batch_rows=3))
    assert e.code == "layout" and "micro_batch_rows 3" in e.message, e
    # micro_batches alone: the refusal names it, not a micro_batch_rows never sent
    # (it read "micro_batch_rows 0 x micro_batches 3").
    e = _refused(client(d, 0, 4, micro_batches=3))
    assert e.code == "layout" and "micro_batches 3 does not divide" in e.message, e
    assert "micro_batch_rows" not in e.message, e

    a = client(d, 0, 4, job="j", replica="tp0", replicas=2, micro_batch_rows=2).connect()
    e = _refused(client(d, 0, 4, job="j", replica="tp1", replicas=2, micro_batch_rows=1,
                        micro_batches=2))
    assert e.code == "layout", e
    e = _refused(client(d, 1, 2, job="j"))
    assert e.code == "dp_size" and "2" in e.message and "4" in e.message, e
    e = _refused(client(d, 0, 4, job="j", replica="tp0", replicas=2))
    assert e.code == "duplicate" and "tp0" in e.message, e
    first = a.next_batch()
    blob = first.cursor
    a.close()

    fp = client(d, 0, 4, job="fp")
    real = fp.fingerprint
    fp.close()
    assert len(real) == 32
    e = _refused(client(d, 0, 4, fingerprint="0" * 32))
    assert e.code == "fingerprint" and real in e.message and "0" * 32 in e.message, e
    with client(d, 0, 4, job="fp2", fingerprint=real) as ok:
        assert ok.next_batch().step == 0

    corrupt = bytearray(blob)
    corrupt[len(corrupt) // 2] ^= 0x40
    e = _refused(client(d, 0, 4, job="k", cursor=bytes(corrupt)))
    assert e.code == "cursor", e
    e = _refused(client(d, 0, 4, job="k", cursor=blob[:10]))
    assert e.code == "cursor", e
    s = _raw(d.sock)
    s.sendall(_hello(cursor="zz"))
    frames = _frames_until_eof(s)
    s.close()
    assert frames[0][0] == REFUSED and json.loads(frames[0][1])["code"] == "cursor", frames

    # A blob of another plan (another seed) belongs to another config.
    other_dir = tmp_path / "other"
    other_cfg = write_corpus(other_dir, plan_seed=12)
    d2 = Daemon(d.binary, other_cfg, short_dir / "other.sock", tmp_path / "other.log").start()
    try:
        with client(d2, 0, 4) as o:
            foreign = o.next_batch().cursor
            assert o.fingerprint != real
    finally:
        d2.kill()
    e = _refused(client(d, 0, 4, job="k", cursor=foreign))
    assert e.code == "cursor" and "fingerprint" in e.message.lower(), e

    with client(d, 0, 4, job="k", cursor=blob) as ok:
        assert ok.next_batch().step == 1
    assert d.alive()


def test_an_out_of_vocabulary_id_reaches_python_as_the_daemons_error(daemons, tmp_path):
    """Issue 14, item 3: ids at or above `[plan] vocab_size` stop the ring with ERROR
    materialize; the client raises DaemonError carrying the daemon's code and message
    unchanged (shard, document and value), instead of handing the ids to the trainer."""
    cfg = write_corpus(tmp_path / "vocab")  # ids 3..30000
    cfg.write_text(cfg.read_text().replace("eod_token = 2", "eod_token = 2\nvocab_size = 1000"))
    d = daemons(cfg)
    with pytest.raises(mr.DaemonError) as e:
        with client(d, 0, 4) as c:
            for _ in range(10):
                c.next_batch(timeout=60)
    assert e.value.code == "materialize", e.value
    m = e.value.message
    assert "outside vocab_size 1000" in m and " document " in m and "has id " in m, m
    assert str(tmp_path / "vocab") in m, m
    assert str(e.value) == f"materialize: {m}"
    assert d.alive()


def test_client_limit_refuses_busy(corpus, daemons, tmp_path):
    cfg = tmp_path / "two_clients.toml"
    cfg.write_text(corpus.read_text() + "max_clients = 2\n")
    for ext in ("bin", "idx"):
        for dom in ("web", "code"):
            os.symlink(corpus.parent / f"{dom}.{ext}", tmp_path / f"{dom}.{ext}")
    d = daemons(cfg)
    a = client(d, 0, 4).connect()
    b = client(d, 1, 4).connect()
    e = _refused(client(d, 2, 4))
    assert e.code == "busy", e
    b.close()
    with client(d, 2, 4) as c:  # a freed place is taken again
        assert c.next_batch().step == 0
    a.close()


# ---------------------------------------------------------------------------- resources


def _memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:" in line for line in f)


def test_no_fd_or_shm_leak_over_200_connections(corpus, daemons):
    d = daemons(corpus)
    shm_before = sorted(os.listdir("/dev/shm"))
    daemon_base = d.steady_fd_count()
    gc.collect()
    own_base = len(os.listdir("/proc/self/fd"))
    maps_base = _memfd_maps()
    for i in range(200):
        kind = i % 5
        if kind == 0:  # refused
            with pytest.raises(mr.Refused):
                client(d, 0, 3).connect()
        elif kind == 1:  # a HELLO, then the socket just closes
            s = _welcomed(d.sock, job=f"abrupt{i}", dp_rank=i % 4)
            s.close()
        else:  # stream a little, with TP peers sometimes
            peers = [client(d, i % 4, 4, job=f"j{i % 3}", replica=f"tp{p}",
                            replicas=kind - 1) for p in range(kind - 1)]
            for c in peers:
                c.connect()
            for c in peers:
                c.next_batch(timeout=60)
            for c in peers:
                c.close()
        if i % 50 == 49:
            gc.collect()
            assert len(os.listdir("/proc/self/fd")) == own_base, "the client leaks fds"
    gc.collect()
    assert _memfd_maps() == maps_base, "the client leaks ring mappings"
    wait_until(lambda: d.fd_count() == daemon_base, 30,
               f"the daemon's fds to return to {daemon_base} (now {d.fd_count()})", poll=0.1)
    assert sorted(os.listdir("/dev/shm")) == shm_before
    assert d.alive()


# ---------------------------------------------------------------------------- layouts


FIELDS_ALL = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "domain",
              "row_loss_tokens")


def test_compact_slots_derive_exactly_the_expanded_arrays(corpus, expected, daemons):
    """The same steps read compact (the default) and expanded: tokens and labels are views
    of the rows, and every derived array, and each micro-batch's bounds, equal the expanded
    slot's (numpy; torch on the CPU when it is importable)."""
    d = daemons(corpus)
    want = expected.records(0, 40, 1, 4)
    mb = dict(micro_batch_rows=1, micro_batches=2)
    with client(d, 1, 4, job="cmp-c", **mb) as c, \
            client(d, 1, 4, job="cmp-e", slot_layout="expanded", **mb) as e:
        assert c.welcome["slot_layout"] == "compact" and e.welcome["slot_layout"] == "expanded"
        assert c.welcome["token_dtype"] == "uint16"  # the shards' own dtype
        # The arrays before the cursor field: fewer bytes compact (the slot strides may
        # round to the same pages, the cursor field's reserve being most of a tiny slot).
        cursor_at = [w.welcome["fields"]["cursor"]["offset"] for w in (c, e)]
        assert cursor_at[0] < cursor_at[1], cursor_at
        for k in range(40):
            bc, be = c.next_batch(timeout=60), e.next_batch(timeout=60)
            assert bc.step == be.step == k
            rows = bc._view("rows")
            assert bc.tokens.base is not None and np.shares_memory(bc.tokens, rows)
            assert np.shares_memory(bc.labels, rows)
            for name in FIELDS_ALL:
                np.testing.assert_array_equal(getattr(bc, name), getattr(be, name),
                                              err_msg=f"step {k} {name}")
            assert bc.cu_seqlens.dtype == np.int32 and bc.position_ids.dtype == np.int32
            assert bc.max_seqlen == be.max_seqlen == int(np.diff(bc.cu_seqlens).max())
            assert (bc.loss_tokens, bc.real_tokens) == (be.loss_tokens, be.real_tokens)
            assert int(bc.row_real_tokens.sum()) == bc.real_tokens
            assert bytes(bc.cursor) == bytes(be.cursor)
            np.testing.assert_array_equal(bc.tokens, want["tokens"][k])
            # Micro-batch bounds from the slot's row_bounds equal those cut from the
            # expanded slot's cu_seqlens, and those a client without row_bounds derives.
            assert bc._row_bounds() is not None and be._row_bounds() is None
            bounds = bc.micro_batch_bounds()
            assert bounds == be.micro_batch_bounds() and len(bounds) == 2
            bare = mr.Batch(bc.step, bc.plan_step, bc.rows, bc.seq_len, bc.cu_len,
                            bc.max_seqlen, 0, 0, 0, b"", 1, bc._views[:5], None, None,
                            "compact")
            assert bare._row_bounds() is None and bare.micro_batch_bounds() == bounds
            for mc, me in zip(bc.micro_batches(), be.micro_batches(), strict=True):
                np.testing.assert_array_equal(mc.cu_seqlens, me.cu_seqlens)
                assert mc.max_seqlen == me.max_seqlen
            kept = bc.copy()
            np.testing.assert_array_equal(kept.position_ids, be.position_ids)
            try:
                import torch
            except ImportError:
                continue
            from millrace.torch_adapter import _slot_bytes, derive_tensors

            tc, te = bc.to_torch(), be.to_torch()
            # The device ops of the CUDA path, run on the CPU over the slot's bytes.
            host, layout = _slot_bytes(bc)
            dev = derive_tensors(host, layout, bc.rows, bc.seq_len, bc.cu_len)
            for name in FIELDS_ALL:
                want_t = getattr(te, name).long()
                assert torch.equal(getattr(tc, name).long(), want_t), name
                assert torch.equal(dev[name].long(), want_t), name
        # A peer asking the other layout of a live ring is refused.
        with pytest.raises(mr.Refused) as r:
            client(d, 1, 4, job="cmp-c", replica="x", slot_layout="expanded").connect()
        assert r.value.code == "layout"


def test_derive_compact_on_a_hand_made_slot():
    """Two rows of 8 inputs: pieces of 3, 1 and 5 tokens (the last runs into the
    label-only position), then a 4-token piece and padding."""
    rows = np.array([[10, 11, 12, 20, 30, 31, 32, 33, 34],
                     [40, 41, 42, 43, 0, 0, 0, 0, 0]], dtype=np.uint16)
    starts = np.array([[0b00011001, 0], [0b00000001, 0]], dtype=np.uint8)
    got = mr.client.derive_compact(rows, starts, np.array([9, 4], dtype=np.int32), 8)
    np.testing.assert_array_equal(got["position_ids"].ravel(),
                                  [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(got["loss_mask"].ravel(),
                                  [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(got["cu_seqlens"], [0, 3, 4, 8, 12, 16])


# ---------------------------------------------------------------------------- torch


def test_torch_tensors_dataset_and_resume(corpus, expected, daemons):
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import MillraceIterableDataset, TorchClient

    d = daemons(corpus)
    want = expected.records(0, 12, 2, 4)
    # Expanded slots: int32 arrays; with copy=False each a zero-copy tensor over the ring,
    # by default a copy.
    with client(d, 2, 4, job="t", slot_layout="expanded") as c:
        b = c.next_batch()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the read-only warning is suppressed
            tb = b.to_torch(copy=False)
        assert tb.tokens.dtype == torch.int32 and tb.tokens.shape == (2, 64)
        assert tb.tokens.data_ptr() == b.tokens.__array_interface__["data"][0]  # zero copy
        own = b.to_torch()
        assert own.tokens.data_ptr() != tb.tokens.data_ptr()
        assert torch.equal(own.tokens, tb.tokens) and torch.equal(own.domain, tb.domain)
        np.testing.assert_array_equal(tb.tokens.numpy(), want["tokens"][0])
        np.testing.assert_array_equal(tb.cu_seqlens.numpy(), b.cu_seqlens)
        mbs = tb.micro_batches()
        assert len(mbs) == 1 and torch.equal(mbs[0]["cu_seqlens"], tb.cu_seqlens)

    tc = TorchClient(client(d, 2, 4, job="tc"), device="cpu", prefetch=2)
    steps = [next(tc) for _ in range(5)]
    assert [t.step for t in steps] == list(range(5))
    last = steps[-1]
    np.testing.assert_array_equal(last.labels.numpy(), want["labels"][4])
    state = tc.state_dict()
    assert state == {"step": 4, "cursor": last.cursor}  # not the prefetched batches'
    tc.close()

    ds = MillraceIterableDataset(d.sock, 2, 4, job="tc", register_cuda=False,
                                 reconnect_timeout=0)
    ds.load_state_dict(state)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    seen = []
    for item in loader:
        assert item["step"] == 5 + len(seen)
        np.testing.assert_array_equal(item["tokens"].numpy(), want["tokens"][item["step"]])
        np.testing.assert_array_equal(item["loss_mask"].numpy(), want["loss_mask"][item["step"]])
        seen.append(item["step"])
        if len(seen) == 7:
            break
    assert ds.state_dict()["step"] == 11
    ds.close()


def test_torch_cuda_copies_from_registered_ring(corpus, expected, daemons):
    """On a GPU, compact slots reach the device as one copy from the registered ring and
    every array equals explain's, both with the derivation replayed as a CUDA graph
    (which must then be in use, not fallen back) and kernel by kernel. The copies are
    counted by the profiler over 10 steps: exactly one host-to-device copy a step, each
    from page-locked memory (the registered ring), none from pageable memory."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch.profiler import ProfilerActivity, profile

    from millrace.torch_adapter import TorchClient

    d = daemons(corpus)
    want = expected.records(0, 20, 0, 4)
    for graphs in (True, False):
        c = client(d, 0, 4, job=f"cuda-{graphs}", register_cuda=True)
        tc = TorchClient(c, device="cuda", prefetch=1, cuda_graphs=graphs)
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        for k in range(20):
            if k == 10:  # past the registration, the capture and its check
                torch.cuda.synchronize()
                prof.start()
            # Each call past the first copies one step (the prefetched one's successor).
            tb = next(tc)
            assert tb.tokens.is_cuda and tb.step == k
            if k == 0:
                assert c._conn.cuda_ptr is not None, "the ring was not registered"
            for name in ("tokens", "labels", "loss_mask", "position_ids", "domain",
                         "row_loss_tokens"):
                np.testing.assert_array_equal(getattr(tb, name).cpu().numpy(),
                                              want[name][k], err_msg=f"{graphs} {k} {name}")
            np.testing.assert_array_equal(tb.cu_seqlens.cpu().numpy(),
                                          want["cu_seqlens"][k][: want["cu_len"][k]])
            assert tb.cu_seqlens.dtype == torch.int32
        torch.cuda.synchronize()
        prof.stop()
        # kineto names them "Memcpy HtoD (Pinned -> Device)", "Memcpy DtoH (...)".
        names = [e.name.lower() for e in prof.events()]
        h2d = [n for n in names if n.startswith("memcpy htod")]
        assert any(n.startswith("memcpy dtoh") for n in names), \
            f"the profiler recorded no CUDA copies at all (CUPTI unavailable?): {names[:20]}"
        assert h2d == ["memcpy htod (pinned -> device)"] * 10, (graphs, h2d)
        state = c._torch
        assert (not state.graphs_off and len(state.graphs) == 1) if graphs else \
            not state.graphs, "the CUDA graph was not used"
        conn = c._conn
        tc.close()
        assert conn.cuda_ptr is None
    # No error left behind for later CUDA work.
    x = torch.ones(1000, device="cuda")
    assert float((x * 2).sum()) == 2000.0
    torch.cuda.synchronize()


def test_gpu_check_counts_a_rust_ring_left_unpinned_as_a_problem():
    """scripts/gpu-check fails a device run whose ring was not registered (its copies
    pageable, 3-7x slower, the figures not the design's): it checked that for torch's
    path, but took a Rust `bench --gpu` or `consume --device` whose ring fell back to
    pageable as a pass."""
    import importlib.machinery
    import importlib.util

    path = Path(import_path_for_package()).parent / "scripts" / "gpu-check"
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(path))
    gpu_check = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check",
                                                                                loader))
    loader.exec_module(gpu_check)

    def rust(sweep, step, consume):
        return {"bench_gpu": {"pinning": sweep, "step": {"pinning": step}},
                "verify": {"copies": 50, "verified": 50, "same_digest": True},
                "consume_device": {"pinning": consume}}

    assert gpu_check.check_paths({}, rust("read_only", "read_only", "read_only")) == []
    for args, says in [(("pageable", "read_only", "read_only"), "bench --gpu sweep"),
                       (("read_only", "pageable", "read_only"), "bench --gpu per-step"),
                       (("read_only", "read_only", "plain"), "consume --device")]:
        problems = gpu_check.check_paths({}, rust(*args))
        assert len(problems) == 1 and says in problems[0] and "read-only" in problems[0], \
            problems
        # A `plain` ring is pinned (flag 0, read-write): its copies are not pageable.
        plain = "plain" in args
        assert ("pinned read-write" in problems[0]) == plain, problems
        assert ("pageable" in problems[0]) != plain, problems


def test_example_train_tiny_checkpoints_and_resumes(corpus, daemons, tmp_path):
    pytest.importorskip("torch")
    d = daemons(corpus)
    example = Path(import_path_for_package()) / "examples" / "train_tiny.py"
    ckpt = tmp_path / "ckpt.pt"
    env = dict(os.environ, PYTHONPATH=import_path_for_package())

    def run(steps):
        p = subprocess.run([sys.executable, str(example), "--socket", str(d.sock), "--steps",
                            str(steps), "--checkpoint", str(ckpt), "--device", "cpu",
                            "--vocab", "30001"],  # ids 3..30000; the config names no vocab_size
                           capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    out = run(4)
    assert "step 3 " in out and ckpt.exists()
    out = run(7)
    assert "resuming after step 3" in out and "step 4 " in out and "step 6 " in out
    assert "step 3 " not in out


def test_torch_client_checks_prefetch_and_a_pinned_ring_gives_cpu_copies(corpus, daemons):
    """TorchClient on a connected client refuses a prefetch its ring cannot hold (it
    would wait forever). CPU tensors with copy=False alias the ring, except while the
    ring is registered with CUDA: a view of pinned memory would let the trainer's own
    non_blocking copy read the slot after its release, so they are copies then."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import TorchClient

    d = daemons(corpus)
    with client(d, 0, 4, job="tc-hold") as c:
        c.connect()
        slots = c.welcome["slots"]
        with pytest.raises(ValueError, match="wait forever"):
            TorchClient(c, device="cpu", prefetch=slots)
        assert c.hold == 1
        b = c.next_batch()
        ring = np.frombuffer(c._conn.mm, dtype=np.uint8)
        lo = ring.__array_interface__["data"][0]

        def in_ring(t):
            return lo <= t.data_ptr() < lo + ring.nbytes

        # A compact slot: domain and row_loss_tokens are views of the ring (uint16 ids
        # are widened to int32, a copy), all copies by default.
        view, own = b.to_torch(copy=False), b.to_torch()
        assert in_ring(view.domain) and in_ring(view.row_loss_tokens)
        assert view.tokens.dtype == own.tokens.dtype == torch.int32
        assert not any(in_ring(getattr(own, k)) for k in ("tokens", "labels", "domain",
                                                          "row_loss_tokens"))
        # As _cuda_stream leaves it after a cudaHostRegister (no CUDA here to do it).
        c._conn.cuda_ptr = lo
        try:
            t = b.to_torch(copy=False)
            assert not any(in_ring(getattr(t, k)) for k in ("tokens", "labels", "domain"))
            assert torch.equal(t.tokens, torch.from_numpy(np.array(b.tokens)).to(t.tokens.dtype))
        finally:
            c._conn.cuda_ptr = None
        del ring


def _plan_records(d, host, ranks, steps=1, **kw):
    """plan_record of each of `ranks` (dp_size 4) on daemon `d`, one after another, each
    after reading `steps` batches."""
    from millrace.control import plan_record

    out = []
    for r in ranks:
        with client(d, r, 4, job=f"agree-{host}-{steps}", **kw) as c:
            for _ in range(steps):
                c.next_batch(timeout=60)
            out.append(plan_record(c, r, host))
    return out


def test_nodes_that_plan_differently_are_named(corpus, daemons):
    """Two daemons over one config write the same blob bytes at a step, so one job's
    ranks on two nodes agree; a node with other weights (same fingerprint) or another
    seed (another fingerprint) is named with its ranks and host, and so are ranks at
    different steps."""
    from millrace.control import plan_disagreement, plan_record

    text = corpus.read_text()
    heavier = corpus.parent / "heavier.toml"
    heavier.write_text(text.replace("web = 0.6, code = 0.4", "web = 0.7, code = 0.3"))
    reseeded = corpus.parent / "reseeded.toml"
    reseeded.write_text(text.replace("seed = 11", "seed = 12"))
    assert heavier.read_text() != text and reseeded.read_text() != text
    a, b = daemons(corpus, "node-a"), daemons(corpus, "node-b")
    c, s = daemons(heavier, "node-c"), daemons(reseeded, "node-d")

    same = _plan_records(a, "node-a", [0, 1]) + _plan_records(b, "node-b", [2, 3])
    assert len({r["state"] for r in same}) == 1 and same[0]["state"], same
    assert plan_disagreement(same) is None

    why = plan_disagreement(_plan_records(a, "node-a", [0, 1]) + _plan_records(c, "node-c", [2, 3]))
    assert why is not None and "same corpus and config" in why, why
    assert "ranks 0-1 (node-a)" in why and "ranks 2-3 (node-c)" in why, why

    other = _plan_records(s, "node-d", [3])
    why = plan_disagreement(same[:3] + other)
    assert why is not None and "different corpora or plan configs" in why, why
    assert same[0]["fingerprint"] in why and other[0]["fingerprint"] in why, why
    assert "ranks 0-2 (node-a, node-b)" in why and "ranks 3 (node-d)" in why, why

    why = plan_disagreement(same[:1] + _plan_records(b, "node-b", [1], steps=2))
    assert why is not None and "different steps" in why, why
    assert "step 0 on ranks 0 (node-a)" in why and "step 1 on ranks 1 (node-b)" in why, why

    # Before its first batch a client has nothing to compare, unless it resumes: then
    # its cursor is the checkpoint's, which every rank restored from.
    with client(a, 0, 4, job="agree-fresh") as fresh:
        with pytest.raises(ValueError, match="after the first batch"):
            plan_record(fresh, 0)
    blob = None
    with client(a, 0, 4, job="agree-src") as src:
        src.next_batch(timeout=60)
        blob = src.state_dict()
    with client(b, 2, 4, job="agree-resumed") as resumed:
        resumed.load_state_dict(blob)
        resumed.connect()  # the WELCOME says which step it resumes at
        r = plan_record(resumed, 2, "node-b")
        assert r["step"] == 0 and r["state"] is None and r["blob"], r
        # Beside ranks with a state, the blobs are compared: the same checkpoint agrees.
        assert plan_disagreement([dict(r, rank=0), dict(r, rank=1, state="1234")]) is None
        resumed.next_batch(timeout=60)
        after = plan_record(resumed, 2, "node-b")
        assert after["state"] == _plan_records(a, "node-a", [2], 2)[0]["state"], after


def test_nodes_whose_journals_differ_but_plan_alike_agree(corpus, daemons):
    """After a restart with a live change written into the config file, node a's rank
    resumes from a blob that carries the change (its daemon adopts it) and node b's
    from the file alone: their journals, and so their blobs, differ, but every batch is
    the same, so the plan state (by value) agrees and check_plans_agree passes."""
    from millrace.control import Control, plan_disagreement, plan_record

    at = 8
    text = corpus.read_text()
    old = "weights = { web = 0.6, code = 0.4 }"
    filed = corpus.parent / "filed.toml"
    filed.write_text(text.replace(old, (
        "schedule = [ { step = 0, weights = { web = 0.6, code = 0.4 } }, "
        f"{{ step = {at}, ramp = false, weights = {{ web = 0.7, code = 0.3 }} }} ]")))
    x = daemons(corpus, "before")
    with client(x, 0, 2, job="run") as c:
        c.next_batch(timeout=60)
        with Control(x.sock) as ctl:
            assert ctl.set_weights({"web": 0.7, "code": 0.3}, at_step=at)["applied_step"] == at
        while c.state_dict()["step"] < at - 1:
            c.next_batch(timeout=60)
        blob_with = c.state_dict()
    a, b = daemons(filed, "after-a"), daemons(filed, "after-b")
    with client(a, 0, 2, job="j") as ca:
        ca.load_state_dict(blob_with)
        ta = np.array(ca.next_batch(timeout=60).tokens, copy=True)
        rec_a = plan_record(ca, 0, "node-a")
        cursor_a = ca.state_dict()["cursor"]
    with client(b, 0, 2, job="j", start_step=at) as cb:
        tb = np.array(cb.next_batch(timeout=60).tokens, copy=True)
        rec_b = plan_record(cb, 0, "node-b")
        cursor_b = cb.state_dict()["cursor"]
    assert np.array_equal(ta, tb) and rec_a["step"] == rec_b["step"] == at
    assert cursor_a != cursor_b, "the blobs carry different journals"
    assert plan_disagreement([rec_a, dict(rec_b, rank=1)]) is None

    # The same adoption while another job on the daemon (an eval run) has streamed past
    # the change's step: its ring's cursor is restored under the adopted plan, which
    # plans its past alike, so the blob is adopted and both read on.
    c = daemons(filed, "after-c")
    with client(c, 0, 1, job="eval", start_step=20) as ev:
        ev.next_batch(timeout=60)
        time.sleep(0.5)  # the eval ring fills its slots and waits: its cursor stays old
        with client(c, 0, 2, job="j") as cc:
            cc.load_state_dict(blob_with)
            assert np.array_equal(np.array(cc.next_batch(timeout=60).tokens), ta)
            # A later live change restores that cursor under a plan two changes past
            # the one it was made under: it must apply, not be refused busy.
            with Control(c.sock) as ctl:
                assert ctl.set_weights({"web": 0.5, "code": 0.5},
                                       at_step=2000)["applied_step"] == 2000
        assert ev.next_batch(timeout=60).step == 21


_AGREE_SCRIPT = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, os.environ["MILLRACE_PY"])
import millrace
from millrace.torch_adapter import TorchClient

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
c = TorchClient(millrace.Client(sys.argv[3 + rank], rank, 2, job="agree", reconnect_timeout=0,
                                register_cuda=False), device="cpu")
if rank == 0 or not os.environ.get("RANK1_NO_BATCH"):
    next(c)
try:
    out = {"ok": millrace.check_plans_agree(c)}
except RuntimeError as e:
    out = {"error": str(e)}
print(json.dumps(out))
c.close()
dist.destroy_process_group()
"""


def test_check_plans_agree_over_torch_distributed(corpus, daemons, tmp_path):
    """check_plans_agree under a real torch.distributed group (gloo, two processes, each
    a TorchClient of its own node's daemon): agreeing nodes pass on both ranks, a node
    with other weights raises on both, naming it. A rank that cannot tell its plan (no
    batch yet) used to raise alone and leave the other in the gather, to fail with gloo's
    "Connection closed by peer" (or wait for the collective's timeout, had the rank gone
    on): both now raise, naming that rank and why."""
    pytest.importorskip("torch")
    heavier = corpus.parent / "heavier2.toml"
    heavier.write_text(corpus.read_text().replace("web = 0.6, code = 0.4", "web = 0.7, code = 0.3"))
    a, b, c = daemons(corpus, "t-a"), daemons(corpus, "t-b"), daemons(heavier, "t-c")
    script = tmp_path / "agree.py"
    script.write_text(_AGREE_SCRIPT)
    env = dict(os.environ, MILLRACE_PY=import_path_for_package())

    def run(name, socks, **more):
        rdv = tmp_path / f"rdv-{name}"
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(rdv), *map(str, socks)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(env, **more), text=True)
                 for r in range(2)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return outs

    ok = run("same", [a.sock, b.sock])
    assert all("ok" in o for o in ok), ok
    assert ok[0]["ok"]["state"] == ok[1]["ok"]["state"] and ok[0]["ok"]["rank"] == 0
    bad = run("heavier", [a.sock, c.sock])
    assert all("error" in o and "same corpus and config" in o["error"] for o in bad), bad
    early = run("early", [a.sock, b.sock], RANK1_NO_BATCH="1")
    assert all("rank 1" in o.get("error", "") and "after the first batch" in o["error"]
               for o in early), early
