"""The arrays a compact slot determines, derived three ways on hand-made slots: numpy
(``millrace.client.derive_compact``, what ``Batch`` computes on first access), torch's
device ops (``derive_tensors``, the CUDA path run on CPU tensors) and that same
derivation in the buffers a CUDA graph replays (``_Graphed``, run eagerly on the CPU).
They must agree with each other on any slot, padding and odd lengths included; the
daemon-driven test in test_serve.py checks them against the expanded layout.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from serve_helpers import import_path_for_package

try:
    import millrace as mr
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, import_path_for_package())
    import millrace as mr

from millrace.client import SLOT_FIELDS, Batch, derive_compact  # noqa: E402


def hand_batch(rng, n_rows: int, seq: int, dtype, mbr: int) -> Batch:
    """A detached compact batch of random ids, document starts (about one position in
    12) and real counts from 0 to past the row, split in micro-batches of ``mbr`` rows."""
    width = seq + 1
    hi = 60000 if dtype == np.uint16 else 2**31 - 1
    arrays = {
        "rows": rng.integers(0, hi, (n_rows, width)).astype(dtype),
        "doc_starts": np.packbits(rng.random((n_rows, width)) < 1 / 12, axis=1,
                                  bitorder="little"),
        "row_real_tokens": rng.choice([0, 1, 2, width // 2, seq, width, width + 3],
                                      n_rows).astype(np.int32),
        "domain": rng.integers(0, 5, n_rows).astype(np.int32),
        "row_loss_tokens": rng.integers(0, seq, n_rows).astype(np.int32),
    }
    d = derive_compact(arrays["rows"], arrays["doc_starts"], arrays["row_real_tokens"], seq)
    cu = d["cu_seqlens"]
    views = tuple(arrays[n] for n in SLOT_FIELDS["compact"])
    return Batch(7, 7, n_rows, seq, len(cu), int(np.diff(cu).max()), 0, 0, 0, b"", mbr,
                 views, None, None, "compact")


def test_cu_seqlens_from_the_starts_equal_the_ends_definition():
    """cu_seqlens are the piece starts among the inputs: the same entries as the ends of
    PROTOCOL section 4 (next start inside the row, or the row's end)."""
    rng = np.random.default_rng(1)
    for n_rows, seq in [(1, 1), (1, 7), (3, 8), (4, 33), (2, 4096)]:
        b = hand_batch(rng, n_rows, seq, np.uint16, n_rows)
        ds, real = b._view("doc_starts"), b._view("row_real_tokens")
        width, idx = seq + 1, np.arange(seq + 1)
        start = np.unpackbits(ds, axis=1, count=width, bitorder="little").astype(bool)
        start |= idx == np.clip(real, 0, width)[:, None]
        start[:, 0] = True
        ends = np.concatenate([start[:, 1:seq], np.ones((n_rows, 1), bool)], axis=1)
        flat = (np.arange(n_rows)[:, None] * seq + idx[1:])[ends]
        np.testing.assert_array_equal(b.cu_seqlens, np.concatenate([[0], flat]))


def row_bounds_of(b: Batch) -> list:
    """Each row's ``[end entry, longest piece]`` in ``b.cu_seqlens``: what a daemon of
    2026-12-06 on writes in a compact slot's ``row_bounds``."""
    cu, seq = b.cu_seqlens, b.seq_len
    ends = [int(np.searchsorted(cu, (r + 1) * seq)) for r in range(b.rows)]
    return [[e, int(np.diff(cu[i0 : e + 1]).max())] for i0, e in zip([0] + ends, ends)]


def with_row_bounds(b: Batch, rb=None) -> Batch:
    """``b`` with a ``row_bounds`` array: ``rb``, or the true one."""
    rb = row_bounds_of(b) if rb is None else rb
    return Batch(b.step, b.plan_step, b.rows, b.seq_len, b.cu_len, b.max_seqlen, 0, 0, 0,
                 b"", b.micro_batch_rows, b._views + (np.asarray(rb, np.int32),), None,
                 None, "compact")


def test_micro_batch_bounds_from_row_bounds_equal_the_derived_ones_and_are_checked():
    """Each row's end entry and longest piece give the bounds the starts give; bounds
    that do not rise to cu_len - 1 or pieces longer than a row are a ProtocolError."""
    rng = np.random.default_rng(3)
    for n_rows, seq, mbr in [(8, 64, 1), (8, 64, 2), (6, 17, 3), (4, 9, 2), (8, 4096, 2)]:
        b = hand_batch(rng, n_rows, seq, np.uint16, mbr)
        good = with_row_bounds(b)
        assert good._row_bounds() is not None and b._row_bounds() is None
        assert good.micro_batch_bounds() == b.micro_batch_bounds()
        ends, tops = zip(*row_bounds_of(b))
        ends, tops = list(ends), list(tops)
        for bad in ([(e + 1, t) for e, t in zip(ends, tops)],
                    [(e, t) for e, t in zip(ends[:-1] + [ends[-1] - 1], tops)],
                    [(e, seq + 1) for e in ends],
                    [(0, t) for t in tops]):
            with pytest.raises(mr.ProtocolError):
                with_row_bounds(b, bad).micro_batch_bounds()


def test_micro_batch_bounds_cut_cu_seqlens_at_row_edges():
    """Bounds from the starts alone equal those cut from the derived cu_seqlens; a step
    of one micro-batch takes them from the header."""
    rng = np.random.default_rng(2)
    for n_rows, seq, mbr in [(8, 64, 1), (8, 64, 2), (6, 17, 3), (4, 9, 4)]:
        b = hand_batch(rng, n_rows, seq, np.uint16, mbr)
        bounds = b.micro_batch_bounds()  # before any derivation: the cheap path
        assert b._derived is None or mbr == n_rows
        cu = b.cu_seqlens
        assert len(bounds) == n_rows // mbr
        for m, (i0, i1, top) in enumerate(bounds):
            assert cu[i0] == m * mbr * seq and cu[i1] == (m + 1) * mbr * seq
            assert top == int(np.diff(cu[i0 : i1 + 1]).max())
        mbs = b.micro_batches()
        assert [int(mb.cu_seqlens[-1]) for mb in mbs] == [mbr * seq] * len(mbs)
        assert [mb.max_seqlen for mb in mbs] == [t for _, _, t in bounds]


def test_micro_batch_bounds_refuse_cu_seqlens_without_a_row_edge():
    """An expanded slot whose cu_seqlens skips a row edge (a daemon gone wrong) cannot be
    split: a ProtocolError names the edge, for an edge inside and for the last one."""
    seq, rows = 4, 2
    zeros = np.zeros((rows, seq), dtype=np.int32)
    for cu, edge in [([0, 2, 6, 8], 4), ([0, 4, 6], 8)]:
        views = (zeros, zeros, zeros.astype(np.uint8), zeros, np.array(cu, dtype=np.int32),
                 np.zeros(rows, np.int32), np.zeros(rows, np.int32))
        b = Batch(3, 3, rows, seq, len(cu), 4, 0, 0, 0, b"", 1, views, None, None, "expanded")
        with pytest.raises(mr.ProtocolError, match=f"no entry at the row edge {edge}"):
            b.micro_batch_bounds()
    ok = Batch(3, 3, rows, seq, 4, 4, 0, 0, 0, b"", 1,
               views[:4] + (np.array([0, 3, 4, 8], dtype=np.int32),) + views[5:], None,
               None, "expanded")
    assert ok.micro_batch_bounds() == [(0, 2, 3), (2, 3, 4)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_device_ops_and_their_graph_form_equal_numpy(device):
    """``derive_tensors`` (the device ops of the CUDA path) and ``_Graphed`` (the same in
    static buffers, cloned per step) equal numpy's arrays on random slots; a second slot
    through the same buffers leaves the first step's tensors as they were. On ``cuda``
    (a GPU only) the graph is captured and replayed on a side stream, as a trainer's."""
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from millrace.torch_adapter import _slot_bytes
    from millrace.torch_derive import _Graphed, derive_tensors

    rng = np.random.default_rng(3)
    # With its index, as batch_to_torch hands the device on (``_cuda_stream``).
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else \
        torch.device("cpu")
    stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
    for n_rows, seq, dtype in [(1, 1, np.uint16), (2, 7, np.uint16), (3, 8, np.int32),
                               (4, 33, np.uint16), (8, 4096, np.uint16),
                               (2, 100, np.int32)]:
        first = hand_batch(rng, n_rows, seq, dtype, n_rows)
        host, layout = _slot_bytes(first)
        g = _Graphed(dev, stream, layout, n_rows, seq, host.numel())
        assert (g.graph is not None) == (dev.type == "cuda")
        kept = None
        for b in (first, hand_batch(rng, n_rows, seq, dtype, n_rows)):
            host, layout = _slot_bytes(b)
            eager = derive_tensors(host.to(dev), layout, n_rows, seq, b.cu_len)
            graphed, own = g.run(host, stream, b.cu_len)
            if stream is not None:
                stream.synchronize()
            for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens",
                         "domain", "row_loss_tokens"):
                want = torch.from_numpy(np.ascontiguousarray(getattr(b, name)).astype(np.int64))
                assert eager[name].device.type == graphed[name].device.type == dev.type
                assert torch.equal(eager[name].long().cpu(), want), (n_rows, seq, name)
                assert torch.equal(graphed[name].long().cpu(), want), (n_rows, seq, name)
                assert graphed[name].dtype == eager[name].dtype, name
                assert graphed[name].untyped_storage().data_ptr() == \
                    own.untyped_storage().data_ptr(), name
            assert eager["cu_seqlens"].dtype == torch.int32
            assert eager["position_ids"].dtype == torch.int32
            assert eager["loss_mask"].dtype == torch.uint8
            if kept is None:
                kept = {k: (v, v.clone()) for k, v in graphed.items()}
        for name, (t, copy) in kept.items():
            assert torch.equal(t, copy), f"the second step overwrote the first's {name}"


@pytest.mark.parametrize("dtype,want", [(np.uint8, "int32"), (np.int8, "int32"),
                                        (np.int16, "int32"), (np.uint16, "int32"),
                                        (np.int32, "int32"), (np.uint32, "int64"),
                                        (np.int64, "int64")])
def test_token_ids_reach_torch_as_int32_or_int64_on_every_path(dtype, want):
    """A compact slot stores ids in the shards' dtype (uint16, often); torch gets them as
    int32 (int64 where int32 cannot hold them) on the CPU, copied or not, and from the
    device ops of the CUDA path alike: nn.Embedding takes no uint16 or uint8 index."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import _slot_bytes, derive_tensors

    b = hand_batch(np.random.default_rng(3), 3, 16, dtype, 3)
    host, layout = _slot_bytes(b)
    dev = derive_tensors(host, layout, b.rows, b.seq_len, b.cu_len)
    for copy in (True, False):
        t = b.to_torch(copy=copy)
        for k in ("tokens", "labels"):
            assert getattr(t, k).dtype == dev[k].dtype == getattr(torch, want), (copy, k)
            np.testing.assert_array_equal(getattr(t, k).numpy(), getattr(b, k).astype(want))
            np.testing.assert_array_equal(dev[k].numpy(), getattr(b, k).astype(want))
    assert b.tokens.dtype == dtype  # numpy keeps the slot's own dtype


def test_the_cuda_paths_tensors_are_contiguous_and_labels_apart_from_tokens():
    """The CUDA path (``derive_tensors`` eager, ``_Graphed`` replayed; both run here on the
    CPU) gave ``tokens`` and ``labels`` as two views of one ``[rows, seq_len + 1]``
    tensor, where the CPU path gives separate dense ones: ``labels.view(-1)`` raised on
    a GPU only, and ``labels[labels == pad] = -100`` rewrote ``tokens`` there. Every
    tensor is now dense and ``labels`` is apart from ``tokens`` on every path."""
    torch = pytest.importorskip("torch")
    from millrace.torch_adapter import _slot_bytes
    from millrace.torch_derive import _Graphed, derive_tensors

    b = hand_batch(np.random.default_rng(5), 4, 33, np.uint16, 4)
    host, layout = _slot_bytes(b)
    g = _Graphed(torch.device("cpu"), None, layout, b.rows, b.seq_len, host.numel())
    paths = {"cpu": b.to_torch().as_dict(),
             "eager": derive_tensors(host, layout, b.rows, b.seq_len, b.cu_len),
             "graph": g.run(host, None, b.cu_len)[0]}
    for path, d in paths.items():
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens",
                     "domain", "row_loss_tokens"):
            assert d[name].is_contiguous(), (path, name)
        tokens = d["tokens"].clone()
        d["labels"].view(-1)[:] = -100
        assert torch.equal(d["tokens"], tokens), f"{path}: writing labels changed tokens"


def test_a_prefetched_batchs_copy_is_waited_for_when_it_is_handed_out(monkeypatch):
    """TorchClient copies the next batch while the trainer runs this one. The current
    stream was made to wait for that copy when it was issued, so the kernels of the
    step the trainer was about to run waited for the NEXT step's copy: the copy never
    overlapped compute. A prefetched batch's wait is now made when it is handed out.
    No GPU here: torch.cuda's event and stream are stood in by recorders, and
    ``_fenced`` and ``_handed_out`` run as TorchClient runs them."""
    torch = pytest.importorskip("torch")
    from millrace import torch_adapter as ta

    log = []

    class Event:
        def record(self, stream):
            assert stream == "side"
            log.append(("record", self))

    class Stream:
        def wait_event(self, event):
            log.append(("wait", event))

    current = Stream()
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: current)
    b = hand_batch(np.random.default_rng(7), 4, 33, np.uint16, 4)
    out, bounds = b.to_torch().as_dict(), b.micro_batch_bounds()
    # Called directly (to_torch): the current stream waits at once.
    tb = ta._fenced(b, "cuda:0", "side", out, bounds, owners=())
    assert [k for k, _ in log] == ["record", "wait"] and tb._copied is None
    # Prefetched: recorded now, waited for when handed out, once.
    log.clear()
    ta._DEFER_WAIT.on = True
    try:
        tb = ta._fenced(b, "cuda:0", "side", out, bounds, owners=())
    finally:
        ta._DEFER_WAIT.on = False
    assert [k for k, _ in log] == ["record"]
    assert ta._handed_out(tb) is tb
    assert [k for k, _ in log] == ["record", "wait"] and log[1][1] is log[0][1]
    ta._handed_out(tb)
    assert len(log) == 2, "a batch handed out twice waits once"
