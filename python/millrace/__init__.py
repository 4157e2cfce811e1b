"""millrace: the trainer-side client of the millrace data daemon.

The daemon (``millrace serve``) plans every global batch deterministically and writes each
data-parallel rank's rows into a shared-memory ring; this package reads them with zero
copies. The wire protocol is docs/PROTOCOL.md in the millrace repository.

Quick start (numpy only)::

    import millrace

    # None: the daemon's default socket (millrace.default_socket()); else [serve] socket.
    client = millrace.Client(None, dp_rank=rank, dp_size=world,
                             replica=f"tp{tp_rank}", replicas=tp_size)
    if checkpoint:
        client.load_state_dict(checkpoint["data"])     # resume at the step after it
    for batch in client:
        batch.tokens, batch.labels          # [rows, seq_len], read-only views into the ring
        batch.loss_mask, batch.position_ids
        batch.cu_seqlens, batch.max_seqlen  # flash-attention varlen boundaries
        for mb in batch.micro_batches():    # rows split in order
            ...
        checkpoint = {"data": client.state_dict(), ...}

Views are valid until the client has handed out ``hold`` more batches (``hold=1``: until
you ask for the next one); use ``batch.copy()`` to keep one. With torch,
``batch.to_torch("cuda")`` copies to the GPU on a side stream (from the ring registered as
pinned memory) and releases the slot only once the copy completed; ``batch.to_torch()``
gives CPU copies (``copy=False``: read-only zero-copy views, which an in-place op turns
into a SIGSEGV); see :mod:`millrace.torch_adapter` for ``TorchClient`` and
``MillraceIterableDataset``.

If the daemon restarts, the client reconnects with the cursor of the last batch it handed
out and the stream continues at exactly the next step.
"""

from .client import (
    PROTOCOL_VERSION,
    Batch,
    Client,
    DaemonError,
    DaemonGone,
    HandshakeTimeout,
    MicroBatch,
    MillraceError,
    ProtocolError,
    Refused,
    StaleBatch,
    default_socket,
)
from .control import ChangeRefused, Control, check_plans_agree, forward_change

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Batch",
    "ChangeRefused",
    "Client",
    "Control",
    "DaemonError",
    "DaemonGone",
    "HandshakeTimeout",
    "MicroBatch",
    "MillraceError",
    "ProtocolError",
    "Refused",
    "StaleBatch",
    "check_plans_agree",
    "default_socket",
    "forward_change",
    "TorchClient",
    "TorchBatch",
    "MillraceIterableDataset",
]


def __getattr__(name):
    # torch is optional: import the adapter only when one of its names is used.
    if name in ("TorchClient", "TorchBatch", "MillraceIterableDataset"):
        from . import torch_adapter

        return getattr(torch_adapter, name)
    raise AttributeError(f"module 'millrace' has no attribute {name!r}")
