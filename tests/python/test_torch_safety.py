"""The torch adapter's CPU tensors against a live daemon: what a trainer may do with them.

- In a DataLoader worker the items are the stream's own data, whatever ``copy`` says
  (the worker sends an item after it moved on and released the item's slot, and moving
  a tensor to shared memory replaces its storage).
- The default tensors may be written in place; zero-copy views are opt-in (``copy=False``)
  and documented read-only (writing to one is a SIGSEGV: the ring is mapped read only).
- ``tokens`` and ``labels`` are int32 on the CPU, as on CUDA, for uint16 shards too.
- A failed ``to_torch`` (a CUDA out-of-memory error, say) loses no step.

Every test skips where torch is not installed.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import Daemon, import_path_for_package, write_corpus

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

torch = pytest.importorskip("torch")

from millrace import torch_adapter  # noqa: E402
from millrace.torch_adapter import MillraceIterableDataset, TorchClient  # noqa: E402

FIELDS = mr.client.FIELDS
DP = 2
LAYOUTS = ("compact", "expanded")


@pytest.fixture(scope="module")
def daemon(millrace, tmp_path_factory):
    """One daemon for the module (each test reads its own jobs): 4 ring slots, so a
    stream of 24 steps reuses every slot several times."""
    root = tmp_path_factory.mktemp("torch_safety")
    config = write_corpus(root / "corpus", ring_slots=4)
    sockets = Path(tempfile.mkdtemp(prefix="mrt", dir="/tmp"))  # short: unix path limit
    d = Daemon(millrace.path, config, sockets / "d.sock", root / "d.log").start()
    yield d
    d.kill()
    shutil.rmtree(sockets, ignore_errors=True)
    d.assert_no_panic()


def dataset(d, job, layout, **kw):
    return MillraceIterableDataset(d.sock, 0, DP, job=job, slot_layout=layout,
                                   register_cuda=False, reconnect_timeout=0, **kw)


def owned(item: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in item.items()}


def assert_same_items(got: list, want: list, what: str):
    assert [int(g["step"]) for g in got] == [int(w["step"]) for w in want], what
    for g, w in zip(got, want):
        for k in FIELDS:
            assert g[k].dtype == w[k].dtype, (what, int(w["step"]), k)
            assert torch.equal(g[k], w[k]), f"{what}: step {int(w['step'])} differs in {k}"
        assert bytes(g["cursor"]) == bytes(w["cursor"]), (what, int(w["step"]))


# ---------------------------------------------------------------------------- workers


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_dataloader_worker_yields_the_stream_even_with_copy_false(daemon, layout):
    """Finding 1: with num_workers=1 and copy=False, every item equals the num_workers=0,
    copy=True stream. Before, the worker yielded per-slot tensors kept across steps: the
    DataLoader moved them to shared memory (replacing the storage under the kept tensor),
    so from the slot's second use on the worker served an old step's data."""
    steps = 24
    ref = dataset(daemon, f"ref-{layout}", layout, copy=True, steps=steps)
    want = [owned(d) for d in torch.utils.data.DataLoader(ref, batch_size=None)]
    ref.close()
    assert len(want) == steps

    ds = dataset(daemon, f"w1-{layout}", layout, copy=False, steps=steps)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    got = [owned(d) for d in loader]
    del loader  # ends the worker, whose client leaves the ring
    assert_same_items(got, want, f"{layout}, num_workers=1, copy=False")
    assert all(g["tokens"].dtype == torch.int32 for g in got)


# ---------------------------------------------------------------------------- in place


INPLACE = textwrap.dedent("""
    import sys
    import torch
    import millrace as mr
    from millrace.torch_adapter import MillraceIterableDataset, TorchClient

    sock, layout = sys.argv[1], sys.argv[2]
    kw = dict(slot_layout=layout, register_cuda=False, reconnect_timeout=0)
    with mr.Client(sock, 1, 2, job="inplace-b-" + layout, **kw) as c:
        b = c.next_batch(timeout=60)
        want_tokens = torch.from_numpy(b.tokens.astype("int64"))
        want_domain = b.domain.copy()
        t = b.to_torch()
        t.labels[:, -1] = -100
        t.labels[:, 0] = -100   # of a compact slot, labels[:, 0] is the ring's tokens[:, 1]
        t.labels[t.loss_mask == 0] = -100
        t.position_ids += 1
        t.domain.zero_()
        t.row_loss_tokens.fill_(7)
        t.cu_seqlens[0] = 5
        t.tokens[0, 0] = 1
        assert torch.equal(t.tokens[:, 1:].long(), want_tokens[:, 1:]), "labels reach tokens"
        assert (b.domain == want_domain).all() and not (t.domain != 0).any()
    tc = TorchClient(mr.Client(sock, 1, 2, job="inplace-t-" + layout, **kw), device="cpu")
    for _ in range(3):
        tb = next(tc)
        tb.labels[tb.loss_mask == 0] = -100
        tb.tokens.clamp_(max=100)
    tc.close()
    ds = MillraceIterableDataset(sock, 1, 2, steps=3, job="inplace-d-" + layout, **kw)
    for d in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0):
        d["labels"][:, -1] = -100
        d["loss_mask"].zero_()
    ds.close()
    print("survived", flush=True)
""")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_tensors_may_be_written_in_place(daemon, layout):
    """Finding 2: the default CPU tensors of Batch.to_torch, TorchClient and the dataset
    are the trainer's own: the usual masking idioms (labels[...] = -100) run, and an edit
    of labels does not reach tokens. Run in a subprocess, since before they were views
    of the read-only ring and the first in-place op killed the process with SIGSEGV."""
    env = dict(os.environ)
    env["PYTHONPATH"] = import_path_for_package() + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", INPLACE, str(daemon.sock), layout],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and "survived" in p.stdout, \
        f"exit {p.returncode} (-11: SIGSEGV)\n{p.stdout[-2000:]}{p.stderr[-4000:]}"


def test_zero_copy_views_are_opt_in_and_documented_read_only(daemon):
    """copy=False still gives zero-copy tensors over the ring (for a trainer that only
    reads them), a new tensor object each step (nothing kept per slot that a caller
    could move), and every entry point says they are read-only."""
    for doc in (mr.Batch.to_torch.__doc__, torch_adapter.batch_to_torch.__doc__,
                torch_adapter.TorchBatch.__doc__, TorchClient.__doc__,
                MillraceIterableDataset.__doc__, torch_adapter.__doc__):
        assert "copy=False" in doc and "READ-ONLY" in doc and "SIGSEGV" in doc, doc
    with mr.Client(daemon.sock, 1, DP, job="views", slot_layout="expanded",
                   register_cuda=False, reconnect_timeout=0) as c:
        ring = np.frombuffer(c.connect()._conn.mm, dtype=np.uint8)
        lo, hi = ring.__array_interface__["data"][0], ring.__array_interface__["data"][0] \
            + ring.nbytes
        del ring
        seen = {}
        for _ in range(6):  # 4 slots: slots 0 and 1 come round again
            b = c.next_batch(timeout=60)
            v = b.to_torch(copy=False)
            for k in FIELDS:
                t = getattr(v, k)
                assert lo <= t.data_ptr() < hi, k
                assert torch.equal(t, torch.from_numpy(np.array(getattr(b, k)))), k
            slot = b.step % 4
            if slot in seen:
                assert seen[slot] is not v.tokens
            # What a DataLoader's queue does to a tensor it sends: a kept tensor would
            # read this copy, not the ring, the next time its slot comes round.
            v.tokens.share_memory_()
            seen[slot] = v.tokens


# ---------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_ids_are_int32_on_the_cpu_for_uint16_shards(daemon, layout):
    """Finding 3: a compact slot of uint16 shards gave torch.uint16 tokens and labels on
    the CPU (int32 on CUDA), which nn.Embedding rejects. Now int32 on every path, views
    (copy=False) included, with the same values as the numpy views."""
    with mr.Client(daemon.sock, 1, DP, job=f"dtype-{layout}", slot_layout=layout,
                   register_cuda=False, reconnect_timeout=0) as c:
        b = c.next_batch(timeout=60)
        assert c.welcome["token_dtype"] == ("uint16" if layout == "compact" else "int32")
        emb = torch.nn.Embedding(30001, 4)  # ids 3..30000
        for copy in (True, False):
            t = b.to_torch(copy=copy)
            for k in ("tokens", "labels"):
                assert getattr(t, k).dtype == torch.int32, (copy, k)
                np.testing.assert_array_equal(getattr(t, k).numpy(), getattr(b, k))
            assert emb(t.tokens).shape == (b.rows, b.seq_len, 4)
            logits = torch.zeros(b.rows * b.seq_len, 30001)
            torch.nn.functional.cross_entropy(logits, t.labels.reshape(-1).long())
    tc = TorchClient(mr.Client(daemon.sock, 1, DP, job=f"dtype-tc-{layout}",
                               slot_layout=layout, register_cuda=False,
                               reconnect_timeout=0), device="cpu")
    tb = next(tc)
    assert tb.tokens.dtype == tb.labels.dtype == torch.int32
    tc.close()


# ---------------------------------------------------------------------------- failures


class FailOnce:
    """Stands in for batch_to_torch: raises (as a CUDA out-of-memory error would) at the
    ``at``-th call, passes every other call through."""

    def __init__(self, at: int):
        self.at, self.calls, self.real = at, 0, torch_adapter.batch_to_torch

    def __call__(self, batch, *a, **kw):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError(f"CUDA out of memory (injected at step {batch.step})")
        return self.real(batch, *a, **kw)


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("at", [1, 3])
def test_a_failed_transfer_is_retried_by_torch_client(daemon, monkeypatch, prefetch, at):
    """Finding 9: a to_torch that raised after next_batch moved the cursor lost that
    step. The next call now returns it, and state_dict never counts it as consumed: the
    last batch returned, or before the first one the start (not the failed batch)."""
    monkeypatch.setattr(torch_adapter, "batch_to_torch", FailOnce(at))
    kw = dict(register_cuda=False, reconnect_timeout=0)
    tc = TorchClient(mr.Client(daemon.sock, 0, DP, job=f"retry-tc{prefetch}-{at}", **kw),
                     device="cpu", prefetch=prefetch)
    # The at-th transfer is step at - 1; the batches returned before it fails.
    got = [next(tc).step for _ in range(max(0, at - 1 - prefetch))]
    before = tc.state_dict()
    if not got:
        assert before == {"cursor": None, "step": -1}
    with pytest.raises(RuntimeError, match="out of memory"):
        next(tc)
    assert tc.state_dict() == before
    got += [next(tc).step for _ in range(4)]
    assert got == list(range(len(got))), got
    tc.close()


def test_a_failed_transfer_is_retried_by_the_dataset(daemon, monkeypatch):
    """Finding 9 for MillraceIterableDataset (num_workers=0): the step whose to_torch
    failed is the first item of the next pass, with its own data, and state_dict() in
    between is the last item yielded."""
    ref = dataset(daemon, "retry-ref", "compact", steps=6)
    want = [owned(d) for d in torch.utils.data.DataLoader(ref, batch_size=None)]
    ref.close()

    monkeypatch.setattr(torch_adapter, "batch_to_torch", FailOnce(at=3))
    ds = dataset(daemon, "retry-ds", "compact")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)
    got = []
    with pytest.raises(RuntimeError, match="out of memory"):
        for d in loader:
            got.append(owned(d))
    assert [int(d["step"]) for d in got] == [0, 1]
    assert ds.state_dict() == MillraceIterableDataset.state_of(got[-1])
    for d in loader:
        got.append(owned(d))
        if len(got) == 6:
            break
    assert_same_items(got, want, "retried")
    assert ds.state_dict() == MillraceIterableDataset.state_of(got[-1])
    ds.close()


def test_state_of_a_collated_item_says_to_use_batch_size_none(daemon):
    """A DataLoader left at its default batch_size=1 collates each item: the cursor
    becomes a list of one, and state_of failed with "'bytes' object cannot be
    interpreted as an integer". It now says what to do."""
    ds = dataset(daemon, "collated", "compact", steps=2)
    loader = torch.utils.data.DataLoader(ds)  # batch_size=1: collated
    item = next(iter(loader))
    assert tuple(item["tokens"].shape[:1]) == (1,)
    with pytest.raises(mr.MillraceError, match=r"batch_size=None"):
        MillraceIterableDataset.state_of(item)
    ds.close()


def test_a_persistent_workers_pass_ended_by_an_unseen_error_is_refused(daemon, monkeypatch):
    """The worker reads ahead: item 2 went out, then step 3's transfer failed. The
    trainer broke after item 1, so the DataLoader discarded item 2 and the error. The
    worker took the error as the pass's end, and the next pass retried step 3: step 2
    was skipped. It is refused like any pass left early."""
    monkeypatch.setattr(torch_adapter, "batch_to_torch", FailOnce(at=4))  # forked along
    ds = dataset(daemon, "unseen-error", "compact")
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                         persistent_workers=True)
    steps = []
    for d in loader:
        steps.append(int(d["step"]))
        if len(steps) == 2:
            break
    assert steps == [0, 1]
    with pytest.raises(mr.MillraceError, match="left early") as refused:
        next(iter(loader))
    del refused, loader  # ends the worker (the refusal's traceback holds it in a cycle)
    gc.collect()


# ---------------------------------------------------------------------------- checkpoints


def test_a_dataset_checkpointed_before_its_first_item_keeps_its_start(daemon, tmp_path):
    """A dataset made with ``start_step`` or ``cursor`` and checkpointed before its first
    item (a checkpoint at step 0 of a run) said ``{"cursor": None, "step": -1}``, so the
    run resumed from it served step 0 on, not its start. Its state_dict is the start the
    arguments give, through torch.save and torch.load(weights_only=True)."""
    ref = dataset(daemon, "start-ref", "compact", steps=4)
    want = [owned(d) for d in torch.utils.data.DataLoader(ref, batch_size=None)]
    ref.close()
    blob = MillraceIterableDataset.state_of(want[1])["cursor"]
    for kw, first in ((dict(start_step=2), 2), (dict(cursor=blob), 2)):
        ckpt = tmp_path / "data.pt"
        torch.save({"data": dataset(daemon, "start", "compact", **kw).state_dict()}, ckpt)
        state = torch.load(ckpt, weights_only=True)["data"]
        resumed = dataset(daemon, "start", "compact", steps=2, **kw)
        resumed.load_state_dict(state)
        got = [owned(d) for d in torch.utils.data.DataLoader(resumed, batch_size=None)]
        resumed.close()
        assert_same_items(got, want[first:], f"resumed from a checkpoint made with {kw}")


def test_check_plans_agree_takes_a_dataloader_item(daemon, tmp_path):
    """A DataLoader trainer had no way to check that every node plans alike: with a
    worker, its process holds no client, and the dataset has no WELCOME or plan state,
    so ``check_plans_agree`` failed on every rank. An item carries what it compares:
    its record equals a client's at the same step, in a real (one-rank) gloo group."""
    import torch.distributed as dist

    from millrace.control import check_plans_agree, plan_record

    ds = dataset(daemon, "agree-ds", "compact", steps=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    items = list(loader)
    del loader
    with mr.Client(daemon.sock, 0, DP, job="agree-c", register_cuda=False,
                   reconnect_timeout=0) as c:
        c.next_batch()
        c.next_batch()
        want = plan_record(c, 0, "h")
    got = plan_record(items[-1], 0, "h")
    assert got == want and got["state"] is not None
    with pytest.raises(ValueError, match="no plan_state, fingerprint"):
        plan_record({"cursor": items[-1]["cursor"], "step": 1}, 0)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)
    try:
        assert check_plans_agree(items[-1])["state"] == want["state"]
    finally:
        dist.destroy_process_group()
