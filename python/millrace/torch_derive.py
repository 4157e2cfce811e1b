"""The arrays a compact slot determines, derived by torch ops on any device (imports
torch): the CUDA path of :func:`millrace.torch_adapter.batch_to_torch` runs them after
its one host-to-device copy, kernel by kernel (:func:`derive_tensors`) or replayed as a
CUDA graph (:class:`_Graphed`). numpy's form of the same is
:func:`millrace.client.derive_compact`; tests/python/test_derive.py holds them equal.
docs/DESIGN.md, "The trainer's step on CUDA", says why the graph.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

__all__ = ["derive_tensors"]


_TORCH_INT = {np.dtype("uint8"): torch.uint8, np.dtype("int8"): torch.int8,
              np.dtype("int16"): torch.int16, np.dtype("uint16"): torch.int16,
              np.dtype("int32"): torch.int32, np.dtype("uint32"): torch.int32,
              np.dtype("int64"): torch.int64}

# Per (device, rows, seq_len): tensors every step's derivation reads and none writes, so
# that a step launches no arange and no fill (a few stages per run: a handful at most).
_CONSTS: dict = {}


def _consts(dev, n_rows: int, seq: int):
    """(idx, pow2, flat, last): positions 0..seq as int32; the 8 bit masks of a doc_starts
    byte; each input position's flattened end offset ``r * seq + j + 1`` (int32); and a
    row's last input position (bool), which always ends a flash-attention segment."""
    key = (str(dev), n_rows, seq)
    c = _CONSTS.get(key)
    if c is None:
        if len(_CONSTS) >= 16:
            # Kernels of any client's stream may still read them, and the allocator
            # knows only the stream that made them: let those finish before the memory
            # goes back to it (a 17th shape in one process is rare; a sync then is cheap).
            for d in {t[0].device for t in _CONSTS.values() if t[0].is_cuda}:
                torch.cuda.synchronize(d)
            _CONSTS.clear()
        idx = torch.arange(seq + 1, dtype=torch.int32, device=dev)
        pow2 = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=dev)
        flat = (torch.arange(n_rows, dtype=torch.int32, device=dev)[:, None] * seq
                + idx[1:]).reshape(-1)
        last = torch.zeros(seq, dtype=torch.bool, device=dev)
        last[-1] = True
        if dev.type == "cuda":
            # Written on this stream, read on any client's: finish writing them first.
            torch.cuda.current_stream(dev).synchronize()
        c = _CONSTS[key] = (idx, pow2, flat, last)
    return c


def _derive(buf, layout: dict, n_rows: int, seq: int, cu_len: int) -> dict:
    """The arrays a compact slot determines, from its bytes ``buf``: ``tokens`` and
    ``labels`` (views of the rows' ids widened to int32, or int64 for uint32 and int64
    ids), ``loss_mask`` (uint8),
    ``position_ids`` (int32), ``cu_seqlens`` (int32, ``[cu_len]``, zeros past the last
    boundary), ``domain`` and ``row_loss_tokens``. About twenty kernels, none of whose
    sizes depends on the data, so on CUDA nothing synchronises and a graph can hold them."""
    idx, pow2, flat, last = _consts(buf.device, n_rows, seq)
    width = seq + 1

    def field(name):
        at, dtype, shape = layout[name]
        n = int(np.prod(shape)) * dtype.itemsize
        t = buf[at : at + n].view(_TORCH_INT[dtype]).view(shape)
        if dtype == np.dtype("uint16"):
            t = t.to(torch.int32) & 0xFFFF
        elif dtype == np.dtype("uint32"):
            t = t.to(torch.int64) & 0xFFFFFFFF
        elif name == "rows" and dtype.itemsize < 4:
            # uint8 / int8 / int16 ids: int32, as the CPU path gives them (torch_adapter
            # _id_dtype); nn.Embedding takes no narrower index (doc_starts stays uint8).
            t = t.to(torch.int32)
        return t

    real = field("row_real_tokens")[:, None]
    # A document starts where its bit is set, and padding starts at the row's real count
    # (a count past the row matches no position, as if clamped). Position 0 needs no
    # flag: nothing below reads it as a start.
    bits = (field("doc_starts").unsqueeze(-1) & pow2).view(n_rows, -1)[:, :width]
    start = torch.logical_or(bits, idx == real)
    first = torch.cummax(start * idx, dim=1).values
    # An input position ends its segment where the next position starts one, and at the
    # row's end; each end goes to its rank in cu_seqlens by a scatter (a boolean index
    # would wait on its size).
    ends = torch.logical_or(start[:, 1:], last).view(-1)
    cu = torch.zeros(cu_len, dtype=torch.int32, device=buf.device)
    cu.scatter_(0, torch.cumsum(ends, 0) * ends, flat * ends)
    rows = field("rows")
    # Views of the row: made dense by the caller (a copy each, or the graph's copy into
    # its output region), so tokens and labels never share memory.
    return {"tokens": rows[:, :-1], "labels": rows[:, 1:],
            "position_ids": idx[:seq] - first[:, :seq],
            "loss_mask": ((idx[1:] < real) & ~start[:, 1:]).view(torch.uint8),
            "cu_seqlens": cu, "domain": field("domain"),
            "row_loss_tokens": field("row_loss_tokens")}


def derive_tensors(buf, layout: dict, n_rows: int, seq: int, cu_len: int) -> dict:
    """The batch's tensors from a compact slot's bytes ``buf`` (uint8, on any device),
    with device ops only: no host round trip and no size-dependent op (``cu_len`` is the
    slot header's), so on CUDA nothing synchronises. ``layout`` maps each stored array to
    (byte offset in ``buf``, numpy dtype, shape). Every tensor is dense, ``tokens`` and
    ``labels`` each their own, as on the CPU path (``labels.view(-1)`` works, and an
    in-place edit of ``labels`` leaves ``tokens`` alone)."""
    d = _derive(buf, layout, n_rows, seq, cu_len)
    d["tokens"], d["labels"] = d["tokens"].contiguous(), d["labels"].contiguous()
    return d


def _up64(n: int) -> int:
    return -(-n // 64) * 64


def _on(stream):
    """``torch.cuda.stream(stream)``, or nothing on the CPU (``stream`` None)."""
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


class _Graphed:
    """:func:`_derive` for one slot shape, captured once as a CUDA graph.

    Eager, a compact step costs the trainer's CPU 51 dispatched ops, 17 of them kernels
    (63 us of dispatch alone on the 2-vCPU VM, before any launch; docs/BENCHMARKS.md,
    "The trainer's step on CUDA"). Replayed, it costs one copy, one replay and one
    clone (15 ops). The graph reads the slot's bytes from a static device buffer
    (``inp``) and writes every array into a static output region (``out``); each step
    copies the slot into ``inp``, replays, and clones ``out``, so the tensors handed out
    are the trainer's own, as the eager path's are. ``cu_seqlens`` is captured at its
    largest (``rows * seq_len + 1``) and cut to the header's ``cu_len``. On a CPU device
    (the tests) nothing is captured and :meth:`run` derives eagerly into the same
    buffers.
    """

    def __init__(self, dev, stream, layout: dict, n_rows: int, seq: int, nbytes: int):
        cap = n_rows * seq + 1
        with _on(stream):
            # The constants the graph reads: kept alive here whatever the cache does.
            self.consts = _consts(dev, n_rows, seq)
            probe = _derive(torch.zeros(nbytes, dtype=torch.uint8, device=dev), layout,
                            n_rows, seq, cap)
        # Each array's place in the output region: (element offset, dtype, shape,
        # contiguous strides), worked out once, since every step views a new clone.
        self.specs, at = {}, 0
        for name, t in probe.items():
            shape = tuple(t.shape)
            strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            self.specs[name] = (at // t.element_size(), t.dtype, shape, strides)
            at += _up64(t.numel() * t.element_size())
        start = _up64(nbytes)
        with _on(stream):  # the side stream's memory, as everything the graph touches
            self.static = torch.empty(start + at, dtype=torch.uint8, device=dev)
        self.inp, self.out = self.static[:nbytes], self.static[start:]
        dst = self.views(self.out)

        def body():
            for name, t in _derive(self.inp, layout, n_rows, seq, cap).items():
                dst[name].copy_(t)

        self.body, self.graph, self.checked = body, None, False
        if dev.type == "cuda":
            with _on(stream):
                for _ in range(2):  # warm-up outside the capture: lazy initialisations
                    body()
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                body()
            self.graph = graph

    def views(self, buf) -> dict:
        """The arrays as views of ``buf`` (the output region or a clone of it)."""
        typed, out = {}, {}
        for name, (off, dtype, shape, strides) in self.specs.items():
            base = typed.get(dtype)
            if base is None:
                base = typed[dtype] = buf.view(dtype)
            out[name] = base.as_strided(shape, strides, base.storage_offset() + off)
        return out

    def run(self, host, stream, cu_len: int, non_blocking: bool = True):
        """The batch's tensors from the slot bytes ``host``, and the one tensor they view."""
        with _on(stream):
            self.inp.copy_(host, non_blocking=non_blocking)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.body()
            own = self.out.clone()
        d = self.views(own)
        d["cu_seqlens"] = d["cu_seqlens"][:cu_len]
        return d, own
