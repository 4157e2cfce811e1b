"""The control protocol from Python (python/millrace/control.py): against a stand-in
daemon (frames sent, replies and errors mapped to exceptions, the multi-node forwarding
helper with a stand-in torch.distributed), and against the real `millrace serve` (status,
a change at a future step visible in the journal and in the delivered rows, bad changes
refused with the old weights in force, late changes refused or moved).
"""

from __future__ import annotations

import json
import linecache
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from serve_helpers import (Daemon, import_path_for_package, stopped, wait_until,
                           write_corpus)

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

from millrace.control import CONTROL, CONTROL_REPLY, ChangeRefused, Control, forward_change  # noqa: E402


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("<IB", len(payload) + 1, kind) + payload


# ---------------------------------------------------------------------------- stand-in


class Fake:
    """Answers each CONTROL frame with ``answer(request) -> bytes`` (whole frames); an
    empty answer closes the connection. Records every request."""

    def __init__(self, path: Path, answer):
        self.path, self.answer, self.seen = path, answer, []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            while True:
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return
                (n,) = struct.unpack("<I", head)
                body = conn.recv(n, socket.MSG_WAITALL)
                assert body[0] == CONTROL
                req = json.loads(body[1:])
                self.seen.append(req)
                out = self.answer(req)
                if not out:
                    return
                conn.sendall(out)

    def close(self):
        self.listener.close()


def reply(obj) -> bytes:
    return frame(CONTROL_REPLY, json.dumps(obj).encode())


@pytest.fixture
def fake(short_dir):
    made = []

    def make(answer):
        f = Fake(short_dir / f"f{len(made)}.sock", answer)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_requests_and_replies_against_a_stand_in(fake):
    def answer(req):
        op = req["op"]
        if op == "status":
            return reply({"ok": True, "op": "status", "status": {"pid": 7}})
        if op == "journal":
            return reply({"ok": True, "op": "journal", "journal": [{"at_step": 3}]})
        if op == "reload":
            return reply({"ok": True, "op": "reload", "applied_step": None,
                          "requested_step": None, "moved": False, "journal": [],
                          "message": "nothing changed"})
        if op == "set_weights" and req.get("at_step") == 1:
            return reply({"ok": False, "op": "set_weights", "code": "late",
                          "message": "step 1 was delivered", "first_changeable_step": 9})
        if op == "set_weights":
            return reply({"ok": True, "op": "set_weights", "requested_step": req.get("at_step"),
                          "applied_step": req.get("at_step", 9), "moved": False,
                          "journal": [], "message": ""})
        return b""

    f = fake(answer)
    ctl = Control(f.path, timeout=5)
    assert "not connected" in repr(ctl)
    assert ctl.status() == {"pid": 7}
    assert ctl.journal() == [{"at_step": 3}]
    assert ctl.reload()["applied_step"] is None
    r = ctl.set_weights({"web": 0.5, "code": 1}, at_step=100)
    assert r["applied_step"] == 100
    with pytest.raises(ChangeRefused) as e:
        ctl.set_weights({"web": 1.0}, at_step=1)
    assert (e.value.code, e.value.first_changeable_step, e.value.op) == ("late", 9, "set_weights")
    assert isinstance(e.value, mr.DaemonError)
    assert "9" in str(e.value)
    # A refusal leaves the connection usable: one connection for all of the above.
    assert ctl.set_weights({"web": 2})["applied_step"] == 9
    assert f.seen[0] == {"op": "status", "protocol": 1}
    assert f.seen[3] == {"op": "set_weights", "weights": {"web": 0.5, "code": 1.0},
                         "late": "refuse", "at_step": 100, "protocol": 1,
                         "source": "client"}
    assert "at_step" not in f.seen[-1]
    ctl.close()


def test_bad_arguments_never_reach_the_daemon(fake):
    f = fake(lambda req: b"")
    ctl = Control(f.path, timeout=5)
    for bad in ({"web": float("nan")}, {"web": float("inf")}, {"web": "x"}, {}, {1: 0.5}):
        with pytest.raises(ValueError):
            ctl.set_weights(bad)
    with pytest.raises(ValueError):
        ctl.set_weights({"web": 1.0}, late="later")
    with pytest.raises(ValueError):
        ctl.set_weights({"web": 1.0}, at_step=-1)
    assert f.seen == []


def test_error_frames_and_missing_daemons(fake, short_dir):
    f = fake(lambda req: {
        "refuse": frame(3, b'{"code":"uid","message":"uid 1234 is not allowed"}'),
        "error": frame(5, b'{"code":"protocol","message":"bad"}'),
        "junk": frame(CONTROL_REPLY, b"[1, 2]"),
        "other": frame(2, b"{}"),
    }.get(req["op"], b""))
    ctl = Control(f.path, timeout=5)
    with pytest.raises(mr.Refused) as e:
        ctl.request({"op": "refuse"})
    assert e.value.code == "uid"
    with pytest.raises(mr.DaemonError) as e:
        ctl.request({"op": "error"})
    assert e.value.code == "protocol" and not isinstance(e.value, ChangeRefused)
    with pytest.raises(mr.ProtocolError):
        ctl.request({"op": "junk"})
    with pytest.raises(mr.ProtocolError):
        ctl.request({"op": "other"})
    with pytest.raises(mr.DaemonGone):
        ctl.request({"op": "close"})
    with pytest.raises(mr.DaemonGone):
        Control(short_dir / "nobody.sock").status()
    # A daemon that never answers: a timeout, reported as gone.
    quiet = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    quiet.bind(str(short_dir / "quiet.sock"))
    quiet.listen(1)
    try:
        with pytest.raises(mr.DaemonGone):
            Control(short_dir / "quiet.sock", timeout=0.2).status()
    finally:
        quiet.close()


def fake_torch(monkeypatch, rank: int, change, gathered: list):
    """A stand-in torch.distributed for one process playing `rank` of len(gathered)
    ranks: broadcast hands out `change`; all_gather returns `gathered` with this rank's
    object put in its place."""
    dist = types.ModuleType("torch.distributed")
    dist.broadcast_object_list = lambda obj, src=0, group=None: obj.__setitem__(0, change)
    dist.get_world_size = lambda group=None: len(gathered)

    def all_gather_object(out, obj, group=None):
        for i, g in enumerate(gathered):
            out[i] = obj if i == rank else g

    dist.all_gather_object = all_gather_object
    torch = types.ModuleType("torch")
    torch.distributed = dist
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.distributed", dist)


def test_forward_change_agrees_across_nodes(fake, monkeypatch):
    f = fake(lambda req: reply({"ok": True, "op": "set_weights", "applied_step": req["at_step"],
                                "requested_step": req["at_step"], "moved": False,
                                "journal": [], "message": ""}))
    ctl = Control(f.path, timeout=5)
    change = {"weights": {"web": 0.7}, "at_step": 500}
    ok = {"reply": {"applied_step": 500}}
    # Rank 1 of 3 forwards for its node (LOCAL_RANK 0); rank 0 did for its node, rank 2
    # shares a node with one of them.
    fake_torch(monkeypatch, 1, change, [ok, None, None])
    monkeypatch.setenv("LOCAL_RANK", "0")
    r = forward_change(ctl, None)
    assert r["applied_step"] == 500
    assert f.seen[-1]["weights"] == {"web": 0.7} and f.seen[-1]["at_step"] == 500
    # A rank that does not forward sends nothing and returns the forwarders' reply.
    n = len(f.seen)
    monkeypatch.setenv("LOCAL_RANK", "1")
    fake_torch(monkeypatch, 2, change, [ok, ok, None])
    assert forward_change(ctl, None) == {"applied_step": 500}
    assert len(f.seen) == n
    # No rank forwarding (forward=False everywhere): said so, not "different steps: []".
    fake_torch(monkeypatch, 0, change, [None, None])
    with pytest.raises(RuntimeError, match="no rank of the 2 forwarded the change"):
        forward_change(ctl, None, forward=False)
    # Nodes that disagree are an error on every rank.
    fake_torch(monkeypatch, 2, change, [ok, {"reply": {"applied_step": 501}}, None])
    with pytest.raises(RuntimeError, match="different steps"):
        forward_change(ctl, None, forward=False)
    fake_torch(monkeypatch, 2, change,
               [ok, {"refused": ("late", "m", 600, "set_weights", {})}, None])
    with pytest.raises(ChangeRefused) as e:
        forward_change(ctl, None, forward=False)
    assert e.value.first_changeable_step == 600
    assert "1 of 2 nodes applied" in str(e.value)
    # Without a common step, or with late="next", nothing is sent anywhere.
    n = len(f.seen)
    for bad in ({"weights": {"web": 0.7}}, {"weights": {"web": 0.7}, "at_step": 5, "late": "next"}):
        fake_torch(monkeypatch, 0, bad, [None])
        with pytest.raises(ValueError):
            forward_change(ctl, None)
    assert len(f.seen) == n


def test_forward_change_needs_agreeing_journals_and_one_forwarder_per_host(fake, monkeypatch):
    """Nodes that applied a change at one step but hold different journals (their
    weights for the domains it does not name differed) are an error on every rank; a
    journal that differs only in where a change came from is not. Without LOCAL_RANK the
    lowest rank of each host forwards."""
    from millrace.control import _first_on_host

    entry = {"at_step": 500, "plan_step": 500, "points": [{"step": 500, "weights": {"web": 0.7}}],
             "source": "ctl"}
    f = fake(lambda req: reply({"ok": True, "op": "set_weights", "applied_step": 500,
                                "requested_step": 500, "moved": False, "journal": [entry],
                                "message": ""}))
    ctl = Control(f.path, timeout=5)
    change = {"weights": {"web": 0.7}, "at_step": 500}
    monkeypatch.setenv("LOCAL_RANK", "0")
    same = {"reply": {"applied_step": 500, "journal": [dict(entry, source="cursor")]}}
    fake_torch(monkeypatch, 0, change, [None, same])
    assert forward_change(ctl, None)["applied_step"] == 500
    other = dict(entry, points=[{"step": 500, "weights": {"web": 0.7, "code": 0.1}}])
    fake_torch(monkeypatch, 0, change, [None, {"reply": {"applied_step": 500,
                                                          "journal": [other]}}])
    with pytest.raises(RuntimeError, match="journals of live changes differ"):
        forward_change(ctl, None)
    monkeypatch.delenv("LOCAL_RANK")
    here = socket.gethostname()
    hosts = ["elsewhere-" + here, here, here]
    dist = types.SimpleNamespace(
        get_world_size=lambda group=None: 3,
        all_gather_object=lambda out, obj, group=None: out.__setitem__(slice(None), hosts))
    dist.get_rank = lambda group=None: 1
    assert _first_on_host(dist, None)
    dist.get_rank = lambda group=None: 2
    assert not _first_on_host(dist, None)


def test_imports_without_torch():
    """numpy-only environments: millrace and millrace.control import with torch absent."""
    code = ("import sys; sys.modules['torch'] = None; import millrace, millrace.control; "
            "assert millrace.Control is millrace.control.Control; print('ok')")
    env = dict(os.environ)
    env["PYTHONPATH"] = import_path_for_package() + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert mr.Control is Control and mr.ChangeRefused is ChangeRefused


# ---------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("control_corpus"),
                        extra_serve="watch_config = false")


@pytest.fixture
def daemon(millrace, corpus, short_dir, tmp_path):
    d = Daemon(millrace.path, corpus, short_dir / "d.sock", tmp_path / "d.log").start()
    yield d
    d.kill()
    d.assert_no_panic()


def trainer(d, job):
    return mr.Client(d.sock, 0, 1, job=job, reconnect_timeout=0, register_cuda=False)


def domains_of(c, n):
    out = []
    for _ in range(n):
        b = c.next_batch(timeout=60)
        out.append((b.step, [int(x) for x in b.domain]))
    return out


def test_status_from_python(daemon):
    ctl = Control(daemon.sock)
    st = ctl.status()
    assert st["pid"] == daemon.pid
    assert [d["name"] for d in st["domains"]] == ["web", "code"]
    assert abs(sum(d["target_share"] for d in st["domains"]) - 1) < 1e-6
    assert st["journal"] == [] and st["jobs"] == []
    with trainer(daemon, "py") as c:
        domains_of(c, 4)
        st = ctl.status()
        assert st["clients"] == 1
        assert st["first_changeable_step"] >= 4
        ring = st["jobs"][0]["rings"][0]
        assert ring["peers"][0]["pid"] == os.getpid()
    assert ctl.journal() == []


def test_set_weights_at_a_future_step(daemon):
    ctl = Control(daemon.sock)
    with trainer(daemon, "future") as c:
        before = domains_of(c, 2)
        r = ctl.set_weights({"web": 0.0, "code": 1.0}, at_step=10)
        assert r["ok"] is True and r["applied_step"] == 10 and r["moved"] is False
        journal = ctl.journal()
        assert len(journal) == 1
        e = journal[0]
        assert e["at_step"] == 10 and e["source"] == "client"
        assert e["points"][0]["weights"]["code"] == 1.0
        assert e["points"][0]["weights"]["web"] == 0.0
        assert r["journal"] == journal
        assert ctl.status()["journal"] == journal
        after = domains_of(c, 14)
    assert before[0][0] == 0
    for step, doms in after:
        if step >= 10:
            assert doms == [1] * len(doms), (step, doms)


def test_a_change_without_a_reply_says_it_may_be_in_force(daemon):
    """A daemon stalled past the Control's timeout (SIGSTOP here; a long pause in
    practice) still applies the change once it runs. The DaemonGone said only "no reply:
    timed out", which reads as "not applied", so a caller (or forward_change's count of
    nodes that applied) took an applied change for a lost one. It now says the request
    was sent and may be in force, and to check the journal."""
    ctl = Control(daemon.sock, timeout=0.5)
    with trainer(daemon, "stall") as c:
        domains_of(c, 1)
        assert ctl.journal() == []
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            # SIGSTOP lands asynchronously: a thread still running could answer in time.
            wait_until(lambda: stopped(daemon.pid), 30, "the daemon's threads to stop")
            with pytest.raises(mr.DaemonGone, match="no reply") as e:
                ctl.set_weights({"web": 0.5, "code": 0.5}, at_step=900)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert "may have applied it" in str(e.value) and "journal()" in str(e.value)
        wait_until(lambda: len(ctl.journal()) == 1, 30, "the stalled change in the journal")
        assert ctl.journal()[0]["at_step"] == 900


def test_a_request_interrupted_before_its_reply_never_answers_the_next_one(daemon):
    """A Ctrl-C while a Control waited for its reply (the daemon slow: SIGSTOPped here)
    left that reply on its way down the kept connection, and the next request read it as
    its own: journal() after an interrupted status() raised KeyError 'journal', and every
    later request got the reply of the one before it (a set_weights "answered" by a
    status). The connection of an interrupted request is now dropped: the next request
    opens a new one and gets its own reply."""
    ctl = Control(daemon.sock)
    assert ctl.journal() == []
    code = Control.request.__code__
    reads = []

    def tracer(frame, event, arg):
        if frame.f_code is code and event == "line" and "read_frame(sock)" in \
                linecache.getline(code.co_filename, frame.f_lineno):
            reads.append(frame.f_lineno)
            if len(reads) == 1:
                raise KeyboardInterrupt  # the status request is sent, its reply not read
            if len(reads) == 2:
                os.kill(daemon.pid, signal.SIGCONT)  # the journal request is sent too
        return tracer

    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: stopped(daemon.pid), 30, "the daemon's threads to stop")
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                ctl.status()
            sys.settrace(tracer)  # an exception raised by a trace function unsets it
            journal = ctl.journal()
        finally:
            sys.settrace(None)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert len(reads) == 2 and journal == []
    assert ctl.status()["pid"] == daemon.pid
    assert ctl.set_weights({"web": 0.5, "code": 0.5}, at_step=500)["applied_step"] == 500
    assert [e["at_step"] for e in ctl.journal()] == [500]


@pytest.mark.parametrize("weights", [{"nope": 1.0}, {"web": -1.0}, {"web": 0.0, "code": 0.0}],
                         ids=["unknown", "negative", "all-zero"])
def test_bad_changes_are_refused_and_nothing_changes(daemon, weights):
    ctl = Control(daemon.sock)
    failed = ctl.status()["failed_reloads"]
    with pytest.raises(ChangeRefused) as e:
        ctl.set_weights(weights, at_step=50)
    assert e.value.code == "invalid", e.value
    assert e.value.message
    assert ctl.journal() == []
    st = ctl.status()
    assert st["failed_reloads"] == failed + 1
    assert st["reloads"] == 0
    # The connection stays usable after a refusal.
    assert ctl.status()["pid"] == daemon.pid


def test_a_value_out_of_range_is_refused_naming_its_key(daemon):
    """A value Python lets through but the daemon's types refuse (a u32 field past 2^32)
    was refused as "invalid value: integer ..., expected u32 at line 1 column 62": no
    key named, and no op. Now the key and the op are named; nothing changes."""
    ctl = Control(daemon.sock)
    for call, key in ((lambda: ctl.set_stage(2**33, 8, at_step=40), "seq_len"),
                      (lambda: ctl.set_stage(64, 2**32, at_step=40), "global_batch_rows")):
        with pytest.raises(ChangeRefused) as e:
            call()
        assert e.value.code == "protocol", e.value
        assert f"`{key}`" in e.value.message and "column" not in e.value.message, e.value
        assert e.value.op == "set_stage", e.value
    assert ctl.journal() == []


def test_late_changes_are_refused_or_moved(daemon):
    ctl = Control(daemon.sock)
    with trainer(daemon, "late") as c:
        domains_of(c, 6)
        with pytest.raises(ChangeRefused) as e:
            ctl.set_weights({"web": 0.9}, at_step=2)
        assert e.value.code == "late"
        first = e.value.first_changeable_step
        assert first is not None and first >= 6
        assert ctl.journal() == []
        r = ctl.set_weights({"web": 0.9}, at_step=2, late="next")
        assert r["moved"] is True and r["requested_step"] == 2
        assert r["applied_step"] >= first
        assert [j["at_step"] for j in ctl.journal()] == [r["applied_step"]]
        steps = [s for s, _ in domains_of(c, 6)]
        assert steps == list(range(6, 12))


def test_a_connection_closed_as_idle_is_replaced_not_reported_as_a_broken_pipe(
        millrace, short_dir, tmp_path, monkeypatch):
    """The daemon closes a control connection unused for control_idle_timeout_ms, after
    an ERROR `idle` frame. The next request used to fail with DaemonGone "Broken pipe"
    (and the frame went unread); now it opens a new connection, since nothing was sent on
    the old one. If the close lands between that look and the send, the request fails
    with the daemon's own ERROR (DaemonError `idle`, not delivered), not a broken pipe."""
    import select

    from millrace import control as control_module

    from serve_helpers import wait_until

    def hung_up(sock) -> bool:
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN)
        return bool(p.poll(0))

    config = write_corpus(tmp_path / "idle",
                          extra_serve="watch_config = false\ncontrol_idle_timeout_ms = 100")
    d = Daemon(millrace.path, config, short_dir / "idle.sock", tmp_path / "idle.log").start()
    try:
        ctl = Control(d.sock, timeout=10)
        assert ctl.status()["pid"] == d.pid
        for _ in range(2):
            first = ctl._sock
            wait_until(lambda: hung_up(first), 10, "the idle close")
            assert ctl.status()["pid"] == d.pid
            assert ctl._sock is not first
        r = ctl.set_weights({"web": 0.5}, at_step=0, late="next")
        assert r["ok"] is True
        # The race: the look before the send saw nothing; the send meets the closed end.
        stale = ctl._sock
        wait_until(lambda: hung_up(stale), 10, "the idle close")
        monkeypatch.setattr(control_module, "_readable", lambda sock: False)
        with pytest.raises(mr.DaemonError) as e:
            ctl.status()
        assert e.value.code == "idle" and "not delivered" in e.value.message, e.value
        assert not isinstance(e.value, ChangeRefused)
        assert ctl._sock is None
        assert ctl.status()["pid"] == d.pid  # and the next request connects anew
    finally:
        d.kill()
    d.assert_no_panic()


NOBODY = 65534


def as_nobody(work):
    """Runs `work()` in a forked child that has dropped to uid and gid 65534 (the
    interpreter and the imported client stay in memory, so nothing needs reading from
    root's files); returns what it returned, through a pipe, as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(w, json.dumps({"ok": work()}).encode())
            status = 0
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = json.loads(f.read() or b"{}")
    os.waitpid(pid, 0)
    assert "ok" in got, got
    return got["ok"]


def test_a_uid_not_in_control_uids_reads_but_its_changes_are_refused_access(
        millrace, tmp_path, short_dir):
    """`[serve] control_uids`: a client of another uid (65534) reads status and the
    journal; its `set_weights` raises ChangeRefused with code `access`, naming the uid
    and the list, and changes nothing. The daemon's uid (root) may."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test acts as uid 65534, which needs root, and CI runs as root")
        pytest.skip("needs root: it connects as uid 65534")
    cfg = write_corpus(tmp_path / "c", extra_serve=(
        f'watch_config = false\ncontrol_uids = [4242]\nsocket_group = "{NOBODY}"'))
    os.chmod(short_dir, 0o755)
    d = Daemon(millrace.path, cfg, short_dir / "d.sock", tmp_path / "d.log").start()
    try:
        def work():
            ctl = Control(d.sock)
            out = {"uid": os.getuid(), "pid": ctl.status()["pid"], "journal": ctl.journal()}
            try:
                ctl.set_weights({"web": 0.5}, at_step=100)
                out["refused"] = None
            except ChangeRefused as e:
                out["refused"] = [e.code, e.message]
            return out

        got = as_nobody(work)
        assert got["uid"] == NOBODY and got["pid"] == d.pid and got["journal"] == [], got
        assert got["refused"] is not None, "the change was applied"
        code, message = got["refused"]
        assert code == "access", got
        assert f"uid {NOBODY}" in message and "control_uids [4242]" in message, message
        ctl = Control(d.sock)
        assert ctl.journal() == [], "a refused change changes nothing"
        r = ctl.set_weights({"web": 0.5}, at_step=100)
        assert r["ok"] is True and r["applied_step"] == 100
        assert len(ctl.journal()) == 1
    finally:
        d.kill()
    d.assert_no_panic()
