"""A new user's first hour (issue 19), scripted: synth, check-config, serve as a non-root
user on the default socket, consume, the Python client (and, where torch is installed,
its DataLoader with num_workers 0 and 1 and a resume), ctl, status, SIGTERM.

Every command of the daemon's side runs as an unprivileged user: as root (CI) the
commands run as `nobody` (uid 65534) from a copy of the binary in a directory that user
may read, so the repository's location does not matter; as any other user they run as
that user. Each test asserts one fixed behaviour, with the text a user now sees.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import import_path_for_package, wait_until

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

NOBODY = 65534
# The synth config serves 256 rows per step; dp_size 8 keeps each client's slice small.
DP_SIZE = 8


class User:
    """Runs millrace commands as the unprivileged user, in the walk-through's directory."""

    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.home = home
        self.uid = NOBODY if os.geteuid() == 0 else os.geteuid()
        self.gid = NOBODY if os.geteuid() == 0 else os.getegid()
        # A runtime directory as a login session has one: the user's own, mode 0700.
        self.runtime = home / "run"
        self.runtime.mkdir(mode=0o700)
        self.chown(self.runtime)
        # And a cache directory of the user's own, as a home has (shard identities and
        # plan checkpoints go there).
        (home / ".cache").mkdir(mode=0o700)
        self.chown(home / ".cache")
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                    "XDG_RUNTIME_DIR": str(self.runtime)}

    def chown(self, path: Path):
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)

    def _kw(self, env=None) -> dict:
        kw = {"cwd": self.home, "env": dict(self.env, **(env or {}))}
        if os.geteuid() == 0:
            kw.update(user=self.uid, group=self.gid, extra_groups=[])
        return kw

    def run(self, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.binary), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, **self._kw(env))
        assert "panicked" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args, **kw) -> subprocess.CompletedProcess:
        proc = self.run(*args, **kw)
        assert proc.returncode == 0, f"millrace {args} exited {proc.returncode}:\n{proc.stderr}"
        return proc

    def fail(self, *args, **kw) -> str:
        proc = self.run(*args, **kw)
        assert proc.returncode != 0, f"millrace {args} succeeded:\n{proc.stdout}"
        return proc.stderr

    def popen(self, *args, log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen([str(self.binary), *map(str, args)], stdout=f, stderr=f,
                                    **self._kw({"MILLRACE_LOG": "info"}))


@pytest.fixture(scope="module")
def walk(millrace):
    """The walk-through's directory (readable by the user), the user, and a synth corpus
    with the config exactly as `millrace synth` writes it."""
    home = Path(tempfile.mkdtemp(prefix="mr-first-hour-", dir="/tmp"))
    os.chmod(home, 0o755)
    binary = home / "millrace"
    shutil.copy2(millrace.path, binary)
    os.chmod(binary, 0o755)
    user = User(binary, home)
    data = home / "data"
    data.mkdir()
    user.chown(data)
    user.ok("synth", "--out", data, "--tokens", "3e5", "--threads", "2", "--json")
    config = data / "millrace.toml"
    assert config.exists() and "[serve]" not in config.read_text()
    yield user, config
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(walk):
    """`millrace serve` on the synth config, as the user, on the default socket."""
    user, config = walk
    log = user.home / "serve.log"
    proc = user.popen("serve", "--config", config, log=log)
    sock = user.runtime / "millrace.sock"
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 60, "the socket")
        assert proc.poll() is None, log.read_text(errors="replace")
        yield proc, sock, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_check_config_names_the_default_socket_a_user_can_create(walk):
    user, config = walk
    out = user.ok("check-config", "--config", config)
    sock = user.runtime / "millrace.sock"
    assert f"socket {sock}," in out.stdout, out.stdout
    assert "warning" not in out.stderr, out.stderr
    # Without $XDG_RUNTIME_DIR: a directory of the user's own under /tmp.
    out = user.ok("check-config", "--config", config, env={"XDG_RUNTIME_DIR": ""})
    assert f"socket /tmp/millrace-{user.uid}/millrace.sock," in out.stdout, out.stdout
    # That directory must be the user's own: another's could swap the socket.
    theirs = Path(f"/tmp/millrace-{user.uid}")
    if os.geteuid() == 0 and not theirs.exists():
        theirs.mkdir(mode=0o777)
        try:
            err = user.fail("check-config", "--config", config, env={"XDG_RUNTIME_DIR": ""})
            assert (f"[serve] socket: {theirs} belongs to uid 0, not to uid {user.uid}; "
                    "remove it, or set [serve] socket") in err, err
        finally:
            theirs.rmdir()


def test_a_domain_left_out_of_the_weights_is_warned_about(walk):
    user, config = walk
    text = config.read_text()
    assert "# code/code-NNNNN.groups.npy sidecars name each document's repository" in text
    left_out = config.with_name("left-out.toml")
    left_out.write_text(text.replace(", wiki = 0.1000", ""))
    out = user.ok("check-config", "--config", left_out)
    assert out.stderr == (
        f"warning: {left_out}: plan.schedule[0].weights (step 0) does not name domain "
        "`wiki`, so it gets weight 0 there and none of its data is read; write `wiki = 0` "
        "if that is meant\n")
    # An explicit 0 says it is meant.
    left_out.write_text(text.replace("wiki = 0.1000", "wiki = 0"))
    assert user.ok("check-config", "--config", left_out).stderr == ""


def test_a_missing_shard_is_named_once(walk):
    user, config = walk
    bad = config.with_name("typo.toml")
    bad.write_text(config.read_text().replace('shards = ["wiki"]', 'shards = ["wikki"]'))
    err = user.fail("check-config", "--config", bad)
    assert err == (f"error: domain wiki: {config.parent}/wikki.idx: no such index file (a "
                   "Megatron shard needs <prefix>.idx and <prefix>.bin)\n")


def test_the_command_line_spells_things_one_way(walk):
    user, _ = walk
    err = user.fail("inspect", "--format", "raw", "--dtype", "int32", "--eos-id", 0, "x.tok")
    assert 'raw token files are uint16 or uint32, not "int32"' in err, err
    err = user.fail("synth", "--out", "x", "--dtype", "uint32")
    assert 'Megatron token shards are uint16 or int32' in err, err
    help_text = user.ok("explain", "--help").stdout
    assert "(default: all rows)" not in help_text, help_text
    for cmd in ("consume", "status", "top"):
        text = user.ok(cmd, "--help").stdout
        assert "--socket" in text and "--config" in text, (cmd, text)
    for cmd in ("ctl", "status", "top"):
        text = user.ok(cmd, "--help").stdout
        assert "--timeout <SECS>" in text and "--timeout-ms" not in text, (cmd, text)
    assert "--interval <SECS>" in user.ok("top", "--help").stdout


def test_a_late_refusal_names_the_first_changeable_step_once():
    from millrace.control import ChangeRefused

    said = ChangeRefused("late", "steps below 26 are published; the first step that can "
                         "still change is 26", 26)
    assert str(said).count("the first step that can still change is 26") == 1, str(said)
    unsaid = ChangeRefused("late", "step 3 may already have been received", 26)
    assert str(unsaid).endswith("(the first step that can still change is 26)"), str(unsaid)


def test_the_python_client_computes_the_daemons_default_socket(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert mr.default_socket() == "/run/user/1234/millrace.sock"
    assert mr.Control().socket_path == "/run/user/1234/millrace.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/ignored")
    assert mr.default_socket() == f"/tmp/millrace-{os.geteuid()}/millrace.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert mr.default_socket() == f"/tmp/millrace-{os.geteuid()}/millrace.sock"


def test_check_config_fails_where_serve_would(walk):
    user, config = walk
    locked = user.home / "locked"
    locked.mkdir(mode=0o555)  # root-owned as root; not writable by the user either way
    os.chmod(locked, 0o555)
    bad = user.home / "bad.toml"
    bad.write_text(config.read_text().replace('shards = ["', f'shards = ["{config.parent}/')
                   + f'\n[serve]\nsocket = "{locked}/sub/millrace.sock"\n')
    try:
        want = (f"{bad}: [serve] socket: cannot create the socket directory {locked}/sub in "
                f"{locked}: uid {user.uid} may not write there; set [serve] socket (or "
                f"--socket) to a path you may create")
        err = user.fail("check-config", "--config", bad)
        assert want in err, err
        err = user.fail("serve", "--config", bad)
        assert want in err, err
    finally:
        os.chmod(locked, 0o755)


def test_serve_runs_as_the_user_on_the_default_socket(walk, daemon):
    user, _ = walk
    proc, sock, _ = daemon
    st = os.stat(sock)
    assert st.st_uid == user.uid and oct(st.st_mode & 0o777) == oct(0o660)


def test_consume_takes_the_socket_from_the_config(walk, daemon):
    user, config = walk
    out = user.ok("consume", "--config", config, "--dp-rank", 0, "--dp-size", DP_SIZE,
                  "--job", "consume", "--steps", 3, "--json")
    summary = json.loads(out.stdout)
    assert summary["steps"] == 3, summary


def test_a_typo_in_the_socket_path_fails_at_once(walk, daemon):
    _, sock, _ = daemon
    typo = sock.with_name("milrace.sock")
    t0 = time.monotonic()
    with pytest.raises(mr.DaemonGone) as e:
        mr.Client(typo, 0, DP_SIZE, register_cuda=False).connect()
    assert time.monotonic() - t0 < 5
    assert str(e.value) == (
        f"cannot connect to {typo}: no such socket: is the daemon running, and is this its "
        "[serve] socket? (`millrace check-config --config FILE` prints it) "
        "(No such file or directory)")
    # The command line says the same, once.
    user, _ = walk
    err = user.fail("status", "--socket", typo)
    assert err == (f"error: cannot connect to {typo}: no such socket: is the daemon running, "
                   "and is this its [serve] socket? (`millrace check-config --config FILE` "
                   "prints it) (No such file or directory (os error 2))\n")
    err = user.fail("consume", "--socket", typo, "--dp-rank", 0, "--dp-size", DP_SIZE)
    assert err == (f"error: cannot connect to {typo}: no such socket: is the daemon running, "
                   "and is this its [serve] socket? (`millrace check-config --config FILE` "
                   "prints it) (No such file or directory (os error 2))\n")
    # A daemon that is starting can be waited for.
    t0 = time.monotonic()
    with pytest.raises(mr.DaemonGone):
        mr.Client(typo, 0, DP_SIZE, register_cuda=False, connect_timeout=0.5).connect()
    assert time.monotonic() - t0 >= 0.5


def test_the_python_client_streams_and_resumes(walk, daemon):
    """A checkpoint after 3 batches resumes at exactly the 4th, as an unbroken run has it."""
    _, sock, _ = daemon
    with mr.Client(sock, 1, DP_SIZE, job="ref", register_cuda=False) as c:
        ref = [c.next_batch().copy() for _ in range(6)]
    with mr.Client(sock, 1, DP_SIZE, job="first", register_cuda=False) as c:
        for _ in range(3):
            c.next_batch()
        state = c.state_dict()
    assert state["step"] == 2
    with mr.Client(sock, 1, DP_SIZE, job="first", register_cuda=False) as c:
        c.load_state_dict(state)
        again = [c.next_batch().copy() for _ in range(3)]
    assert [b.step for b in again] == [3, 4, 5]
    for a, b in zip(again, ref[3:]):
        assert np.array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_checkpoints_resume_with_num_workers(walk, daemon, workers):
    """With num_workers 0 and 1, a checkpoint taken after 5 consumed items resumes at
    exactly the 6th item of an unbroken stream; with a worker, the main process's
    state_dict refuses instead of returning a position that repeats data."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import MillraceIterableDataset as DS

    _, sock, _ = daemon
    kw = dict(register_cuda=False)
    ref = DS(sock, 2, DP_SIZE, copy=True, steps=8, job=f"ref{workers}", **kw)
    want = [d["tokens"] for d in torch.utils.data.DataLoader(ref, batch_size=None)]
    ref.close()

    job = f"dl{workers}"
    ds = DS(sock, 2, DP_SIZE, copy=True, steps=5, job=job, **kw)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    items = list(loader)
    assert [int(d["step"]) for d in items] == [0, 1, 2, 3, 4]
    state = DS.state_of(items[-1])
    assert state["step"] == 4 and isinstance(state["cursor"], bytes)
    if workers == 0:
        assert ds.state_dict() == state
        ds.close()
    else:
        with pytest.raises(mr.MillraceError, match="DataLoader worker process"):
            ds.state_dict()
        # A second pass forks a new worker with the dataset as it was loaded: it would
        # serve steps 0-4 again, and is refused instead.
        with pytest.raises(mr.MillraceError, match="another DataLoader worker"):
            list(loader)
    del loader  # ends the worker, whose client leaves the ring

    resumed = DS(sock, 2, DP_SIZE, copy=True, steps=3, job=job, **kw)
    resumed.load_state_dict(state)
    loader = torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=workers)
    again = list(loader)
    assert [int(d["step"]) for d in again] == [5, 6, 7]
    for d, w in zip(again, want[5:]):
        assert torch.equal(d["tokens"], w)
    del loader
    resumed.close()


def test_dataloader_persistent_worker_continues_the_stream(walk, daemon):
    """With persistent_workers, each pass over the DataLoader continues the stream in
    the same worker: the second pass serves the next steps, not the first ones again."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import MillraceIterableDataset as DS

    _, sock, _ = daemon
    ds = DS(sock, 3, DP_SIZE, copy=True, steps=3, job="persist", register_cuda=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    first, second = [int(d["step"]) for d in loader], [int(d["step"]) for d in loader]
    assert (first, second) == ([0, 1, 2], [3, 4, 5])
    del loader


def test_a_persistent_worker_pass_left_early_is_refused_not_skipped(walk, daemon):
    """A pass left with ``break`` leaves items the worker read ahead in the DataLoader's
    queue, which it discards at the next pass: that pass used to go on after them,
    silently skipping steps 3 and 4. It is refused; state_of(last item) resumes exactly."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import MillraceIterableDataset as DS

    _, sock, _ = daemon
    ds = DS(sock, 0, DP_SIZE, copy=True, job="early", register_cuda=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    first = []
    for item in loader:
        first.append(item)
        if len(first) == 3:
            break
    assert [int(d["step"]) for d in first] == [0, 1, 2]
    with pytest.raises(mr.MillraceError, match="left early") as refused:
        next(iter(loader))
    # Ends the worker, whose client leaves the ring: the refusal's traceback holds the
    # loader's iterator in a cycle, which only the cyclic GC frees.
    del refused, loader
    gc.collect()

    ds.load_state_dict(DS.state_of(first[-1]))
    ds.steps = 2
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    assert [int(d["step"]) for d in loader] == [3, 4]
    assert [int(d["step"]) for d in loader] == [5, 6]  # a pass run to its end goes on
    del loader


def test_a_state_loaded_while_a_persistent_worker_streams_is_refused_not_ignored(walk, daemon):
    """load_state_dict in the trainer's process cannot reach a persistent worker that is
    already streaming: its next pass went on from its own position, as if the state had
    been loaded. It is refused; a new DataLoader resumes at the state."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import MillraceIterableDataset as DS

    _, sock, _ = daemon
    ds = DS(sock, 1, DP_SIZE, copy=True, steps=2, job="reload", register_cuda=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    first = list(loader)
    assert [int(d["step"]) for d in first] == [0, 1]
    ds.load_state_dict(DS.state_of(first[0]))  # back to after step 0
    with pytest.raises(mr.MillraceError, match="cannot reach") as refused:
        next(iter(loader))
    del refused, loader  # see test_a_persistent_worker_pass_left_early_is_refused_not_skipped
    gc.collect()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    assert [int(d["step"]) for d in loader] == [1, 2]
    del loader


EXAMPLES = Path(__file__).resolve().parents[2] / "python" / "examples"


def run_example(*args, cwd: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = import_path_for_package() + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_train_tiny_runs_on_the_synth_defaults_and_resumes(walk, daemon):
    """The synth config's 256 x 4096 batches and 50304-token vocabulary (from WELCOME)."""
    pytest.importorskip("torch")
    user, _ = walk
    sock = daemon[1]
    ckpt = user.home / "tiny.pt"
    out = run_example(EXAMPLES / "train_tiny.py", "--socket", sock, "--steps", 3,
                      "--checkpoint", ckpt, "--device", "cpu", cwd=user.home)
    assert "256 rows x 4096 tokens (training on the first 512), vocab 50304" in out, out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")] == \
        ["0", "1", "2"]
    out = run_example(EXAMPLES / "train_tiny.py", "--socket", sock, "--steps", 5,
                      "--checkpoint", ckpt, "--device", "cpu", cwd=user.home)
    assert "resuming after step 2" in out, out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")] == ["3", "4"]


def test_train_ddp_runs_under_torchrun_and_resumes_with_another_world_size(walk, daemon):
    pytest.importorskip("torch")
    user, _ = walk
    sock = daemon[1]
    ckpt = user.home / "ddp.pt"
    run = ["-m", "torch.distributed.run", "--standalone"]
    out = run_example(*run, "--nproc-per-node", 2, EXAMPLES / "train_ddp.py", "--socket",
                      sock, "--steps", 3, "--checkpoint", ckpt, "--change-at", 1,
                      cwd=user.home)
    steps = [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")]
    assert steps == ["0", "1", "2"], out
    assert "mixture change applies from step" in out and "saved after step 2" in out, out
    out = run_example(*run, "--nproc-per-node", 1, EXAMPLES / "train_ddp.py", "--socket",
                      sock, "--steps", 5, "--checkpoint", ckpt, cwd=user.home)
    assert "resuming after step 2 with 1 ranks (saved with 2)" in out, out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")] == ["3", "4"]


def test_a_refused_schedule_edit_says_why_and_shows_in_status_and_ctl(walk, daemon):
    """The issue's surprise: one point added at step 300 ramps from step 1, which some
    client already received. The refusal says so and how to write a step change, and is
    seen in `status` and `ctl reload`; with `ramp = false` the edit applies at step 300."""
    user, config = walk
    original = config.read_text()
    user.ok("consume", "--config", config, "--dp-rank", 0, "--dp-size", DP_SIZE,
            "--job", "edit", "--steps", 3, "--json")
    point = ("\n[[plan.schedule]]\nstep = 300\n"
             "weights = { web = 0.2, code = 0.2, books = 0.2, wiki = 0.4 }\n")
    why = ("weights ramp linearly between the points at steps 0 and 300, so the point at "
           "step 300 changes every step from 1 on; to change them at step 300 only, add "
           "`ramp = false` to that [[plan.schedule]] entry (the weights of step 0 then hold "
           "until step 299)")
    try:
        config.write_text(original + point)

        def refused():
            st = json.loads(user.ok("status", "--config", config, "--json").stdout)
            last = st.get("last_reload") or {}
            return last if last.get("source") == "file" and not last.get("ok") else None

        wait_until(refused, 30, "the file watcher to refuse the edit")
        last = refused()
        assert last["code"] == "late" and why in last["message"], last
        text = user.ok("status", "--config", config).stdout
        assert "LAST RELOAD REFUSED (file, late): the old weights stay: " in text, text
        assert why in text, text
        err = user.fail("ctl", "--config", config, "reload")
        assert why in err, err

        config.write_text(original + point.replace("step = 300\n", "step = 300\nramp = false\n"))
        out = user.ok("ctl", "--config", config, "reload")
        assert out.stdout.startswith("reload: applied from step 300"), out.stdout
    finally:
        config.write_text(original)


def test_ctl_and_status_take_the_socket_from_the_config(walk, daemon):
    user, config = walk
    def status():
        return json.loads(user.ok("status", "--config", config, "--json").stdout)

    # Every client has left (the daemon notices a closed connection a moment later);
    # what they were given still counts.
    wait_until(lambda: status()["jobs"] == [], 30, "the last client to leave")
    st = status()
    assert st["socket"] == str(daemon[1]) and st["clients"] == 0, st
    assert st["plan_step"] > 0 and all(d["tokens"] > 0 for d in st["domains"]), st
    assert abs(sum(d["realized_share"] for d in st["domains"]) - 1) < 1e-9, st
    out = user.ok("ctl", "--config", config, "--timeout", "5", "set-weights", "web=0.5",
                  "--at-step", 100000)
    assert out.stdout == "set_weights: applied from step 100000\n", out.stdout
    # The old millisecond spelling of --timeout still works.
    out = user.ok("ctl", "--config", config, "--timeout-ms", "5000", "journal")
    assert "100000" in out.stdout, out.stdout


def test_a_socket_directory_serve_made_goes_with_it(walk):
    user, config = walk
    made = user.runtime / "made"  # in a directory of the user's own
    log = user.home / "made.log"
    proc = user.popen("serve", "--config", config, "--socket", made / "m.sock", log=log)
    try:
        wait_until(lambda: (made / "m.sock").exists() or proc.poll() is not None, 60,
                   "the socket")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text(errors="replace")
        assert not made.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigterm_stops_the_daemon_and_removes_its_socket(daemon):
    proc, sock, log = daemon
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text(errors="replace")
    assert not sock.exists()
