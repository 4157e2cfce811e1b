"""torch integration (optional: importing this module imports torch).

- :func:`batch_to_torch` (also ``Batch.to_torch``): CPU tensors, copies by default
  (``copy=False``: zero-copy views of the ring, with the numpy views' lifetime and
  READ-ONLY: the ring is mapped read only, so an in-place op on one is a SIGSEGV), or
  CUDA tensors copied on a side stream. ``tokens`` and ``labels`` are int32 (int64 for
  ids int32 cannot hold) on every device, whatever the slot stores (uint16, often).
  A compact slot goes to CUDA as ONE copy of its contiguous bytes, then device ops
  derive labels, positions, mask and cu_seqlens (:mod:`millrace.torch_derive`): one
  replay of a CUDA graph captured for the slot's shape (checked against the eager
  kernels on its first step), or with ``cuda_graphs=False`` some twenty kernels
  (unmeasured: written without a GPU).
  For a CUDA copy an event is recorded and the ring slot is released only after that
  event completed, so the GPU tensors never depend on the ring.
- Ring registration: the whole ring mapping is registered once per connection with
  ``cudaHostRegister(ptr, size, cudaHostRegisterReadOnly)`` so that copies are true async
  DMA from pinned memory. (The mapping is ``PROT_READ``: the default flag 0 fails on it and
  leaves an error behind that a later kernel launch would report, so the read-only flag is
  used and any error is cleared.) Any failure logs a warning and copies fall back to
  pageable memory; it never raises. Unregistered on reconnect and close. Registered at
  the first CUDA copy (``register_cuda="auto"``): a CPU-only consumer's ring stays
  pageable, and while it is registered CPU tensors are copies even with ``copy=False``,
  since the trainer's own ``non_blocking`` copy from a view of pinned memory could read
  the slot after the client released it.
- :class:`TorchClient`: iterates :class:`TorchBatch` objects on a device, prefetching the
  copy of the next batch(es) while the trainer computes.
- :class:`MillraceIterableDataset`: for ``DataLoader(ds, batch_size=None, num_workers=0)``
  (or ``num_workers=1``; then checkpoint ``MillraceIterableDataset.state_of(item)``).

Typical use::

    import torch, millrace
    from millrace.torch_adapter import TorchClient

    torch.cuda.set_device(local_rank)
    stream = TorchClient(millrace.Client(socket_path, dp_rank, dp_size,
                                         replica=f"tp{tp_rank}", replicas=tp_size),
                         device="cuda")
    if ckpt: stream.load_state_dict(ckpt["data"])
    for batch in stream:          # TorchBatch: tensors on the GPU
        loss = model(batch.tokens, batch.position_ids, ...)
        ...
        save({"data": stream.state_dict(), ...})
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.context
import os
import threading
import warnings
from collections import deque

import numpy as np
import torch

from .client import FIELDS, SLOT_FIELDS, Batch, Client, MillraceError, StaleBatch, _as_blob
from .torch_derive import _Graphed, _on, derive_tensors

__all__ = ["TorchBatch", "TorchClient", "MillraceIterableDataset", "batch_to_torch",
           "register_ring", "unregister_ring"]

log = logging.getLogger("millrace")

CUDA_HOST_REGISTER_READ_ONLY = 8
_NOT_WRITABLE = "The given NumPy array is not writable"


def _from_numpy_all(arrays: dict) -> dict:
    # Views of the ring are not writable (it is mapped read only); torch warns that it
    # does not support read-only tensors. Zero-copy tensors (``copy=False``) are documented
    # as read-only (an in-place op on one faults), so silence exactly that warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


_I32, _I64 = np.dtype(np.int32), np.dtype(np.int64)


def _id_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype torch gets token ids in: int32, or int64 for ids int32 cannot hold
    (uint32, int64). A compact slot stores the shards' own dtype (uint16, often), which
    ``nn.Embedding`` and ``cross_entropy`` reject (and torch before 2.3 lacks); the CUDA
    derivation (:mod:`millrace.torch_derive`) widens the same way, so tensors have one
    dtype on every device."""
    if dtype.itemsize > 4 or (dtype.itemsize == 4 and dtype.kind == "u"):
        return _I64
    return _I32


def _cpu_tensors(arrays: dict, copy: bool) -> dict:
    """CPU tensors of a batch's ``arrays`` (:data:`FIELDS`; ``tokens`` and ``labels``
    widened to :func:`_id_dtype`). ``copy``: each its own memory, so the caller may write
    to them (``labels`` and ``tokens`` too: of a compact slot they are views of one
    array, and ``labels[...] = -100`` must not reach ``tokens``). Else new tensors over the
    batch's memory where the dtype allows, the ring's views read-only.

    New tensor objects over new storages every call, never ones kept per slot: a
    storage can be moved under every tensor that shares it (``share_memory_()``, which
    a DataLoader worker's queue does to each tensor it sends, on a feeder thread, while
    the worker moves on), and a kept tensor would then read that copy, not the ring, at
    every later step of its slot. ``from_numpy`` costs about 5 us for the seven."""
    out = {}
    for k, v in arrays.items():
        if k == "tokens" or k == "labels":
            wide = _id_dtype(v.dtype)
            if v.dtype != wide:
                v = v.astype(wide)  # a new, dense array
            elif copy:
                v = np.array(v)
        elif copy:
            v = np.array(v)
        out[k] = v
    return _from_numpy_all(out)


def _device_sources(batch: Batch, arrays: dict) -> dict:
    """CPU tensors over the ring that a copy to another device reads: an expanded slot's,
    built once per slot of a connection and reused (the slot's memory never moves), so a
    step costs a dict copy and one slice, not seven ``from_numpy`` calls and a warnings
    context. Safe to keep, unlike tensors handed to the caller: they only ever feed
    ``.to(device)``, so nothing moves their storage. Ids int32 cannot index with (an
    expanded slot of ``token_dtype = "shard"``) and copied batches get new tensors."""
    client = batch._client
    conn = client._conn if client is not None else None
    if batch.slot_layout != "expanded" or conn is None or conn.id != batch._conn_id \
            or arrays["tokens"].dtype != _id_dtype(arrays["tokens"].dtype):
        return _cpu_tensors(arrays, copy=False)
    key = id(batch._views)  # one tuple per slot of the connection
    full = conn.torch_cpu.get(key)
    if full is None:
        full = conn.torch_cpu[key] = _from_numpy_all(dict(zip(FIELDS, batch._views)))
    cpu = {k: full[k] for k in FIELDS}
    cpu["cu_seqlens"] = full["cu_seqlens"][: batch.cu_len]
    return cpu


class _Fences:
    """Several CUDA events guarding one batch (to_torch called more than once)."""

    def __init__(self, *events):
        self.events = list(events)

    def synchronize(self):
        for e in self.events:
            e.synchronize()


class TorchBatch:
    """A batch as torch tensors: the same attribute names as :class:`millrace.Batch`;
    ``tokens`` and ``labels`` int32 (int64 for ids wider than int32) on every device.

    On a CUDA device the tensors are the trainer's own (the ring slot is free once the
    copy completed), each dense, ``tokens`` and ``labels`` separate (an in-place edit of
    ``labels`` leaves ``tokens`` alone).
    On the CPU they are copies, the trainer's own too (``tokens`` and ``labels``
    separate), unless made with ``copy=False``: then they alias the ring, share the
    batch's lifetime and are READ-ONLY (an in-place op on one, e.g.
    ``labels[:, -1] = -100``, kills the process with SIGSEGV: the ring is mapped read
    only).
    """

    def __init__(self, batch: Batch, tensors: dict, mb_bounds):
        self.step = batch.step
        self.plan_step = batch.plan_step
        self.rows = batch.rows
        self.seq_len = batch.seq_len
        self.max_seqlen = batch.max_seqlen
        self.loss_tokens = batch.loss_tokens
        self.real_tokens = batch.real_tokens
        self.cursor = batch.cursor
        self.plan_state = batch.plan_state
        self.micro_batch_rows = batch.micro_batch_rows
        self.tokens = tensors["tokens"]
        self.labels = tensors["labels"]
        self.loss_mask = tensors["loss_mask"]
        self.position_ids = tensors["position_ids"]
        self.cu_seqlens = tensors["cu_seqlens"]
        self.domain = tensors["domain"]
        self.row_loss_tokens = tensors["row_loss_tokens"]
        self._mb_bounds = mb_bounds
        # (CUDA event, device) of the copies the current stream must still wait for, set
        # while a TorchClient holds the batch prefetched (see ``_fenced``).
        self._copied = None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in FIELDS}
        d.update(step=self.step, plan_step=self.plan_step, max_seqlen=self.max_seqlen,
                 loss_tokens=self.loss_tokens, real_tokens=self.real_tokens)
        return d

    def micro_batches(self) -> list:
        """Per micro-batch dicts of tensor views (rows in order), ``cu_seqlens`` rebased."""
        out = []
        mbr = self.micro_batch_rows
        for m, (i0, i1, max_seqlen) in enumerate(self._mb_bounds):
            r0, r1 = m * mbr, (m + 1) * mbr
            cu = self.cu_seqlens[i0 : i1 + 1]
            out.append({
                "tokens": self.tokens[r0:r1], "labels": self.labels[r0:r1],
                "loss_mask": self.loss_mask[r0:r1], "position_ids": self.position_ids[r0:r1],
                "cu_seqlens": cu - cu[0], "max_seqlen": max_seqlen,
                "domain": self.domain[r0:r1], "row_loss_tokens": self.row_loss_tokens[r0:r1],
            })
        return out

    def __repr__(self):
        return (f"TorchBatch(step={self.step}, rows={self.rows}, seq_len={self.seq_len}, "
                f"device={self.tokens.device})")


def batch_to_torch(batch: Batch, device=None, non_blocking: bool = True,
                   cuda_graphs: bool = True, copy: bool = True) -> TorchBatch:
    """Tensors of ``batch`` on ``device`` (see the module docstring). ``cuda_graphs``:
    derive a compact slot's arrays on CUDA by replaying a captured graph (checked
    against the eager kernels on its first step) rather than launching each kernel.

    On the CPU the tensors are copies, the caller's own (``copy=True``, the default).
    ``copy=False``: zero-copy tensors over the ring (tokens and labels of a uint16 slot
    are a widened copy all the same), valid while the batch is, and READ-ONLY: the ring
    is mapped read only, so an in-place op on one kills the process with SIGSEGV, which
    no Python code can catch. Use it only where nothing writes to the tensors. Other
    devices get copies either way."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and batch.slot_layout == "compact" and torch.cuda.is_available():
        return _compact_to_cuda(batch, dev, non_blocking, cuda_graphs)
    arrays = batch.arrays()  # raises StaleBatch when released
    bounds = batch.micro_batch_bounds()
    if dev.type == "cpu":
        # A view of pinned memory would let the trainer's own non_blocking copy to a GPU
        # read the slot after the client released it (nothing fences it): copies then.
        return TorchBatch(batch, _cpu_tensors(arrays, copy or _pinned(batch)), bounds)
    cpu = _device_sources(batch, arrays)
    if dev.type != "cuda":
        # Other accelerators: a plain synchronous copy, so the slot can go right after.
        return TorchBatch(batch, {k: t.to(dev) for k, t in cpu.items()}, bounds)
    dev, stream = _cuda_stream(batch, dev)
    with torch.cuda.stream(stream):
        out = {k: t.to(dev, non_blocking=non_blocking) for k, t in cpu.items()}
    return _fenced(batch, dev, stream, out, bounds)


def _pinned(batch: Batch) -> bool:
    """Whether the batch's slot lies in a ring registered with CUDA (page-locked)."""
    client = batch._client
    conn = client._conn if client is not None else None
    return conn is not None and conn.id == batch._conn_id and conn.cuda_ptr is not None


def _cuda_stream(batch: Batch, dev):
    """The device (with its index) and the client's side stream on it, the ring
    registered with CUDA first when the client allows it."""
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    client = batch._client
    if client is not None and client.register_cuda is not False:
        conn = client._conn
        if conn is not None and conn.id == batch._conn_id and not conn.cuda_tried:
            with torch.cuda.device(dev):
                register_ring(client, conn)
    return dev, _state(client).stream(dev)


# Set while TorchClient prefetches: the current stream then waits for a batch's copies
# when the batch is handed out, not when its copy is issued.
_DEFER_WAIT = threading.local()


def _fenced(batch: Batch, dev, stream, out: dict, bounds, owners=None) -> TorchBatch:
    """Makes the current stream wait for the side stream's copies of ``out`` and fences
    the batch on them, so its slot is released only once they completed. ``owners``: the
    tensors whose memory ``out`` views (default: ``out``'s own).

    A prefetching :class:`TorchClient` defers the wait to when it hands the batch out
    (:func:`_handed_out`): waiting here made the kernels of the step the trainer was
    about to run wait for the NEXT step's copy, so the copy never overlapped compute."""
    event = torch.cuda.Event()
    event.record(stream)
    current = torch.cuda.current_stream(dev)
    for t in out.values() if owners is None else owners:
        # Allocated on the side stream, used on the current one: tell the allocator.
        t.record_stream(current)
    if batch._client is not None:
        batch._fence = event if batch._fence is None else _Fences(batch._fence, event)
    tb = TorchBatch(batch, out, bounds)
    if getattr(_DEFER_WAIT, "on", False):
        tb._copied = (event, dev)
    else:
        current.wait_event(event)
    return tb


def _handed_out(tb: TorchBatch) -> TorchBatch:
    """Makes the current stream wait for ``tb``'s copies, if :func:`_fenced` deferred
    that, as the batch is handed to the trainer."""
    copied, tb._copied = tb._copied, None
    if copied is not None:
        event, dev = copied
        torch.cuda.current_stream(dev).wait_event(event)
    return tb


def _slot_bytes(batch: Batch):
    """The compact slot's arrays as one contiguous uint8 CPU tensor over the ring (rows
    through row_loss_tokens), with each array's (offset into it, dtype, shape)."""
    conn = batch._client._conn if batch._client is not None else None
    if conn is None or conn.id != batch._conn_id:
        # A copied batch: its arrays are separate; pack them (one host buffer, one copy).
        views = [np.ascontiguousarray(v) for v in batch._views]
        parts, at, layout = [], 0, {}
        for name, v in zip(SLOT_FIELDS["compact"], views):
            layout[name] = (at, v.dtype, v.shape)
            pad = -v.nbytes % 64  # keep every array aligned, as in the slot
            parts += [v.view(np.uint8).ravel(), np.zeros(pad, np.uint8)]
            at += v.nbytes + pad
        return torch.from_numpy(np.concatenate(parts)), layout
    key = ("bytes", id(batch._views))  # one tuple per slot and shape of the connection
    hit = conn.torch_cpu.get(key)
    if hit is not None:
        return hit
    fields = batch._fields  # where this slot's arrays are (its header's offsets)
    names = SLOT_FIELDS["compact"]
    lo = min(int(fields[n]["offset"]) for n in names)
    layout, hi = {}, lo
    for n, v in zip(names, batch._views):
        off = int(fields[n]["offset"])
        layout[n] = (off - lo, v.dtype, v.shape)
        hi = max(hi, off + v.nbytes)
    base = conn.slot_base[batch.step % conn.slots]
    host = np.frombuffer(conn.mm, dtype=np.uint8, count=hi - lo, offset=base + lo)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        hit = conn.torch_cpu[key] = (torch.from_numpy(host), layout)
    return hit


def _compact_to_cuda(batch: Batch, dev, non_blocking: bool, graphs: bool) -> TorchBatch:
    """A compact slot on a CUDA device: ONE host-to-device copy of the slot's contiguous
    bytes (from the registered ring when registration worked), then device ops build
    labels, positions, mask and cu_seqlens (int32) on the side stream: one CUDA graph
    replay (:class:`_Graphed`) or, with ``graphs`` off or unavailable, some twenty
    kernels. ``max_seqlen``, ``cu_len`` and (for one micro-batch per step) the
    micro-batch bounds come from the slot header, so nothing waits on the device.

    Unmeasured: no GPU was available where this was written; the CPU path is tested.
    """
    batch._view("rows")  # raises StaleBatch when released
    dev, stream = _cuda_stream(batch, dev)
    host, layout = _slot_bytes(batch)
    bounds = batch.micro_batch_bounds()
    state = _state(batch._client)
    g = state.graphed(dev, stream, layout, batch.rows, batch.seq_len, host.numel()) \
        if graphs else None
    if g is not None:
        out, own = g.run(host, stream, batch.cu_len, non_blocking)
        if g.checked or state.check(g, out, stream, layout, batch):
            return _fenced(batch, dev, stream, out, bounds, owners=(own,))
    with torch.cuda.stream(stream):
        buf = host.to(dev, non_blocking=non_blocking)
        out = derive_tensors(buf, layout, batch.rows, batch.seq_len, batch.cu_len)
    return _fenced(batch, dev, stream, out, bounds)


class _TorchState:
    """A client's CUDA side: its side stream per device, and its captured derivations."""

    def __init__(self):
        self.streams = {}
        self.graphs = {}
        # Set once a capture failed or a replay differed from the eager derivation:
        # this client derives eagerly from then on.
        self.graphs_off = False

    def stream(self, dev):
        s = self.streams.get(dev)
        if s is None:
            s = self.streams[dev] = torch.cuda.Stream(device=dev)
        return s

    def graphed(self, dev, stream, layout, n_rows, seq, nbytes):
        """The captured derivation of this slot shape (captured now if new), or None."""
        if self.graphs_off:
            return None
        key = (str(dev), n_rows, seq, nbytes,
               tuple((n, at, dt.str, shape) for n, (at, dt, shape) in layout.items()))
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= 8:  # a run has a few stages; many shapes: start over
                self._drop(stream)
            try:
                g = self.graphs[key] = _Graphed(dev, stream, layout, n_rows, seq, nbytes)
            except Exception as e:  # noqa: BLE001 - never crash a trainer over an optimisation
                self._off(stream, f"could not capture the slot derivation as a CUDA graph ({e})")
                return None
        return g

    def check(self, g, out, stream, layout, batch) -> bool:
        """Compares a new graph's first replay with the eager derivation of the same
        bytes (a synchronisation, once per slot shape); on a difference, turns graphs
        off for this client and says so."""
        with _on(stream):
            want = derive_tensors(g.inp, layout, batch.rows, batch.seq_len, batch.cu_len)
            same = all(torch.equal(out[k], want[k]) for k in want)
        if same:
            g.checked = True
            return True
        self._off(stream, f"the CUDA graph's arrays differ from the eager ones at step "
                          f"{batch.step}")
        return False

    def _drop(self, stream):
        if stream is not None:
            stream.synchronize()  # replays in flight use the graphs' memory
        self.graphs.clear()

    def _off(self, stream, why):
        log.warning("millrace: %s; deriving with separate kernels from now on", why)
        self.graphs_off = True
        self._drop(stream)


_DETACHED = _TorchState()


def _state(client) -> _TorchState:
    if client is None:
        return _DETACHED
    if client._torch is None:
        client._torch = _TorchState()
    return client._torch


# ---------------------------------------------------------------------------- registration


def _clear_cuda_error():
    """cudaGetLastError on the runtime torch loaded: a failed cudaHostRegister leaves an
    error that the next kernel-launch check would report as its own."""
    try:
        paths = set()
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcudart" in line:
                    paths.add(line.split()[-1])
        for p in paths:
            ctypes.CDLL(p).cudaGetLastError()
    except Exception:  # best effort
        pass


def register_ring(client, conn) -> bool:
    """Registers the whole ring mapping of ``conn`` (once); never raises."""
    if conn.cuda_tried:
        return conn.cuda_ptr is not None
    conn.cuda_tried = True
    try:
        if not torch.cuda.is_available():
            return False
        view = np.frombuffer(conn.mm, dtype=np.uint8)
        ptr = int(view.__array_interface__["data"][0])
        size = len(conn.mm)
        del view
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, CUDA_HOST_REGISTER_READ_ONLY))
        if err != 0:
            _clear_cuda_error()
            log.warning("millrace: cudaHostRegister of the ring (%d bytes, read-only) failed "
                        "with cudaError %d; copying from pageable memory instead", size, err)
            return False
        conn.cuda_ptr = ptr
        conn.cuda_dev = torch.cuda.current_device()
        log.info("millrace: ring of %d bytes registered with CUDA (read-only)", size)
        return True
    except Exception as e:  # noqa: BLE001 - never crash a trainer over an optimisation
        _clear_cuda_error()
        log.warning("millrace: could not register the ring with CUDA (%s); copying from "
                    "pageable memory instead", e)
        return False


def unregister_ring(conn):
    """cudaHostUnregister of a registered ring; never raises."""
    ptr, conn.cuda_ptr = conn.cuda_ptr, None
    if ptr is None:
        return
    try:
        # On the device it was registered on: the registration belongs to that device's
        # context, and a process that drives several GPUs may have another current now.
        dev = getattr(conn, "cuda_dev", None)
        with torch.cuda.device(dev if dev is not None else torch.cuda.current_device()):
            err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
        if err != 0:
            _clear_cuda_error()
            log.warning("millrace: cudaHostUnregister failed with cudaError %d", err)
    except Exception as e:  # noqa: BLE001
        log.warning("millrace: cudaHostUnregister failed: %s", e)


# ---------------------------------------------------------------------------- iteration


def _retried_to_torch(owner, b: Batch, device, **kw):
    """``b.to_torch`` for an ``owner`` that keeps ``b`` as ``_pending`` to retry a failed
    copy. A batch that went stale meanwhile (its connection ended) can never succeed:
    it is dropped, so the error is raised once, not on every later call."""
    try:
        return b.to_torch(device, **kw)
    except StaleBatch:
        owner._pending = None
        raise


class TorchClient:
    """Iterates :class:`TorchBatch` objects on ``device``, prefetching ``prefetch`` copies.

    ``client`` is a :class:`millrace.Client` (not yet connected) or the keyword arguments
    of one. Its ``hold`` is raised to ``prefetch + 1``. :meth:`state_dict` describes the
    last batch returned to you (not the prefetched ones), so a checkpoint resumes exactly.
    On the CPU (``device="cpu"``) the tensors are copies, yours to keep and write to;
    ``copy=False`` makes them zero-copy views of the ring instead, valid until you ask
    for the next batch and READ-ONLY: an in-place op on one kills the process with
    SIGSEGV (the ring is mapped read only). A copy to the device that fails (CUDA out of
    memory) loses nothing: the next call retries that batch. ``cuda_graphs`` (compact
    slots on CUDA): derive each step by replaying a captured graph (:class:`_Graphed`;
    at most about 90 bytes of device memory per token of a slot, held while the client
    lives) rather than kernel by kernel.
    """

    def __init__(self, client=None, device="cuda", prefetch: int = 1, non_blocking=True,
                 cuda_graphs: bool = True, copy: bool = True, **client_kwargs):
        if client is None:
            client = Client(**client_kwargs)
        elif client_kwargs:
            raise TypeError("pass either a Client or its keyword arguments")
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        hold = max(client.hold, prefetch + 1)
        conn = client._conn
        if conn is not None and hold > conn.slots:
            # Checked at connect too; a connected client would otherwise wait forever.
            raise ValueError(f"prefetch={prefetch} needs hold={hold}, more than the ring's "
                             f"{conn.slots} slots: the stream would wait forever")
        self.client = client
        client.hold = hold
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.non_blocking = non_blocking
        self.cuda_graphs = cuda_graphs
        self.copy = copy
        self._queue: deque = deque()
        self._last = None
        # A batch taken from the client whose to_torch failed (CUDA out of memory): the
        # client's cursor is past it, so it is retried, never skipped.
        self._pending = None
        self._start = None  # the client's position before its first batch

    def __iter__(self):
        return self

    def __next__(self) -> TorchBatch:
        if self._start is None:
            self._start = self.client.state_dict()
        while len(self._queue) <= self.prefetch:
            b = self._pending if self._pending is not None else self.client.next_batch()
            self._pending = b
            _DEFER_WAIT.on = True
            try:
                tb = _retried_to_torch(self, b, self.device, non_blocking=self.non_blocking,
                                       cuda_graphs=self.cuda_graphs, copy=self.copy)
            finally:
                _DEFER_WAIT.on = False
            self._pending = None
            self._queue.append(tb)
        tb = _handed_out(self._queue.popleft())
        self._last = tb
        return tb

    def state_dict(self) -> dict:
        if self._last is None:
            # Before a batch was returned, the client may be past batches it took
            # (prefetched, or one whose copy failed): its start is the position.
            return self.client.state_dict() if self._start is None else dict(self._start)
        return {"cursor": bytes(self._last.cursor), "step": self._last.step}

    def load_state_dict(self, state: dict):
        self.client.load_state_dict(state)

    @property
    def welcome(self):
        return self.client.welcome

    @property
    def plan_state(self):
        """The plan state digest of the last batch returned (None before one), as
        :attr:`millrace.Client.plan_state` (the client itself is past prefetched ones)."""
        return None if self._last is None else self._last.plan_state

    def close(self):
        self._queue.clear()
        self._pending = None
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MillraceIterableDataset(torch.utils.data.IterableDataset):
    """An IterableDataset over a millrace stream, for
    ``DataLoader(ds, batch_size=None, num_workers=0)`` (or ``num_workers=1``).

    Yields dicts: the tensors of :data:`millrace.client.FIELDS` plus ``step``,
    ``plan_step``, ``max_seqlen``, ``loss_tokens``, ``real_tokens``, ``cursor`` (the
    item's cursor blob, bytes), ``plan_state`` and ``fingerprint`` (both hex strings):
    ``millrace.check_plans_agree(item)`` compares an item's plan across nodes, wherever
    the item was made. The CPU tensors are copies, yours to keep and write to
    (``copy=True``, the default; or set ``device`` to get device copies). ``copy=False``
    hands out zero-copy views of the ring instead, valid until the next item is
    requested and READ-ONLY (an in-place op on one kills the process with SIGSEGV: the
    ring is mapped read only), and only with ``num_workers=0``: in a DataLoader worker
    the items are always copies, since the worker sends each one after it moved on to
    the next batch, whose request releases the slot. The keyword arguments are those of
    :class:`millrace.Client`. A ``device`` copy that fails (CUDA out of memory) loses
    nothing: iterating again retries that batch.

    Checkpoints: ``state_of(item)`` is the position after ``item``, wherever the item was
    made; resume with ``load_state_dict`` before iterating. With ``num_workers=0``,
    ``state_dict()`` is the same for the last item yielded. With ``num_workers=1`` the
    stream lives in the worker process and runs ahead of what the trainer consumed
    (DataLoader prefetch), so ``state_dict()`` in the main process refuses loudly
    instead of returning a position that would silently repeat or skip data: checkpoint
    ``state_of(last_item)``. (torchdata's StatefulDataLoader calls ``state_dict`` in the
    worker, per item, and is correct too.) ``num_workers > 1`` is refused: every worker
    would be the same dp rank. To iterate the loader more than once with a worker, pass
    ``persistent_workers=True``: each new pass continues the stream, if the pass before ran
    to its end (``steps``). After one left early (a ``break``, an error) the DataLoader
    discards the items the worker read ahead: the next pass is refused
    (:class:`MillraceError`) rather than skip their steps, except where the worker had
    already read to the pass's end (it reads up to ``prefetch_factor`` items ahead), which
    it cannot tell from a pass run to its end. So after a ``break``, resume a new
    DataLoader from ``state_of(last item)``. Without it each pass forks a new worker with
    this dataset as loaded, whose stream would start over; it is refused
    (:class:`MillraceError`) unless ``load_state_dict`` set a new position.
    ``load_state_dict`` after a persistent worker began streaming cannot reach that
    worker: its next pass is refused; make a new DataLoader.
    """

    def __init__(self, socket, dp_rank: int, dp_size: int, device=None, copy: bool = True,
                 steps: int | None = None, **client_kwargs):
        super().__init__()
        self.socket = socket
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device
        self.copy = copy
        self.steps = steps
        self.client_kwargs = client_kwargs
        self.client = None
        self._state = None
        # A batch taken from the client whose to_torch failed, retried by the next
        # iteration, and the position before it (the last item's, or the start).
        self._pending = None
        self._yielded = None
        # The pid of the DataLoader worker that iterates this dataset (0: none): shared
        # memory that worker processes inherit, so the main process can tell that its own
        # position is not the stream's, and a second worker that the stream restarted.
        self._in_worker = multiprocessing.RawValue("q", 0)
        # In a DataLoader worker: a pass is under way or was left early (not run to its
        # end: a break, an error), so the DataLoader may have discarded items this worker
        # read ahead.
        self._open = False

    def __getstate__(self):
        d = dict(self.__dict__)
        d["client"] = d["_pending"] = None
        d["_open"] = False
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled for something other than starting a worker (copy.deepcopy, a
            # checkpoint): shared memory only travels to child processes.
            d["_in_worker"] = None
        return d

    @staticmethod
    def state_of(item: dict) -> dict:
        """The resume point after ``item`` (a dict this dataset yielded)."""
        if isinstance(item.get("cursor"), (list, tuple)):
            # A DataLoader with its default batch_size=1 collated the item: every tensor
            # got a leading dimension of 1 and the cursor became a list of one.
            raise MillraceError("this item was collated by the DataLoader (its cursor is a "
                                "list): use DataLoader(dataset, batch_size=None); each "
                                "item is already a whole batch")
        return {"cursor": bytes(item["cursor"]), "step": int(item["step"])}

    def _make_client(self):
        if self.client is None:
            self.client = Client(self.socket, self.dp_rank, self.dp_size, **self.client_kwargs)
            if self._state is not None:
                self.client.load_state_dict(self._state)
            self._yielded = self.client.state_dict()
        return self.client

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise MillraceError("MillraceIterableDataset is one dp rank's stream: use "
                                "num_workers=0 (or 1), not several workers")
        if info is not None and self._in_worker is not None:
            prior = self._in_worker.value
            if prior and prior != os.getpid() and self.client is None:
                # A DataLoader without persistent workers forks a new worker per epoch,
                # with this dataset as it was: its stream would restart from the loaded
                # state and repeat the steps the last worker served.
                raise MillraceError(
                    "MillraceIterableDataset: another DataLoader worker already streamed "
                    "this dp rank; a new one would restart from the loaded state and repeat "
                    "data. Use persistent_workers=True (or num_workers=0), or load_state_dict"
                    "(state_of(last item)) before iterating again")
            if not prior and self.client is not None:
                # This worker set the shared pid when it began: only load_state_dict in
                # the trainer's process clears it, and that state cannot reach here.
                raise MillraceError(
                    "MillraceIterableDataset: load_state_dict was called in the trainer's "
                    "process while this persistent DataLoader worker streams, and the state "
                    "cannot reach it: it would go on from its own position. Delete this "
                    "DataLoader and make a new one after load_state_dict")
            self._in_worker.value = os.getpid()
            if self._open:
                # A persistent worker's last pass was left early (a ``break``, an
                # error): the DataLoader discarded the items this worker had read ahead,
                # so going on would silently skip their steps.
                raise MillraceError(
                    "MillraceIterableDataset: the last pass over this persistent DataLoader "
                    "worker was left early (a break or an error), and the DataLoader "
                    "discarded the items the worker had read ahead of it: a new pass would "
                    "skip their steps. Delete this DataLoader, load_state_dict(state_of(last "
                    "item consumed)) and make a new one; or let every pass run to its end "
                    "(`steps`)")
        client = self._make_client()
        # In a worker, views would be wrong data: the DataLoader sends an item from a
        # feeder thread (moving its tensors to shared memory) after this generator went
        # on to the next batch, which releases the item's slot to the daemon.
        copy = self.copy or info is not None
        n = 0
        # Cleared only by a pass that runs to its end: one left by a ``break`` or an error
        # (which the trainer may not have reached) leaves it set.
        self._open = info is not None
        while self.steps is None or n < self.steps:
            b = self._pending if self._pending is not None else client.next_batch()
            self._pending = b
            tb = _retried_to_torch(self, b, self.device, copy=copy)
            self._pending = None
            d = tb.as_dict()
            d["cursor"] = bytes(b.cursor)
            # What check_plans_agree(item) compares across nodes; hex, as an int past
            # 2**63 would break a collate into a tensor.
            d["plan_state"] = f"{b.plan_state:016x}"
            d["fingerprint"] = client.fingerprint
            self._yielded = {"cursor": d["cursor"], "step": b.step}
            n += 1
            yield d
        self._open = False

    def state_dict(self) -> dict:
        if self.client is None and self._in_worker is not None and self._in_worker.value:
            raise MillraceError(
                "MillraceIterableDataset.state_dict(): this dataset is being read in a "
                "DataLoader worker process, which runs ahead of the items you consumed, so "
                "no position here is right; checkpoint MillraceIterableDataset.state_of(item) "
                "of the last item you consumed (or use num_workers=0)")
        if self.client is None:
            if not self._state:
                # The start the keyword arguments give (``cursor``, ``start_step``), as a
                # client not yet connected tells it: connects to nothing.
                return Client(self.socket, self.dp_rank, self.dp_size,
                              **self.client_kwargs).state_dict()
            step = self._state["step"]
            return {"cursor": self._state["cursor"], "step": -1 if step is None else step}
        if self._pending is not None:
            return dict(self._yielded)  # the client is past a batch never yielded
        return self.client.state_dict()

    def load_state_dict(self, state: dict):
        if self.client is not None:
            raise MillraceError("load_state_dict must come before iterating")
        self._state = {"cursor": _as_blob(state.get("cursor")), "step": state.get("step")}
        if self._in_worker is not None:
            self._in_worker.value = 0  # an explicit resume point: a new worker may start

    def close(self):
        if self.client is not None:
            self.client.close()
