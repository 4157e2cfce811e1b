"""The Python client across a stage switch (issue 17): a real `millrace serve` whose plan
changes shape at plan step S (`[[plan.stage]]`: 8 rows of 64 tokens, then 2 rows of 256),
read with numpy only. Each rank gets the new shape at exactly step S on one connection,
the tokens `millrace explain` gives for its slice on both sides, and a `state_dict` taken
either side of the switch (the step just before it included) resumes exactly.

A stage added live (`Control.set_stage`) to a daemon whose config has none, with
`[serve] stage_reserve_tokens`, reaches the client the same way: the new shape at
exactly its step on the same connection, though WELCOME never listed it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from serve_helpers import PAD, Daemon, IndexedShard, explain, import_path_for_package, write_corpus

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

S = 5  # the plan step the long stage starts at
STEPS = 10
DP = 2
BEFORE, AFTER = (8, 64), (2, 256)  # (global rows, seq_len)


def with_stage(config, out, shape):
    """Writes ``out``: ``config`` with a ``[[plan.stage]]`` of ``shape`` (global rows,
    seq_len) at step S."""
    out.write_text(config.read_text() + f"""
[[plan.stage]]
step = {S}
seq_len = {shape[1]}
global_batch_rows = {shape[0]}
""")
    return out


@pytest.fixture
def staged(millrace, short_dir, tmp_path):
    """A daemon serving the two-stage config; yields (daemon, config)."""
    config = with_stage(write_corpus(tmp_path / "c"), tmp_path / "c" / "staged.toml", AFTER)
    d = Daemon(millrace.path, config, short_dir / "st.sock", tmp_path / "st.log").start()
    yield d, config
    d.kill()
    d.assert_no_panic()


def explained_rows(millrace, config, rank):
    """Per step of rank's slice: (seq_len, [row tokens, seq_len + 1 each]) from explain
    and the shards, read with numpy."""
    shards, out = {}, []
    for s in explain(millrace, config, 0, STEPS, rank, DP):
        rows = []
        for row in s["rows"]:
            parts = []
            for g in row["segments"]:
                sh = shards.setdefault(g["shard"], IndexedShard(config.parent / g["shard"]))
                parts.append(sh.doc(g["doc"])[g["start"] : g["end"]].astype(np.int64))
            t = np.concatenate(parts)
            rows.append(np.concatenate([t, np.full(s["seq_len"] + 1 - len(t), PAD)]))
        out.append((s["seq_len"], rows))
    return out


def take(c, n):
    """n batches as (step, rows, seq_len, [rows, seq_len + 1] tokens) plus the state."""
    got = []
    for _ in range(n):
        b = c.next_batch(timeout=60)
        full = np.concatenate([b.tokens, b.labels[:, -1:]], axis=1).astype(np.int64)
        assert np.array_equal(full[:, 1:], b.labels)
        got.append((b.step, b.rows, b.seq_len, full, c.state_dict()))
    return got


def test_batches_change_shape_at_the_switch_and_state_dicts_resume(millrace, staged):
    d, config = staged
    streams = {}
    for rank in range(DP):
        with mr.Client(d.sock, rank, DP, job="run", reconnect_timeout=0,
                       register_cuda=False) as c:
            got = take(c, STEPS)
            assert c.reconnects == 0
            assert [st["step"] for st in c.welcome["stages"]] == [0, S]
        want = explained_rows(millrace, config, rank)
        for (step, rows, seq_len, tokens, _), (want_seq, want_rows) in zip(got, want):
            g, l = BEFORE if step < S else AFTER
            assert (rows, seq_len) == (g // DP, l) == (len(want_rows), want_seq), step
            assert np.array_equal(tokens, np.stack(want_rows)), f"rank {rank} step {step}"
        streams[rank] = got

    # Resume rank 1 from the state taken after S - 2, S - 1 (the step just before the
    # switch) and S + 1: the rest of the stream is the uninterrupted one.
    ref = streams[1]
    for k in (S - 2, S - 1, S + 1):
        with mr.Client(d.sock, 1, DP, job=f"resume{k}", reconnect_timeout=0,
                       register_cuda=False) as c:
            c.load_state_dict(ref[k][4])
            again = take(c, STEPS - k - 1)
        for a, b in zip(again, ref[k + 1 :]):
            assert a[:3] == b[:3] and np.array_equal(a[3], b[3]), f"resumed after {k}"


def test_torch_client_yields_the_new_shape_at_the_switch(millrace, staged):
    """TorchClient (CPU; with prefetch, so batches of both stages are in flight at
    once) yields tensors of the new shape at exactly step S, equal to explain, and
    the compact slot's device derivation reads each stage at its own offsets."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import TorchClient, _slot_bytes, derive_tensors

    d, config = staged
    want = explained_rows(millrace, config, 0)
    tc = TorchClient(mr.Client(d.sock, 0, DP, job="torch", reconnect_timeout=0,
                               register_cuda=False), device="cpu", prefetch=2)
    for step in range(STEPS):
        tb = next(tc)
        g, l = BEFORE if step < S else AFTER
        assert tb.step == step and tuple(tb.tokens.shape) == (g // DP, l), step
        rows = np.stack(want[step][1])
        np.testing.assert_array_equal(tb.tokens.numpy(), rows[:, :-1])
        np.testing.assert_array_equal(tb.labels.numpy(), rows[:, 1:])
    tc.close()
    with mr.Client(d.sock, 0, DP, job="torch-dev", reconnect_timeout=0,
                   register_cuda=False) as c:
        for step in range(STEPS):
            b = c.next_batch(timeout=60)
            host, layout = _slot_bytes(b)
            dev = derive_tensors(host, layout, b.rows, b.seq_len, b.cu_len)
            np.testing.assert_array_equal(dev["tokens"].long().numpy(), b.tokens)
            np.testing.assert_array_equal(dev["position_ids"].numpy(), b.position_ids)


LIVE = (2, 512)  # (global rows, seq_len) added live: 512 tokens per rank, twice stage 1's


def test_a_stage_added_live_reaches_the_client_at_its_step(millrace, short_dir, tmp_path):
    config = write_corpus(tmp_path / "l", extra_serve="stage_reserve_tokens = 512")
    reference = with_stage(config, config.parent / "ref.toml", LIVE)
    d = Daemon(millrace.path, config, short_dir / "lv.sock", tmp_path / "lv.log").start()
    try:
        with mr.Client(d.sock, 0, DP, job="run", reconnect_timeout=0,
                       register_cuda=False) as c:
            batches = [c.next_batch(timeout=60).copy()]  # nothing past S is published yet
            # A header whose offsets point past the slot is a protocol error, not a view.
            with pytest.raises(mr.ProtocolError, match="`doc_starts`.* do not fit"):
                c._conn.stage_of(4, 64, (256, 1 << 30, 0, 0, 0, 0, 0, 0))
            with pytest.raises(mr.ChangeRefused) as refused:
                mr.Control(d.sock).set_stage(seq_len=8192, global_batch_rows=2, at_step=S)
            assert refused.value.code == "invalid"
            assert "stage_reserve_tokens" in str(refused.value)
            reply = mr.Control(d.sock).set_stage(seq_len=LIVE[1], global_batch_rows=LIVE[0],
                                                 at_step=S)
            assert reply["applied_step"] == S
            batches += [c.next_batch(timeout=60).copy() for _ in range(STEPS - 1)]
            assert c.reconnects == 0
            assert [st["step"] for st in c.welcome["stages"]] == [0]  # never listed
        # The same steps from ring slots the daemon expands itself.
        with mr.Client(d.sock, 0, DP, job="expanded", reconnect_timeout=0,
                       register_cuda=False, slot_layout="expanded") as e:
            expanded = [e.next_batch(timeout=60).copy() for _ in range(STEPS)]
    finally:
        d.kill()
    d.assert_no_panic()
    want = explained_rows(millrace, reference, 0)
    for b, x, (want_seq, want_rows) in zip(batches, expanded, want):
        g, l = BEFORE if b.step < S else LIVE
        assert (b.rows, b.seq_len) == (g // DP, l) == (len(want_rows), want_seq), b.step
        rows = np.stack(want_rows)
        assert np.array_equal(b.tokens, rows[:, :-1]) and np.array_equal(b.labels, rows[:, 1:])
        # The derived arrays agree with the header and with the daemon's own expansion.
        assert b.position_ids.shape == b.loss_mask.shape == (b.rows, b.seq_len)
        assert int(b.loss_mask.sum()) == b.loss_tokens and len(b.cu_seqlens) == b.cu_len
        assert b.cu_seqlens[-1] == b.rows * b.seq_len
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens",
                     "domain", "row_loss_tokens"):
            assert np.array_equal(getattr(b, name), getattr(x, name)), (b.step, name)
