"""The trainer side of the millrace wire protocol (docs/PROTOCOL.md, version 2).

A :class:`Client` is one trainer rank's connection to the node's daemon. It speaks the
frame protocol over a unix stream socket, maps the dp rank's ring (a sealed memfd) read
only, and hands out :class:`Batch` objects whose arrays are numpy views straight into
the ring: nothing is copied between the daemon's write and the trainer's read.

Lifetime of a batch
-------------------
A ring slot is reused by the daemon once every peer of the dp rank has RELEASEd it, so a
batch's views are only valid for a while. The client releases a batch once it has handed
out ``hold`` more batches (``hold=1``: when the next batch is requested). After that its
attribute accessors raise :class:`StaleBatch`, and any view taken out of it earlier may
change under you. Keep what you need longer with :meth:`Batch.copy` (or copy to the GPU,
see :meth:`Batch.to_torch`, which releases only after the copy has completed). A batch
does not keep its client alive: when the last reference to the client goes (it is
dropped without :meth:`Client.close`), the client says BYE at once and its batches are
stale, so ``Client(...).next_batch()`` as one expression hands back a stale batch. Keep
the client while you use its batches.

Faults
------
When the daemon goes away (socket EOF/reset, refused or missing socket, or an ERROR
``shutdown`` from a daemon draining on SIGTERM) the client reconnects every 0.1 s for up
to ``reconnect_timeout`` seconds, with the cursor blob of the last batch it handed out,
and the stream continues at exactly the next step. So does an ERROR ``cursor`` that stops
a ring at a live change another rank of the job brought, while no batch handed out is at
or past the change's step (the daemon's message says so; once one is, the batch was
wrong and :class:`DaemonError` is raised). Batches from the old connection stay
readable (their memfd lives while it is mapped). ``next_batch(timeout)`` gives up at its
timeout meanwhile (TimeoutError); the next call goes on retrying, within the same
``reconnect_timeout`` counted from the loss.

Before the first connection has worked, a missing socket (or one nobody listens on) is
an error at once, not after ``reconnect_timeout``: it is far more often a wrong path than
a daemon about to appear. Pass ``connect_timeout`` to wait for a daemon that is starting.
A full listen backlog (connect() fails with EAGAIN: the daemon is there, taking
connections slower than they come) is retried like a ``busy`` refusal, for up to
``reconnect_timeout`` (on a first connection, ``connect_timeout`` if that is longer).
A daemon that accepted but sends no WELCOME within ``handshake_timeout`` is not gone
(it is busy with this HELLO): :class:`HandshakeTimeout`, never a reconnect. That holds
for a reconnect's handshake too, whatever ``next_batch``'s timeout: after a node's
daemon restarts, every rank's HELLO waits its turn for admission, and a client that
hung up and sent another would drop its place and start at the back of the queue.

A Ctrl-C (any exception a signal handler raises) never leaves the connection inside a
frame. One that lands while the client reads a frame from the daemon (while streaming,
only an ERROR, after which the daemon closes anyway) ends that connection, and the next
call reconnects as above (``reconnect_timeout=0``: raises :class:`DaemonGone`). Frames
the client writes on a live connection (RELEASE, 13 bytes; BYE, 5) go out whole or not
at all: Linux queues a unix stream write that small as one buffer, and a send
interrupted while it waits for room has sent nothing. HELLO's connection is closed when
anything interrupts the handshake.

The client is not thread safe: use it from one thread (a thread that calls
:meth:`Client.next_batch` while another is inside it is refused with
:class:`MillraceError`). It is not fork safe either: a
client that has connected belongs to its process. In a child forked after that (an
``os.fork()``, a DataLoader worker started with ``fork``) its socket, ring and release
page are the parent's, so using it raises :class:`MillraceError` and closing it (or its
garbage collection) lets go of the child's copies only, never saying BYE on the parent's
connection. Create a new client in the child.

The ring is shared with a forked child, not copied on write, and the parent's next
steps refill its slots. So at every ``os.fork()`` (an ``os.register_at_fork`` hook, no
cost per step) the slots of the batches held then (handed out, not released) are copied
in the parent and mapped in the child over the ring's pages: there those batches, and
every array taken out of them before the fork, read the batch as it was, for as long as
the child likes (the batch is then the child's own, as a :meth:`Batch.copy` would be).
The copy costs a memcpy of ``hold`` slots per fork. A batch released before the fork is
stale in the child as in the parent; one whose copy failed raises :class:`StaleBatch`
there (``copy()`` it before forking to be sure).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import mmap
import os
import select
import socket as _socket
import stat
import struct
import threading
import time
import weakref
from collections import deque

import numpy as np

__all__ = [
    "Client",
    "Batch",
    "MicroBatch",
    "MillraceError",
    "Refused",
    "DaemonError",
    "DaemonGone",
    "HandshakeTimeout",
    "ProtocolError",
    "StaleBatch",
    "PROTOCOL_VERSION",
    "SLOT_LAYOUTS",
    "default_socket",
    "derive_compact",
]

log = logging.getLogger("millrace")

PROTOCOL_VERSION = 2
# RELEASE and BYE frames are at most MAX_FRAME; JSON frames (HELLO, CONTROL, every frame
# the daemon sends) at most MAX_JSON_FRAME, since a cursor blob and `status` grow with the
# plan's domains. The daemon bounds a HELLO further, by its largest blob.
MAX_FRAME = 65536
MAX_JSON_FRAME = 67108864

HELLO, WELCOME, REFUSED, RELEASE, ERROR, BYE = 1, 2, 3, 4, 5, 6
_TYPE_NAMES = {1: "HELLO", 2: "WELCOME", 3: "REFUSED", 4: "RELEASE", 5: "ERROR", 6: "BYE"}

_FRAME_HEAD = struct.Struct("<IB")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# step, plan_step, rows, seq_len, cu_len, max_seqlen, loss_tokens, real_tokens,
# cursor_len, (4 bytes), publish_ns
_SLOT_HEAD = struct.Struct("<QQIIIIQQI4xQ")
# The slot header's field-offset table: each array's offset from the slot's start, in
# SLOT_FIELDS order, then the cursor, then TRAILER_FIELDS (docs/PROTOCOL.md section 4),
# unused entries 0.
_FIELD_OFFSETS = struct.Struct("<8Q")
_FIELD_OFFSETS_AT = 64
# The cursor's plan state digest (0 from a daemon before 2026-12-06).
_PLAN_STATE_AT = 128
_SLOT_HEADER_BYTES = 256
# Slot shapes (rows, seq_len, offsets) one connection keeps views of.
_MAX_SHAPES = 64
# magic, layout version, slots, slot_bytes, slot_offset, first step
_RING_HEAD = struct.Struct("<8sIIQQQ")
_RING_MAGIC = b"MRRING01"
_PUBLISHED_AT = 64
# The release page (docs/PROTOCOL.md section 5): `released` at byte 0 (ours to write),
# `daemon_waiting` at byte 64 (the daemon's), little-endian u64 words.
_PAGE_BYTES = 4096
_PAGE_RELEASED_AT = 0
_PAGE_DAEMON_WAITING_AT = 64

# The arrays a Batch hands out (views of an expanded slot; of a compact one, tokens and
# labels are views, the rest derived on first access).
FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "domain",
          "row_loss_tokens")
# What each slot layout stores (docs/PROTOCOL.md section 4), in the order Batch keeps
# their views; the cursor follows in both.
SLOT_FIELDS = {
    "expanded": FIELDS,
    "compact": ("rows", "doc_starts", "row_real_tokens", "domain", "row_loss_tokens"),
}
SLOT_LAYOUTS = tuple(SLOT_FIELDS)
# Arrays a slot's offset table lists after the cursor (docs/PROTOCOL.md section 4): each
# row's cu_seqlens end and longest piece, host-side metadata the GPU copy leaves out. A
# daemon that predates them leaves their entries 0; the client then works without them.
TRAILER_FIELDS = {"expanded": (), "compact": ("row_bounds",)}
_INDEX = {k: {n: i for i, n in enumerate(v + TRAILER_FIELDS[k])}
          for k, v in SLOT_FIELDS.items()}

# errnos that mean "the daemon is not there (now)": retried while reconnecting.
_GONE_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE,
                errno.ECONNABORTED, errno.ENOTCONN}
# errnos of connect() that mean nobody serves this path: before a first connection has
# worked they fail at once (a wrong path), unless connect_timeout says to wait.
_NO_DAEMON_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED}
# sun_path holds 108 bytes, one of them the terminating NUL: the daemon binds no longer
# path (socket_problem in src/config/serve.rs).
_SOCKET_PATH_MAX = 107
# Refusals that a restarting or settling daemon may answer for a short while.
_RETRY_REFUSALS = {"busy", "duplicate", "peer_position"}
# A process restarted right after its predecessor died can reach the daemon before the
# daemon noticed the death: `duplicate` is retried this long on a first connect.
_DUPLICATE_GRACE = 3.0
# How long next_batch waits for one step before it warns (then again at twice as long,
# and so on): a rank whose ring waits for a TP replica that never joins, for a peer that
# does not release, or for a stuck read, otherwise hung with no word on the trainer's
# side (`millrace status` says which).
_SLOW_WAIT_WARN = 60.0
# How long close() waits for the daemon to acknowledge BYE by closing its side.
_BYE_WAIT = 5.0


def default_socket() -> str:
    """The socket ``millrace serve`` binds when its config names none: one an unprivileged
    user can create. ``$XDG_RUNTIME_DIR/millrace.sock`` when that variable is an absolute
    path, else ``/tmp/millrace-UID/millrace.sock`` (the daemon's rule, for the same user)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "millrace.sock")
    return f"/tmp/millrace-{os.geteuid()}/millrace.sock"


def _check_fallback_dir(path: str) -> None:
    """Refuses the fallback socket ``/tmp/millrace-UID/millrace.sock`` when its directory
    is not this user's own (or is a symlink): another user could have made it first in
    world-writable /tmp and be listening there as an impostor daemon
    (``check_fallback_socket_dir`` in src/config/serve.rs). Raises PermissionError."""
    uid = os.geteuid()
    fallback = f"/tmp/millrace-{uid}"
    if os.path.dirname(os.path.normpath(path)) != fallback:
        return
    try:
        st = os.lstat(fallback)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != uid:
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}"
        raise PermissionError(
            errno.EACCES,
            f"{fallback} is {what}, not this user's (uid {uid}), in world-writable /tmp: "
            "another user may be impersonating the daemon there; refusing to connect "
            "(remove it, or set $XDG_RUNTIME_DIR or the socket path)")


def _no_daemon(path: str, e: OSError) -> str:
    """Why a first connect found no daemon, with the likely cause (cf. `millrace ctl`)."""
    if e.errno == errno.ENOENT:
        why = ("no such socket: is the daemon running, and is this its [serve] socket? "
               "(`millrace check-config --config FILE` prints it)")
    else:
        why = ("connection refused: the socket file is there but no daemon listens on it "
               "(a daemon that was killed leaves it behind)")
    return f"cannot connect to {path}: {why} ({os.strerror(e.errno)})"


class MillraceError(Exception):
    """Base class of the errors this package raises."""


class Refused(MillraceError):
    """The daemon answered HELLO with REFUSED (docs/PROTOCOL.md section 2)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonError(MillraceError):
    """The daemon sent an ERROR frame (it judged this connection broke the protocol)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonGone(MillraceError, ConnectionError):
    """The daemon went away and did not come back within ``reconnect_timeout``."""


class HandshakeTimeout(MillraceError):
    """A daemon accepted the connection but sent no WELCOME within ``handshake_timeout``.

    Not retried: the daemon is there and busy with this HELLO (a seek without a cursor on
    a huge corpus can take long), and a new connection would cancel that work and start it
    over. Raise ``handshake_timeout`` (or resume from a cursor blob, which needs no seek).
    """


class ProtocolError(MillraceError):
    """The daemon (or the ring) did something docs/PROTOCOL.md does not allow."""


class StaleBatch(MillraceError):
    """A batch was used after the client released its ring slot (see ``hold``)."""


class _Gone(Exception):
    """Internal: the current connection is dead; reconnect."""


class _BacklogFull(_Gone):
    """Internal: connect() found the daemon's listen backlog full (EAGAIN). The daemon is
    there but takes connections slower than they come (or something floods it with
    them): retried like a `busy` refusal, never taken for a wrong path."""


class _ReadTimeout(_Gone):
    """Internal: a read from the daemon timed out (a _Gone wherever that means dead; the
    handshake tells it apart: a daemon that accepted and is slow to WELCOME is there)."""


# ---------------------------------------------------------------------------- frames


def encode_frame(kind: int, payload: bytes = b"") -> bytes:
    """One frame: u32 len (type + payload), u8 type, payload."""
    limit = MAX_FRAME if kind in (RELEASE, BYE) else MAX_JSON_FRAME
    if len(payload) + 1 > limit:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {limit - 1}")
    return _FRAME_HEAD.pack(len(payload) + 1, kind) + payload


def _recv_exact(sock, n: int, fds: list | None) -> bytes:
    """Reads exactly ``n`` bytes; collects passed fds into ``fds`` when given. EOF -> _Gone."""
    chunks, got = [], 0
    while got < n:
        try:
            if fds is not None:
                data, new_fds, _flags, _addr = _socket.recv_fds(sock, n - got, 4,
                                                               _socket.MSG_CMSG_CLOEXEC)
                fds.extend(new_fds)
            else:
                data = sock.recv(n - got)
        except OSError as e:
            if isinstance(e, TimeoutError):
                raise _ReadTimeout(f"reading from the daemon: {e}") from e
            if e.errno in _GONE_ERRNOS:
                raise _Gone(f"reading from the daemon: {e}") from e
            raise
        if not data:
            raise _Gone("the daemon closed the connection"
                        + (f" inside a frame ({got} of {n} bytes)" if got else ""))
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def read_frame(sock, fds: list | None = None) -> tuple[int, bytes]:
    """Reads one frame; returns (type, payload). Passed fds go to ``fds`` when given."""
    head = _recv_exact(sock, 4, fds)
    (length,) = _U32.unpack(head)
    if length == 0 or length > MAX_JSON_FRAME:
        raise ProtocolError(f"the daemon sent a frame of length {length} "
                            f"(allowed 1..={MAX_JSON_FRAME})")
    body = _recv_exact(sock, length, fds)
    return body[0], body[1:]


def _reason(payload: bytes) -> tuple[str, str]:
    try:
        obj = json.loads(payload)
        return str(obj.get("code", "?")), str(obj.get("message", ""))
    except (ValueError, AttributeError):
        return "?", payload.decode("utf-8", "replace")


def _connect_unix(sock, path: str) -> None:
    """``sock.connect(path)``; a path longer than a unix socket allows raises DaemonGone
    naming it and the limit (Python's own error, a bare "AF_UNIX path too long", named
    neither: a trainer's log did not say which setting to fix).

    A full listen backlog raises _BacklogFull: on a socket with a timeout (as ours have)
    connect() to a unix socket does not wait for room, it fails at once with EAGAIN
    (BlockingIOError), which ended a client that would have waited. Only from connect()
    does EAGAIN mean that, so it is told apart here, not in _GONE_ERRNOS."""
    try:
        sock.connect(path)
    except BlockingIOError as e:
        if e.errno != errno.EAGAIN:
            raise
        raise _BacklogFull(f"its listen backlog is full ({e.strerror}): the daemon takes "
                           "connections slower than they come") from None
    except OSError as e:
        n = len(os.fsencode(path))
        if e.errno is None and n > _SOCKET_PATH_MAX:  # Python's check, before any syscall
            raise DaemonGone(f"cannot connect to {path}: the path is {n} bytes; a unix "
                             f"socket path may have at most {_SOCKET_PATH_MAX}") from None
        raise


def _pending_frame(sock):
    """A frame the daemon sent before it closed (type, payload), or None."""
    try:
        sock.settimeout(1.0)  # it is queued already, if it is there at all
        return read_frame(sock)
    except (_Gone, OSError, ProtocolError):
        return None


def _send(sock, data: bytes) -> None:
    try:
        sock.sendall(data, _socket.MSG_NOSIGNAL)  # EPIPE, never SIGPIPE
    except OSError as e:
        if isinstance(e, TimeoutError) or e.errno in _GONE_ERRNOS:
            raise _Gone(f"writing to the daemon: {e}") from e
        raise


# ---------------------------------------------------------------------------- batches


class MicroBatch:
    """Rows ``[index * micro_batch_rows, (index + 1) * micro_batch_rows)`` of a batch.

    Array attributes are views into the batch (valid as long as it is); ``cu_seqlens`` is
    rebased to start at 0 (a new, small array) and ``max_seqlen`` / ``loss_tokens`` are
    those of these rows.
    """

    __slots__ = ("index", "tokens", "labels", "loss_mask", "position_ids", "cu_seqlens",
                 "max_seqlen", "domain", "row_loss_tokens", "loss_tokens")

    def __init__(self, index, tokens, labels, loss_mask, position_ids, cu_seqlens, domain,
                 row_loss_tokens):
        self.index = index
        self.tokens = tokens
        self.labels = labels
        self.loss_mask = loss_mask
        self.position_ids = position_ids
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(np.diff(cu_seqlens).max()) if len(cu_seqlens) > 1 else 0
        self.domain = domain
        self.row_loss_tokens = row_loss_tokens
        self.loss_tokens = int(row_loss_tokens.sum())

    def __repr__(self):
        return f"MicroBatch(index={self.index}, rows={len(self.tokens)}, loss_tokens={self.loss_tokens})"


def _compact_starts(doc_starts: np.ndarray, row_real: np.ndarray, seq_len: int) -> np.ndarray:
    """Where a piece starts in each row of a compact slot (bool, ``[rows, seq_len + 1]``):
    a bit of ``doc_starts``, position 0, and where padding starts (``row_real``)."""
    width = seq_len + 1
    real = np.clip(row_real.astype(np.int64), 0, width)
    start = np.unpackbits(doc_starts, axis=1, count=width, bitorder="little").view(bool)
    inside = np.flatnonzero(real < width)
    start[inside, real[inside]] = True
    start[:, 0] = True
    return start


def _cu_of_starts(start: np.ndarray, seq_len: int) -> np.ndarray:
    """cu_seqlens (int32) over the flattened inputs: every piece start among the inputs
    (each row's position 0 among them, so row edges are entries), then the end."""
    n_rows = start.shape[0]
    at = np.flatnonzero(start[:, :seq_len])
    cu = np.empty(len(at) + 1, dtype=np.int32)
    cu[:-1] = at
    cu[-1] = n_rows * seq_len
    return cu


def _bounds_of_rows(rb: list, mbr: int, cu_len: int, seq: int, step: int) -> list:
    """Micro-batch bounds (as :meth:`Batch.micro_batch_bounds`) from ``row_bounds``
    as a list of ``[end entry, longest piece]`` per row, checked: entries rise to
    ``cu_len - 1`` and pieces fit a row, else a ProtocolError (never a bad slice)."""
    out, i0 = [], 0
    for r in range(mbr - 1, len(rb), mbr):
        i1 = rb[r][0]
        top = max(b[1] for b in rb[r - mbr + 1 : r + 1])
        if not i0 < i1 < cu_len or not 0 < top <= seq:
            raise ProtocolError(f"step {step}: row_bounds {rb[r]} at row {r} does not fit "
                                f"cu_len {cu_len} and seq_len {seq}")
        out.append((i0, i1, top))
        i0 = i1
    if i0 != cu_len - 1:
        raise ProtocolError(f"step {step}: row_bounds end at entry {i0}, not at cu_len - 1 "
                            f"= {cu_len - 1}")
    return out


def derive_compact(rows: np.ndarray, doc_starts: np.ndarray, row_real: np.ndarray,
                   seq_len: int) -> dict:
    """``position_ids`` (int32), ``loss_mask`` (uint8) and ``cu_seqlens`` (int32) of a
    compact slot (docs/PROTOCOL.md section 4), vectorized: a piece starts where a bit of
    ``doc_starts`` is set, at position 0, and where padding starts (``row_real``)."""
    n_rows, width = rows.shape[0], seq_len + 1
    idx = np.arange(width, dtype=np.int32)
    real = np.clip(row_real.astype(np.int64), 0, width).astype(np.int32)[:, None]
    start = _compact_starts(doc_starts, row_real, seq_len)
    # A position's id is its distance to the last piece start at or before it. Over the
    # flattened rows (each row's position 0 is a start, so no piece crosses a row) that
    # start repeats once per position of its piece: a fill, where a running maximum
    # (np.maximum.accumulate) is not vectorized and took 80 of 143 µs at 8 x 4096.
    at = np.flatnonzero(start)
    first = np.repeat(at.astype(np.int32), np.diff(at, append=n_rows * width))
    position_ids = (np.arange(n_rows * width, dtype=np.int32) - first).reshape(n_rows, width)
    # An input's label counts unless it is padding or starts a piece: (a and not b) as
    # a > b over booleans.
    loss_mask = ((idx[1:] < real) > start[:, 1:]).view(np.uint8)
    # A piece that holds an input ends where the next one starts or at the row's end (a
    # piece starting at seq_len holds only a label), so its start is the entry.
    return {"position_ids": np.ascontiguousarray(position_ids[:, :seq_len]),
            "loss_mask": loss_mask, "cu_seqlens": _cu_of_starts(start, seq_len)}


class Batch:
    """This rank's slice of one global batch (docs/PROTOCOL.md section 4).

    Arrays (read-only numpy views into the ring, valid until the client releases the
    batch; see the module docstring):

    - ``tokens``, ``labels`` (``token_dtype``), ``loss_mask`` (uint8), ``position_ids``
      (int32): shape ``[rows, seq_len]``.
    - ``cu_seqlens`` (int32, ``[cu_len]``): flash-attention varlen boundaries over the
      flattened ``rows * seq_len`` inputs; ``max_seqlen`` is its longest span.
    - ``domain`` (int32, ``[rows]``, index into ``Client.domains``), ``row_loss_tokens``
      (int32, ``[rows]``).

    A compact slot (the default ``slot_layout``) stores each row's ``seq_len + 1``
    tokens, the document starts and the real-token counts: ``tokens`` and ``labels`` are
    then views of those rows (``rows[:, :-1]``, ``rows[:, 1:]``), and ``loss_mask``,
    ``position_ids`` and ``cu_seqlens`` are computed on first access (new arrays, which
    live as long as the batch object). ``max_seqlen`` is the slot header's.

    Plain values: ``step``, ``plan_step``, ``rows``, ``seq_len``, ``max_seqlen``,
    ``loss_tokens``, ``real_tokens``, ``publish_ns``, ``cursor`` (bytes: the cursor
    blob as of the end of this step; handing it back resumes at ``step + 1``) and
    ``plan_state`` (the blob's plan state digest: equal on every node whose daemon plans
    the same batches, whatever journals they hold; 0 from a daemon before 2026-12-06).
    """

    __slots__ = ("step", "plan_step", "rows", "seq_len", "cu_len", "max_seqlen",
                 "loss_tokens", "real_tokens", "publish_ns", "cursor", "micro_batch_rows",
                 "slot_layout", "plan_state", "_views", "_fields", "_derived", "_client_ref",
                 "_conn_id", "_released", "_fence", "_pid", "__weakref__")

    def __init__(self, step, plan_step, rows, seq_len, cu_len, max_seqlen, loss_tokens,
                 real_tokens, publish_ns, cursor, micro_batch_rows, views, client, conn_id,
                 slot_layout="expanded", fields=None, plan_state=0):
        self.plan_state = plan_state
        self.step = step
        self.plan_step = plan_step
        self.rows = rows
        self.seq_len = seq_len
        self.cu_len = cu_len
        self.max_seqlen = max_seqlen
        self.loss_tokens = loss_tokens
        self.real_tokens = real_tokens
        self.publish_ns = publish_ns
        self.cursor = cursor
        self.micro_batch_rows = micro_batch_rows
        self.slot_layout = slot_layout
        self._views = views  # the slot's views (one tuple per slot, in SLOT_FIELDS order)
        self._fields = fields  # where they are in the slot (its header's offsets)
        self._derived = None
        # Weak: the client holds its outstanding batches, and a strong reference back
        # made a cycle that kept a dropped client (and its connection, which a new
        # client of the same rank is refused as `duplicate` of) alive until a cyclic GC.
        self._client_ref = None if client is None else weakref.ref(client)
        self._conn_id = conn_id
        self._released = False
        self._fence = None
        # The process whose ring the views are (None for a copy): in a fork the ring is
        # shared, not copied on write, and the parent releases the slot as it goes on.
        self._pid = None if client is None else os.getpid()

    @property
    def _client(self):
        """The client that handed this batch out (None for a copy, or once it is gone)."""
        return None if self._client_ref is None else self._client_ref()

    def _view(self, name):
        if self._released:
            raise StaleBatch(
                f"batch of step {self.step} was released (the client handed out `hold` more "
                "batches, or was closed); keep data longer with batch.copy()")
        if self._pid is not None and self._pid != os.getpid():
            raise StaleBatch(
                f"batch of step {self.step} is a view of the ring of process {self._pid}; "
                f"process {os.getpid()} is a fork of it, where that memory is shared, not "
                "copied, and copying its slot at the fork failed: the parent releases the "
                "slot and the daemon refills it. batch.copy() it before the fork")
        return self._views[_INDEX[self.slot_layout][name]]

    def _derive(self, name):
        """A compact slot's derived array, computed (all three at once) on first access."""
        self._view("rows")  # stale check
        if self._derived is None:
            self._derived = derive_compact(self._view("rows"), self._view("doc_starts"),
                                           self._view("row_real_tokens"), self.seq_len)
        return self._derived[name]

    @property
    def tokens(self) -> np.ndarray:
        if self.slot_layout == "compact":
            return self._view("rows")[:, :-1]
        return self._view("tokens")

    @property
    def labels(self) -> np.ndarray:
        if self.slot_layout == "compact":
            return self._view("rows")[:, 1:]
        return self._view("labels")

    @property
    def loss_mask(self) -> np.ndarray:
        if self.slot_layout == "compact":
            return self._derive("loss_mask")
        return self._view("loss_mask")

    @property
    def position_ids(self) -> np.ndarray:
        if self.slot_layout == "compact":
            return self._derive("position_ids")
        return self._view("position_ids")

    @property
    def cu_seqlens(self) -> np.ndarray:
        if self.slot_layout == "compact":
            return self._derive("cu_seqlens")
        return self._view("cu_seqlens")[: self.cu_len]

    @property
    def domain(self) -> np.ndarray:
        return self._view("domain")

    @property
    def row_loss_tokens(self) -> np.ndarray:
        return self._view("row_loss_tokens")

    @property
    def row_real_tokens(self) -> np.ndarray | None:
        """Real (non-padding) tokens per row, out of ``seq_len + 1`` (compact slots)."""
        if self.slot_layout == "compact":
            return self._view("row_real_tokens")
        return None

    @property
    def released(self) -> bool:
        """True once the ring slot was handed back (views may change from then on)."""
        return self._released

    @property
    def micro_batch_count(self) -> int:
        return self.rows // self.micro_batch_rows

    def arrays(self) -> dict:
        """The arrays by name (views)."""
        return {name: getattr(self, name) for name in FIELDS}

    def _cu(self) -> np.ndarray:
        """``cu_seqlens`` alone: a compact slot's without deriving positions and mask."""
        if self.slot_layout != "compact":
            return self._view("cu_seqlens")[: self.cu_len]
        if self._derived is not None:
            return self._derived["cu_seqlens"]
        start = _compact_starts(self._view("doc_starts"), self._view("row_real_tokens"),
                                self.seq_len)
        return _cu_of_starts(start, self.seq_len)

    def micro_batch_bounds(self) -> list[tuple[int, int, int]]:
        """Per micro-batch, ``(i0, i1, max_seqlen)``: its ``cu_seqlens`` are
        ``cu_seqlens[i0 : i1 + 1] - cu_seqlens[i0]``. A step of one micro-batch reads
        this from the slot header, a compact step of more from the slot's ``row_bounds``
        (each row's end entry and longest piece), so a GPU trainer's step does no
        per-token work on its CPU. Without ``row_bounds`` (an expanded slot, or a daemon
        that predates it) they are cut from ``cu_seqlens``, a compact slot's derived from
        the document starts alone."""
        mbr, seq = self.micro_batch_rows, self.seq_len
        if self.rows <= mbr:
            self._view("row_loss_tokens")  # stale check (both layouts store it)
            return [(0, self.cu_len - 1, self.max_seqlen)]
        rb = self._row_bounds()
        if rb is not None:
            return _bounds_of_rows(rb.tolist(), mbr, self.cu_len, seq, self.step)
        cu = self._cu()
        # Every row contributes its own end to cu_seqlens, so row edges are entries.
        edges = np.arange(self.rows // mbr + 1, dtype=np.int64) * (mbr * seq)
        at = np.searchsorted(cu, edges)
        ok = at < len(cu)
        ok[ok] = cu[at[ok]] == edges[ok]
        if not ok.all():
            raise ProtocolError(f"step {self.step}: cu_seqlens has no entry at the row edge "
                                f"{int(edges[~ok][0])}; cannot split micro-batches")
        tops = np.maximum.reduceat(np.diff(cu), at[:-1])
        return list(zip(at[:-1].tolist(), at[1:].tolist(), tops.tolist()))

    def _row_bounds(self):
        """The slot's ``row_bounds`` view (``[rows, 2]``), or None when it has none."""
        self._view("row_loss_tokens")  # stale check
        i = _INDEX[self.slot_layout].get("row_bounds")
        return self._views[i] if i is not None and i < len(self._views) else None

    def micro_batches(self) -> list[MicroBatch]:
        """The step's rows split in order into ``rows // micro_batch_rows`` micro-batches."""
        mbr = self.micro_batch_rows
        cu = self.cu_seqlens
        out = []
        for m, (i0, i1, _) in enumerate(self.micro_batch_bounds()):
            r0, r1 = m * mbr, (m + 1) * mbr
            out.append(MicroBatch(m, self.tokens[r0:r1], self.labels[r0:r1],
                                  self.loss_mask[r0:r1], self.position_ids[r0:r1],
                                  cu[i0 : i1 + 1] - cu[i0], self.domain[r0:r1],
                                  self.row_loss_tokens[r0:r1]))
        return out

    def copy(self) -> "Batch":
        """A batch that owns its arrays (valid forever, not tied to the ring)."""
        self._view("row_loss_tokens")  # stale check
        views = tuple(np.array(v) for v in self._views)
        for v in views:
            v.flags.writeable = False
        return Batch(self.step, self.plan_step, self.rows, self.seq_len, self.cu_len,
                     self.max_seqlen, self.loss_tokens, self.real_tokens, self.publish_ns,
                     self.cursor, self.micro_batch_rows, views, None, None, self.slot_layout,
                     plan_state=self.plan_state)

    def to_torch(self, device=None, non_blocking: bool = True, cuda_graphs: bool = True,
                 copy: bool = True):
        """The batch as torch tensors (see :func:`millrace.torch_adapter.batch_to_torch`);
        ``tokens`` and ``labels`` int32 (int64 for ids wider than int32) on every device.

        ``device=None`` or CPU: copies, the caller's own (writable, valid forever).
        ``copy=False``: zero-copy tensors over the ring where the dtype allows, READ-ONLY
        (the ring is mapped read only: an in-place op on them kills the process with
        SIGSEGV) and valid as long as the batch's views. A CUDA device: copies on a side
        stream; the ring slot is released only after those copies have completed, so the
        tensors live independently of the ring (``copy`` does not apply).
        """
        from . import torch_adapter

        return torch_adapter.batch_to_torch(self, device=device, non_blocking=non_blocking,
                                            cuda_graphs=cuda_graphs, copy=copy)

    def __repr__(self):
        state = ", released" if self._released else ""
        return (f"Batch(step={self.step}, plan_step={self.plan_step}, rows={self.rows}, "
                f"seq_len={self.seq_len}, loss_tokens={self.loss_tokens}{state})")


# ---------------------------------------------------------------------------- connection


class _Conn:
    """One live connection: socket, ready eventfd, the mapped ring and its views."""

    _ids = 0

    def __init__(self, sock, ready_fd, mm, welcome):
        _Conn._ids += 1
        self.id = _Conn._ids
        self.sock = sock
        self.ready_fd = ready_fd
        self.mm = mm
        self.welcome = welcome
        self.gone = False
        self.gone_reason = ""
        # A RELEASE that found the daemon gone marks the connection gone, but the steps
        # published before it stay this client's to read from the mapping (as `_wait`
        # leaves them after a socket event), and a daemon ERROR read there is raised once
        # they are read (`gone_error`).
        self.gone_readable = False
        self.gone_error = None
        self.released = 0  # last release published (page) or sent (frame)
        self.done = 0  # every step below this is retired (sent or not yet)
        self.page = None  # the release page's words (numpy u64), if the daemon passed one
        self.cuda_ptr = None  # address registered with cudaHostRegister, if any
        self.cuda_dev = None  # the device current when it was registered
        self.cuda_tried = False
        self.slots = int(welcome["slots"])
        slot_offset = int(welcome["slot_offset"])
        slot_bytes = int(welcome["slot_bytes"])
        self.slot_base = [slot_offset + i * slot_bytes for i in range(self.slots)]
        self.layout = welcome.get("slot_layout")
        if self.layout not in SLOT_FIELDS:
            raise ProtocolError(f"WELCOME slot_layout {self.layout!r} is not one of "
                                f"{SLOT_LAYOUTS}")
        self.torch_cpu = {}  # per-slot host tensors of the torch adapter's GPU copies
        # Where a slot's view tuple holds row_bounds (compact slots), if anywhere.
        self.row_bounds_at = _INDEX[self.layout].get("row_bounds")
        self.slot_bytes = slot_bytes
        self.micro_batches = max(int(welcome.get("micro_batches") or 1), 1)
        # WELCOME's stages (docs/PROTOCOL.md section 3, `stages`) are information: each
        # is checked to fit a slot, but a slot is read at the shape and offsets of its
        # own header, so a stage added live (one WELCOME never listed) reads the same.
        first = {k: welcome[k] for k in ("rows", "seq_len", "micro_batch_rows", "fields")}
        stages = welcome.get("stages") or [dict(first, step=0)]
        if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
            raise ProtocolError(f"WELCOME stages is malformed: {stages!r}")
        self.stages = [_Stage(mm, self.slot_base, self.layout, dict(first, step=0),
                              slot_bytes)]
        for st in stages[1:]:
            try:
                step = int(st["step"])
            except (KeyError, TypeError, ValueError) as e:
                raise ProtocolError(f"WELCOME stage {st!r} has no step ({e})") from e
            if step <= self.stages[-1].step:
                raise ProtocolError(f"WELCOME stages are not in step order at step {step}")
            self.stages.append(_Stage(mm, self.slot_base, self.layout, st, slot_bytes))
        self.views = self.stages[0].views
        self.dtypes = {n: f.get("dtype") for n, f in welcome["fields"].items()
                       if isinstance(f, dict)}
        self.cursor_cap = self.stages[0].cursor_cap
        # Slot shapes read so far: (rows, seq_len, offsets) -> _Stage.
        self.by_header = {}
        self.poller = select.poll()
        self.poller.register(ready_fd, select.POLLIN)
        self.poller.register(sock.fileno(), select.POLLIN)

    def published(self) -> int:
        return _U64.unpack_from(self.mm, _PUBLISHED_AT)[0]

    def stage_of(self, rows: int, seq_len: int, offsets: tuple) -> "_Stage":
        """The views of a slot whose header says ``rows`` rows of ``seq_len`` with arrays
        at ``offsets``: each array's shape follows from rows and seq_len, its dtype from
        WELCOME (docs/PROTOCOL.md section 4); built once per shape and checked to lie
        inside the slot, so a wild header is a ProtocolError, never a bad view."""
        key = (rows, seq_len, offsets)
        st = self.by_header.get(key)
        if st is not None:
            return st
        if len(self.by_header) >= _MAX_SHAPES:
            # A run has a few stages; this many shapes is a daemon gone wrong. Start over
            # (the torch adapter's per-slot tensors are keyed by these views: they go too).
            self.by_header.clear()
            self.torch_cpu.clear()
        r, l = rows, seq_len
        shapes = {"tokens": [r, l], "labels": [r, l], "loss_mask": [r, l],
                  "position_ids": [r, l], "cu_seqlens": [r * l + 1], "rows": [r, l + 1],
                  "doc_starts": [r, (l + 8) // 8], "cursor": [self.cursor_cap]}
        shapes["row_bounds"] = [r, 2]
        names = SLOT_FIELDS[self.layout] + ("cursor",) + TRAILER_FIELDS[self.layout]
        fields = {n: {"offset": o, "dtype": self.dtypes.get(n), "shape": shapes.get(n, [r])}
                  for n, o in zip(names, offsets)
                  if o or n not in TRAILER_FIELDS[self.layout]}
        if rows == 0 or seq_len == 0 or rows % self.micro_batches:
            raise ProtocolError(f"slot header says {rows} rows of {seq_len}, which "
                                f"{self.micro_batches} micro-batches do not split evenly")
        spec = {"step": -1, "rows": rows, "seq_len": seq_len,
                "micro_batch_rows": rows // self.micro_batches, "fields": fields}
        st = self.by_header[key] = _Stage(self.mm, self.slot_base, self.layout, spec,
                                          self.slot_bytes, "slot header")
        return st

    def map_page(self, page_fd: int):
        """Maps the release page read-write; its words are then read and written as
        aligned 8-byte numpy elements (one load or store each, never torn)."""
        size = os.fstat(page_fd).st_size
        if size < _PAGE_BYTES:
            raise ProtocolError(f"release page memfd has {size} bytes, expected {_PAGE_BYTES}")
        _require_sealed(page_fd, "release page")
        pm = mmap.mmap(page_fd, _PAGE_BYTES, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.page = np.frombuffer(pm, dtype="<u8")

    def publish_release(self, upto: int) -> bool:
        """Stores ``released`` in the page; returns whether the daemon waits for it (then
        the caller sends a RELEASE frame as its wake-up). Python has no memory fence, so
        the store may still sit in this CPU's store buffer when ``daemon_waiting`` is
        read: a wake-up missed that way is caught by the daemon's 2 ms backstop."""
        self.page[_PAGE_RELEASED_AT // 8] = upto
        return bool(self.page[_PAGE_DAEMON_WAITING_AT // 8])

    def close_fds(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.ready_fd is not None:
            try:
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None


class _Stage:
    """One stage of the plan as the ring lays it out: its shape and, per slot, the views
    of a slot of that shape (the fields of WELCOME, of its `stages` entry, or of a slot
    header's offset table)."""

    def __init__(self, mm, slot_base, layout, spec, slot_bytes, source="WELCOME"):
        try:
            self.step = int(spec["step"])
            self.rows, self.seq_len = int(spec["rows"]), int(spec["seq_len"])
            self.micro_batch_rows = int(spec["micro_batch_rows"])
            fields = spec["fields"]
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"{source} stage {spec!r} is malformed ({e})") from e
        self.fields = fields
        self.views = []
        for base in slot_base:
            per = []
            for name in SLOT_FIELDS[layout]:
                if name not in fields:
                    raise ProtocolError(f"{source} lacks field `{name}` of a {layout} slot")
                per.append(_field_view(mm, base, name, fields[name], slot_bytes, source))
            for name in TRAILER_FIELDS[layout]:
                if name in fields:  # absent from a daemon that predates it
                    spec = fields[name]
                    if not isinstance(spec, dict) or spec.get("dtype") != "int32":
                        raise ProtocolError(f"{source} field `{name}` must be int32, got "
                                            f"{spec!r}")
                    per.append(_field_view(mm, base, name, fields[name], slot_bytes, source))
            self.views.append(tuple(per))
        # The most cu_seqlens entries a slot may use (compact ones derive it).
        self.cu_cap = (self.rows * self.seq_len + 1 if layout == "compact"
                       else len(self.views[0][FIELDS.index("cu_seqlens")]))
        cur = fields.get("cursor")
        if (not isinstance(cur, dict) or cur.get("dtype") != "uint8"
                or len(cur.get("shape", ())) != 1):
            raise ProtocolError(f"{source} field `cursor` must be uint8[n], got {cur}")
        _field_view(mm, slot_base[0], "cursor", cur, slot_bytes, source)
        self.cursor_off = int(cur["offset"])
        self.cursor_cap = int(cur["shape"][0])


def _require_sealed(fd: int, what: str) -> None:
    """Refuses a memfd that can still shrink: its size is checked once, at mapping, and a
    file cut under the mapping raises SIGBUS in this process at the next read. The
    daemon seals its rings and release pages (PROTOCOL.md section 3)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError(f"the {what} memfd is not sealed against shrinking "
                            f"(F_SEAL_SHRINK; seals {seals:#x}): it could be cut under "
                            f"this client's mapping")


def _field_view(mm, base, name, spec, slot_bytes, source="WELCOME") -> np.ndarray:
    try:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        shape = tuple(int(x) for x in spec["shape"])
        offset = int(spec["offset"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"{source} field `{name}` is malformed: {spec!r} ({e})") from e
    if dtype.kind not in "iu":  # every array of a slot holds integers
        raise ProtocolError(f"{source} field `{name}` has dtype {dtype}, not an integer type")
    if any(x < 0 for x in shape):
        raise ProtocolError(f"{source} field `{name}` has a negative extent: {spec!r}")
    # Python integers: np.prod would wrap a huge shape around int64 (to 0, say) and let
    # it pass the bound check below.
    count = math.prod(shape)
    size = count * dtype.itemsize
    if offset < _SLOT_HEADER_BYTES or offset % dtype.itemsize or offset + size > slot_bytes:
        raise ProtocolError(f"{source} field `{name}`: {size} bytes at offset {offset} do not "
                            f"fit a {slot_bytes}-byte slot after its {_SLOT_HEADER_BYTES}-byte "
                            "header (or are unaligned)")
    end = base + offset + size
    if end > len(mm):
        raise ProtocolError(f"{source} field `{name}` ends at byte {end}, past the ring "
                            f"({len(mm)} bytes)")
    arr = np.frombuffer(mm, dtype=dtype, count=count, offset=base + offset).reshape(shape)
    assert not arr.flags.writeable
    return arr


# ---------------------------------------------------------------------------- client


class Client:
    """One trainer rank's stream of batches from the node's millrace daemon.

    Parameters
    ----------
    socket: path of the daemon's unix socket (``[serve] socket``); None: the daemon's
        default, :func:`default_socket`.
    dp_rank, dp_size: this rank's data-parallel coordinates; rank ``r`` of ``R`` receives
        rows ``[rG/R, (r+1)G/R)`` of every global batch of ``G`` rows.
    job: namespaces rings and dp_size on a daemon shared by several jobs.
    replica, replicas: this client's name among the peers of its dp rank (tensor /
        pipeline / context-parallel ranks that must receive identical data) and how many
        of them connect to this daemon. Peers share one ring.
    micro_batch_rows, micro_batches: how :meth:`Batch.micro_batches` splits the rows;
        their product must be ``G / R`` (``micro_batch_rows=None``: the whole slice).
    cursor: a cursor blob (bytes or hex) to resume from: the first batch is the step after
        it. ``start_step``: without a cursor, seek to this step.
    fingerprint: refuse to run unless the daemon's plan fingerprint is this (32 hex).
    hold: batches stay valid until ``hold`` more were handed out (1 ..= ring slots).
    reconnect_timeout: seconds to keep retrying (every 0.1 s) when the daemon went away
        after a connection had worked; 0 disables reconnecting.
    connect_timeout: seconds the first connection waits for a daemon that is not there
        yet (socket missing or refusing), even past ``reconnect_timeout``; 0 (default):
        fail at once with :class:`DaemonGone`, since that is usually a wrong path.
    register_cuda: ``"auto"`` registers the ring with ``cudaHostRegister`` (read-only) at
        the first CUDA :meth:`Batch.to_torch`, whose copies the client fences; ``True``
        registers at connect; ``False`` never. While the ring is registered, CPU tensors
        (``to_torch()`` on the CPU) are copies even with ``copy=False``: a view of pinned
        memory would let the trainer's own ``.to("cuda", non_blocking=True)`` read a
        slot after the client released it.
    handshake_timeout: seconds to wait for WELCOME once the daemon accepted (a seek
        without a cursor can take a while on a huge corpus). Running out raises
        :class:`HandshakeTimeout` and is not retried: a new connection would start the
        daemon's work over.
    slot_layout: ``"compact"`` (the daemon's default when None: tokens in the shards'
        dtype and document starts; the client derives labels, positions, mask and
        cu_seqlens) or ``"expanded"`` (every array ready in the ring). Peers of one dp
        rank share a ring, so they must agree (else REFUSED ``layout``).
    release_page: publish releases in a page shared with the daemon (a store per step)
        instead of a RELEASE frame per few steps; False: frames, as older clients do.

    The client connects lazily (on first iteration, :meth:`connect`, ``welcome`` or
    ``fingerprint``), so :meth:`load_state_dict` can set the resume point first.
    """

    def __init__(self, socket, dp_rank: int, dp_size: int, job: str = "default",
                 replica: str = "0", replicas: int = 1, micro_batch_rows: int | None = None,
                 micro_batches: int = 1, cursor=None, start_step: int | None = None,
                 fingerprint=None, hold: int = 1, reconnect_timeout: float = 60.0,
                 register_cuda="auto", handshake_timeout: float = 120.0,
                 connect_timeout: float = 0.0, slot_layout: str | None = None,
                 release_page: bool = True):
        if hold < 1:
            raise ValueError("hold must be at least 1")
        if register_cuda not in ("auto", True, False):
            raise ValueError("register_cuda must be 'auto', True or False")
        if slot_layout is not None and slot_layout not in SLOT_LAYOUTS:
            raise ValueError(f"slot_layout must be one of {SLOT_LAYOUTS} or None")
        self.slot_layout = slot_layout
        self.release_page = bool(release_page)
        self.socket_path = default_socket() if socket is None else os.fspath(socket)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.job = str(job)
        self.replica = str(replica)
        self.replicas = int(replicas)
        self.micro_batch_rows = None if micro_batch_rows is None else int(micro_batch_rows)
        self.micro_batches_per_step = int(micro_batches)
        self.hold = int(hold)
        self.reconnect_timeout = float(reconnect_timeout)
        self.connect_timeout = float(connect_timeout)
        self.register_cuda = register_cuda
        self.handshake_timeout = float(handshake_timeout)
        if isinstance(fingerprint, int):
            fingerprint = f"{fingerprint:032x}"
        self._want_fingerprint = fingerprint
        self._resume_cursor = _as_blob(cursor)
        self._start_step = None if start_step is None else int(start_step)
        # The step load_state_dict was given with a cursor (None: none, or unknown).
        self._state_step = None
        self._next_step = None  # the step the next batch must have (known after WELCOME)
        self._last_step = None  # step of the last batch handed out
        self._plan_state = None  # plan_state of that batch
        self._conn: _Conn | None = None
        self._welcome = None
        self._outstanding: deque = deque()
        self._closed = False
        # The process whose connection this client holds (None before the first one):
        # a forked child must not read, release or BYE on its parent's connection.
        self._pid = None
        # When the retries of the connection being (re)opened began (None: not retrying).
        self._retry_since = None
        # Held while next_batch or connect runs: a second thread entering is refused.
        self._busy = threading.Lock()
        self._torch = None  # torch_adapter state (streams), created on demand
        self.reconnects = 0

    def __getstate__(self):
        # A client not yet connected travels to a spawned worker (or a deepcopy) as
        # before; the thread guard is per object, made anew. A connected one holds a
        # socket and a mapping of its process: said plainly, not as pickle's "cannot
        # pickle 'socket' object" (reading `welcome` or `domains` connects).
        if self._conn is not None:
            raise MillraceError(
                "a connected millrace.Client cannot be pickled or copied: its socket and "
                "ring belong to this process. Pass an unconnected one (not yet iterated, "
                "and without reading welcome, domains or fingerprint first), or make "
                "the client in the worker")
        d = dict(self.__dict__)
        d.pop("_busy", None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._busy = threading.Lock()

    # -- public attributes ------------------------------------------------------------

    @property
    def welcome(self) -> dict:
        """The daemon's WELCOME (connects if needed)."""
        self.connect()
        return self._welcome

    @property
    def fingerprint(self) -> str:
        """The plan fingerprint (hex), from WELCOME."""
        return self.welcome["fingerprint"]

    @property
    def domains(self) -> list:
        return self.welcome["domains"]

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.gone

    # -- connecting ---------------------------------------------------------------------

    def connect(self) -> "Client":
        """Connects now (normally done lazily). Raises Refused on REFUSED."""
        self._check_usable()
        self._refuse_if_busy("connect")
        with self._busy:  # see _refuse_if_busy
            if self._conn is None:
                self._open_retrying(initial=self._welcome is None)
        return self

    def _refuse_if_busy(self, what: str):
        """Refuses ``what`` while another thread is inside next_batch or connect: the
        client is not thread safe, and two threads reading one stream took the same slot
        or raced for the poller, which surfaced as a ProtocolError blaming the daemon (or
        as a `duplicate` refusal, or duplicated data).

        The caller then holds ``_busy`` with ``with``: the lock's own (C) __enter__ takes
        it and the region that lets it go starts at the next instruction, so no signal
        handler (a Ctrl-C) runs in between. An acquire called before a ``try`` left the
        guard held for good when a KeyboardInterrupt landed right after it. A thread that
        slips past this check in the same instant as another waits for it (serialized,
        never interleaved)."""
        if self._busy.locked():
            raise MillraceError(
                f"Client.{what} called while another thread is inside next_batch or "
                "connect: a Client is not thread safe; call it from one thread")

    def _forked(self) -> bool:
        """Whether this is a process forked after this client connected."""
        return self._pid is not None and self._pid != os.getpid()

    def _check_usable(self):
        if self._closed:
            raise MillraceError("the client is closed")
        if self._forked():
            raise MillraceError(
                f"this millrace Client connected in process {self._pid}; process "
                f"{os.getpid()} is a fork of it, where the socket, ring and release page "
                "are the parent's (reading or releasing them would take the parent's "
                "batches). Create a new Client in the child (before the fork, do not "
                "connect the one you pass on)")

    def _hello(self) -> dict:
        h = {"protocol": PROTOCOL_VERSION, "job": self.job, "dp_rank": self.dp_rank,
             "dp_size": self.dp_size, "replica": self.replica, "replicas": self.replicas,
             "micro_batches": self.micro_batches_per_step,
             # This client reads each slot's shape from its header: a plan with stages
             # ([[plan.stage]]) may be served to it.
             "stages": True}
        if self.release_page:
            h["release_page"] = True
        if self.micro_batch_rows is not None:
            h["micro_batch_rows"] = self.micro_batch_rows
        fingerprint = self._want_fingerprint
        if self._resume_cursor is not None:
            h["cursor"] = self._resume_cursor.hex()
        elif self._next_step is not None:
            h["start_step"] = self._next_step
            # A reconnection before the first batch has no blob, whose check would
            # refuse another plan: a daemon restarted with another config then served
            # that plan's steps silently. The first WELCOME's plan is pinned instead.
            if fingerprint is None and self._welcome is not None:
                fingerprint = self._welcome["fingerprint"]
        elif self._start_step is not None:
            h["start_step"] = self._start_step
        if fingerprint is not None:
            h["fingerprint"] = fingerprint
        if self.slot_layout is not None:
            h["slot_layout"] = self.slot_layout
        return h

    def _open_retrying(self, initial: bool, until: float | None = None):
        """Connects, retrying as the class docs say. ``until``: the caller's deadline
        (next_batch's ``timeout``): past it a TimeoutError, and the next call retries
        within the same window, so reconnect_timeout still bounds the whole outage."""
        fresh = self._retry_since is None
        if fresh:
            self._retry_since = time.monotonic()
        out_of_time = False
        try:
            self._open_retrying_since(self._retry_since, initial, until, fresh)
        except TimeoutError as e:
            out_of_time = getattr(e, "_caller", False)
            raise
        finally:
            if not out_of_time:
                self._retry_since = None

    def _open_retrying_since(self, t0: float, initial: bool, until: float | None,
                             fresh: bool):
        # A first connection waits connect_timeout for a daemon that is starting, whatever
        # reconnect_timeout says (which bounds the retries of a connection that worked,
        # and of a first one that met a daemon refusing `busy` and the like).
        wait = max(self.reconnect_timeout, self.connect_timeout) if initial \
            else self.reconnect_timeout
        deadline = t0 + wait
        attempt = 0
        while True:
            if self._closed:
                # close() ran meanwhile (another thread, a signal handler): a new HELLO
                # now would make the daemon build a ring for a client nobody reads.
                raise MillraceError("the client was closed while it connected")
            attempt += 1
            try:
                self._open()
                if not initial:
                    self.reconnects += 1
                    log.warning("millrace: reconnected to %s at step %d (attempt %d)",
                                self.socket_path, self._next_step, attempt)
                return
            except Refused as e:
                # A restarting daemon can briefly still see our old connection (duplicate)
                # or a half-rebuilt ring (peer_position); a busy one may free up.
                if e.code not in _RETRY_REFUSALS:
                    raise
                if initial and e.code == "peer_position":
                    raise
                if e.code == "duplicate" and initial \
                        and time.monotonic() - t0 >= min(_DUPLICATE_GRACE, self.reconnect_timeout):
                    raise
                last = e
            except DaemonGone:
                raise  # a socket path no daemon can bind (too long): no retry helps
            except (_Gone, OSError) as e:
                if isinstance(e, OSError) and not isinstance(e, TimeoutError) \
                        and e.errno not in _GONE_ERRNOS:
                    raise
                if initial and isinstance(e, OSError) and e.errno in _NO_DAEMON_ERRNOS \
                        and time.monotonic() >= t0 + self.connect_timeout:
                    raise DaemonGone(_no_daemon(self.socket_path, e)) from None
                last = e
            if time.monotonic() >= deadline:
                if isinstance(last, Refused):
                    raise last
                if isinstance(last, _BacklogFull):
                    raise DaemonGone(f"the millrace daemon at {self.socket_path} took no "
                                     f"new connection within {wait:g} s: {last}") from None
                raise DaemonGone(f"no millrace daemon at {self.socket_path} within "
                                 f"{wait:g} s: {last}") from None
            if attempt == 1 and fresh:
                # A first connect refused `duplicate` gives up sooner than `wait` (see
                # above): the log says the limit that applies.
                limit = min(_DUPLICATE_GRACE, self.reconnect_timeout) \
                    if initial and isinstance(last, Refused) and last.code == "duplicate" \
                    else wait
                log.warning("millrace: daemon at %s unavailable (%s); retrying for %g s",
                            self.socket_path, last, limit)
            now = time.monotonic()
            if until is not None and now >= until:
                at = "" if self._next_step is None else f" for step {self._next_step}"
                e = TimeoutError(f"no batch{at} within the timeout: the daemon at "
                                 f"{self.socket_path} is not back ({last}); later calls "
                                 f"go on retrying until {wait:g} s after it went")
                e._caller = True
                raise e
            time.sleep(0.1 if until is None else max(0.0, min(0.1, until - now)))

    def _open(self):
        _CLIENTS.add(self)  # its held batches are copied for a forked child
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        fds: list = []
        try:
            sock.settimeout(self.handshake_timeout)
            _check_fallback_dir(self.socket_path)
            _connect_unix(sock, self.socket_path)
            try:
                _send(sock, encode_frame(HELLO, json.dumps(self._hello()).encode()))
            except _Gone:
                # A refused peer is closed at once, possibly before our HELLO arrived:
                # its REFUSED frame is still queued, so read it (EOF raises _Gone).
                pass
            try:
                kind, payload = read_frame(sock, fds)
            except _ReadTimeout:
                # The daemon accepted and has our HELLO, but is still at it (a seek on a
                # huge corpus): it is there, so this is no reason to reconnect, which
                # would cancel that work and start it over.
                raise HandshakeTimeout(
                    f"the millrace daemon at {self.socket_path} accepted the connection but "
                    f"sent no WELCOME within handshake_timeout={self.handshake_timeout:g} s "
                    "(a seek without a cursor can take long on a huge corpus); raise "
                    "Client(handshake_timeout=...)") from None
            if kind == REFUSED:
                raise Refused(*_reason(payload))
            if kind == ERROR:
                raise DaemonError(*_reason(payload))
            if kind != WELCOME:
                raise ProtocolError(f"expected WELCOME, got frame type {kind}")
            try:
                welcome = json.loads(payload)
            except ValueError as e:
                raise ProtocolError(f"WELCOME is not JSON: {e}") from e
            paged = bool(welcome.get("release_page")) if isinstance(welcome, dict) else False
            want = 3 if paged else 2
            if len(fds) != want or (paged and not self.release_page):
                raise ProtocolError(f"WELCOME carried {len(fds)} fds (release_page {paged}), "
                                    f"expected {want}")
            ring_fd, ready_fd = fds[0], fds[1]
            page_fd = fds[2] if paged else None
            try:
                conn = self._map(sock, ring_fd, ready_fd, welcome)
                if page_fd is not None:
                    conn.map_page(page_fd)
            finally:
                for fd in (ring_fd, page_fd):
                    if fd is not None:
                        fds.remove(fd)
                        os.close(fd)  # the mappings keep the memfds alive
            try:
                start = int(welcome["start_step"])
            except (TypeError, ValueError) as e:
                raise ProtocolError(f"WELCOME start_step is malformed: {e}") from None
            pid = os.getpid()
            problem = None
            if self._next_step is not None and start != self._next_step:
                problem = ProtocolError(f"resumed with the blob of step {self._next_step - 1} "
                                        f"but the daemon starts at step {start}")
            elif self._next_step is None and self._resume_cursor is not None \
                    and self._state_step is not None and start != self._state_step + 1:
                problem = MillraceError(
                    f"the state given to load_state_dict says step {self._state_step}, but "
                    f"its cursor blob is the position after step {start - 1}: the "
                    "checkpoint's cursor and step come from different points")
            elif self._next_step is None and self._resume_cursor is None \
                    and self._start_step is not None and start != self._start_step:
                problem = ProtocolError(f"asked for start_step {self._start_step} but the "
                                        f"daemon starts at step {start}")
            sock.settimeout(None)
            # ready_fd is owned by conn now, which is stored next with no call in
            # between: a Ctrl-C at the check after any call above closes it here (it
            # was left open for good when these calls came after this line).
            fds = []
        except BaseException:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            sock.close()
            raise
        # One statement with no call in it: a signal handler runs only at the check after
        # a call, so a Ctrl-C finds the connection stored with its start step or not at
        # all. A connection stored without it (os.getpid() ran in between) failed every
        # later call with a TypeError.
        if problem is None:
            self._conn, self._pid, self._welcome, self._next_step = conn, pid, welcome, start
        else:
            self._conn, self._pid, self._welcome = conn, pid, welcome
            self._drop_conn(send_bye=True)
            raise problem
        if self._closed:
            # close() ran while this connected (a signal handler, another thread) and
            # found no connection to close: stored in the closed client, this one was
            # left open for good, holding the rank (`duplicate` for its next client).
            self._drop_conn(send_bye=True)
            raise MillraceError("the client was closed while it connected")
        if self.register_cuda is True:
            from . import torch_adapter

            torch_adapter.register_ring(self, conn)

    def _map(self, sock, ring_fd, ready_fd, welcome) -> _Conn:
        try:
            need = ("protocol", "fingerprint", "start_step", "rows", "seq_len", "slots",
                    "slot_offset", "slot_bytes", "ring_bytes", "fields", "micro_batch_rows")
            missing = [k for k in need if k not in welcome]
            if missing:
                raise ProtocolError(f"WELCOME lacks {missing}")
            if welcome["protocol"] != PROTOCOL_VERSION:
                raise ProtocolError(f"WELCOME speaks protocol {welcome['protocol']}")
            ring_bytes = int(welcome["ring_bytes"])
            size = os.fstat(ring_fd).st_size
            if size < ring_bytes:
                raise ProtocolError(f"ring memfd has {size} bytes, WELCOME says {ring_bytes}")
            _require_sealed(ring_fd, "ring")
            mm = mmap.mmap(ring_fd, ring_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"WELCOME is malformed: {e}") from e
        magic, version, slots, slot_bytes, slot_offset, _first = _RING_HEAD.unpack_from(mm, 0)
        if (not 0 < slot_bytes or slot_offset < _PUBLISHED_AT + 8
                or slot_offset + slots * slot_bytes > ring_bytes):
            raise ProtocolError(f"{slots} slots of {slot_bytes} bytes at {slot_offset} do not "
                                f"fit the ring's {ring_bytes} bytes")
        if magic != _RING_MAGIC or version != 1:
            raise ProtocolError(f"ring header magic {magic!r} version {version}, expected "
                                f"{_RING_MAGIC!r} version 1")
        if (slots, slot_bytes, slot_offset) != (welcome["slots"], welcome["slot_bytes"],
                                                welcome["slot_offset"]):
            raise ProtocolError(
                f"ring header (slots {slots}, slot_bytes {slot_bytes}, slot_offset "
                f"{slot_offset}) disagrees with WELCOME ({welcome['slots']}, "
                f"{welcome['slot_bytes']}, {welcome['slot_offset']})")
        if self.hold > slots:
            raise ValueError(f"hold={self.hold} exceeds the ring's {slots} slots: the "
                             "client would wait forever")
        return _Conn(sock, ready_fd, mm, welcome)

    def _drop_conn(self, send_bye: bool):
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # GPU copies still reading the ring must finish before it is unregistered.
        for b in self._outstanding:
            if b._conn_id == conn.id:
                _wait_fence(b)
        if conn.cuda_ptr is not None:
            from . import torch_adapter

            torch_adapter.unregister_ring(conn)
        try:
            if send_bye and not conn.gone:
                # BYE has no reply: the daemon drops its side after it let go of this
                # peer, so waiting for EOF makes close() + reconnect free of a
                # `duplicate` race.
                try:
                    conn.sock.sendall(encode_frame(BYE), _socket.MSG_NOSIGNAL)
                    conn.sock.settimeout(_BYE_WAIT)
                    while conn.sock.recv(4096):
                        pass
                except OSError:
                    pass
        finally:
            # Also when a KeyboardInterrupt ends the wait for EOF: the connection is
            # already unhooked, so nothing else would ever close its ready fd.
            conn.close_fds()
            # The mmap is not closed: batches may still hold views into it. It is
            # unmapped when the last of them goes.
            conn.views = conn.stages = conn.by_header = None
            conn.mm = conn.page = None

    # -- iterating ----------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_batch(self, timeout: float | None = None) -> Batch:
        """The next batch; waits for it (``timeout`` seconds at most: TimeoutError), also
        while reconnecting to a daemon that went away."""
        self._check_usable()
        self._refuse_if_busy("next_batch")
        with self._busy:  # see _refuse_if_busy
            return self._next_batch(timeout)

    def _next_batch(self, timeout: float | None) -> Batch:
        while len(self._outstanding) >= self.hold:
            self._retire_oldest()
        self._flush_release(force=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._conn is None:
                self._open_retrying(initial=self._welcome is None, until=deadline)
            conn = self._conn
            try:
                if conn.gone:
                    # A RELEASE found the daemon gone: first the steps it published
                    # before (a TP peer that sent no frame at this step reads them too,
                    # so every peer reconnects at the ring's published step, as the new
                    # ring needs), then its ERROR, if it sent one, then the reconnect.
                    if conn.gone_readable and conn.mm is not None \
                            and conn.published() > self._next_step:
                        return self._take(conn)
                    err, conn.gone_error = conn.gone_error, None
                    if err is not None:
                        raise err
                    raise _Gone(conn.gone_reason or "the connection failed earlier")
                self._wait(conn, self._next_step, deadline)
                return self._take(conn)
            except _Gone as e:
                if self._closed:
                    # close() from another thread: its BYE ends the connection, and the
                    # EOF it waits for woke this wait too. That is no lost daemon to
                    # reconnect to (a new HELLO, a new ring, for a closed client).
                    raise MillraceError(f"the client was closed while next_batch waited "
                                        f"for step {self._next_step}") from None
                if self.reconnect_timeout <= 0:
                    self._drop_conn(send_bye=False)
                    raise DaemonGone(f"millrace daemon at {self.socket_path} went away: {e}") \
                        from None
                log.warning("millrace: connection to %s lost (%s); reconnecting from step %d",
                            self.socket_path, e, self._next_step)
                conn.gone = True
                self._drop_conn(send_bye=False)

    def _wait(self, conn: _Conn, step: int, deadline):
        since = time.monotonic()
        warn_at = since + _SLOW_WAIT_WARN
        while True:
            if self._closed or conn.mm is None:
                # close() ran while we waited: from a signal handler (it runs inside the
                # poll below) or another thread. A thread's close() lets go of the fds
                # and ring only once the daemon answered its BYE, whose EOF wakes the
                # poll below first: `_closed` is set before the BYE is sent.
                raise MillraceError(f"the client was closed while next_batch waited for "
                                    f"step {step}")
            if conn.published() > step:
                return
            now = time.monotonic()
            if now >= warn_at:
                log.warning("millrace: job %r dp_rank %d replica %r has waited %.1f s for step "
                            "%d, which the daemon at %s has not published; `millrace status` "
                            "says what its ring waits for (a replica not joined, a peer not "
                            "releasing, a read that hangs)", self.job, self.dp_rank,
                            self.replica, now - since, step, self.socket_path)
                warn_at = since + 2 * (warn_at - since)
            if deadline is None:
                wait_ms = 1000
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no batch for step {step} within the timeout")
                wait_ms = max(1, min(1000, int(left * 1000)))
            # Wakes for the warning on time, not at the next whole second.
            wait_ms = max(1, min(wait_ms, int((warn_at - now) * 1000) + 1))
            events = conn.poller.poll(wait_ms)
            if self._closed or conn.mm is None:
                continue  # closed meanwhile: said above (the socket's EOF is close()'s)
            socket_event = False
            for fd, ev in events:
                if fd == conn.ready_fd:
                    if ev & select.POLLIN:
                        os.read(fd, 8)  # resets the (non-semaphore) counter
                    elif ev & (select.POLLERR | select.POLLNVAL):
                        raise ProtocolError(f"ready_fd reports poll events {ev:#x}")
                else:
                    socket_event = True
            # Steps published before the daemon's ERROR (a ring that stops at its last
            # step publishes that step first) are this client's to read: the socket's
            # news waits until none is left.
            if socket_event and conn.published() <= step:
                self._socket_event(conn)

    def _socket_event(self, conn: _Conn):
        """The socket became readable while streaming: an ERROR frame or the daemon left.

        Either ends the connection, so it is marked gone before the read: a read cut
        short by an exception a signal handler raised (a Ctrl-C while the frame arrives
        in pieces) leaves the socket inside the frame, and the next call read the rest
        of it as a frame header ("a frame of length 1701080931"). It now reconnects."""
        conn.gone = True
        conn.gone_reason = ("reading a frame from the daemon was interrupted (a Ctrl-C?), "
                            "so the connection may be inside it")
        conn.sock.settimeout(10.0)
        try:
            kind, payload = read_frame(conn.sock)
        except ProtocolError as e:
            conn.gone_reason = str(e)
            raise
        finally:
            conn.sock.settimeout(None)
        if kind == ERROR:
            code, message = _reason(payload)
            # The daemon closes after an ERROR: the next call reconnects, and says why.
            conn.gone_reason = f"{code}: {message}"
            if code == "shutdown":
                # A draining daemon (SIGTERM) says so before it closes: it will be back.
                raise _Gone(conn.gone_reason)
            if self._stale_ring_resumes(conn, code):
                raise _Gone(conn.gone_reason)
            raise DaemonError(code, message)
        conn.gone_reason = f"unexpected {_TYPE_NAMES.get(kind, kind)} frame while streaming"
        raise ProtocolError(conn.gone_reason)

    def _stale_ring_resumes(self, conn: _Conn, code: str) -> bool:
        """Whether the daemon's ERROR ``code`` ended a ring that a reconnect resumes.

        ERROR ``cursor``: a rank of this job brought a live change this stream lacked,
        and the ring went back to the change's step (``published``; it stays lower when
        the ring had not reached it) and stopped. While no step handed out reached it, a
        reconnect from the last one's blob goes on with the change (docs/PROTOCOL.md,
        section 1, ERROR), as the daemon's message says to. Once one did, the trainer trained
        on a step without the change: that stays an error, whose message says what to do
        (resume from a checkpoint before it)."""
        return (code == "cursor" and self.reconnect_timeout > 0
                and (self._last_step is None or self._last_step < conn.published()))

    def _take(self, conn: _Conn) -> Batch:
        step = self._next_step
        slot = step % conn.slots
        base = conn.slot_base[slot]
        (s, plan_step, rows, seq_len, cu_len, max_seqlen, loss_tokens, real_tokens,
         cursor_len, publish_ns) = _SLOT_HEAD.unpack_from(conn.mm, base)
        if s != step:
            raise ProtocolError(f"slot {slot} holds step {s} where step {step} was expected "
                                f"(published = {conn.published()})")
        # Each slot is read at the shape and offsets its header gives (a stage added live
        # included); the same shape's views are reused.
        offsets = _FIELD_OFFSETS.unpack_from(conn.mm, base + _FIELD_OFFSETS_AT)
        try:
            st = conn.stage_of(rows, seq_len, offsets)
        except ProtocolError as e:
            raise ProtocolError(f"step {step} (plan step {plan_step}): {e}") from None
        if cursor_len > st.cursor_cap or not rows < cu_len <= st.cu_cap:
            raise ProtocolError(f"step {step}: cursor_len {cursor_len} (at most "
                                f"{st.cursor_cap}) or cu_len {cu_len} ({rows + 1}..="
                                f"{st.cu_cap}) is out of range")
        # max_seqlen goes to flash attention as is, and a compact slot's cu_len sizes the
        # cu_seqlens a GPU derives (a scatter past its end is a device fault), so neither
        # is trusted: every piece lies in one row, and the last row's last entry
        # (row_bounds, when the slot has it) is entry cu_len - 1. Scalar reads only.
        if not 0 < max_seqlen <= seq_len:
            raise ProtocolError(f"step {step}: max_seqlen {max_seqlen} is not in 1..="
                                f"{seq_len} (seq_len)")
        if conn.row_bounds_at is not None:
            views = st.views[slot]
            if len(views) > conn.row_bounds_at:
                last = int(views[conn.row_bounds_at][-1, 0])
                if last + 1 != cu_len:
                    raise ProtocolError(f"step {step}: cu_len {cu_len} disagrees with "
                                        f"row_bounds, whose last row ends at entry {last}")
        c0 = base + st.cursor_off
        cursor = conn.mm[c0 : c0 + cursor_len]
        plan_state = _U64.unpack_from(conn.mm, base + _PLAN_STATE_AT)[0]
        batch = Batch(step, plan_step, rows, seq_len, cu_len, max_seqlen, loss_tokens,
                      real_tokens, publish_ns, cursor, st.micro_batch_rows,
                      st.views[slot], self, conn.id, conn.layout, st.fields, plan_state)
        # The stream moves on before the batch is queued for release, and the queueing
        # call comes last: a signal handler runs at the check after a call, so one
        # raising (a Ctrl-C) after it finds the state whole and the batch lost to its
        # caller only. Queued first, a batch nobody had was released on the next call,
        # which took the same step from the slot the daemon then refilled.
        self._next_step = step + 1
        self._last_step = step
        self._resume_cursor = cursor
        self._plan_state = plan_state
        self._outstanding.append(batch)
        return batch

    def _retire_oldest(self):
        """Retires the oldest batch handed out, then takes it off the queue: taken off
        first, a Ctrl-C between the two (a signal handler runs after a call) left it
        neither queued nor stale, its views reading the step the daemon refilled its slot
        with. Retiring twice is harmless."""
        self._retire(self._outstanding[0])
        self._outstanding.popleft()

    def _retire(self, batch: Batch):
        """Retires one handed-out batch: waits for its GPU copy, marks it stale, and notes
        that its slot may go back (sent by :meth:`_flush_release`)."""
        _wait_fence(batch)
        batch._released = True
        conn = self._conn
        if conn is None or conn.gone or batch._conn_id != conn.id:
            return
        conn.done = max(conn.done, batch.step + 1)

    def _flush_release(self, force: bool):
        """Releases every retired step. With a release page: a store there each time, and
        a RELEASE frame only when the daemon says it waits and this client is about to
        wait (or ``force``). Without one, batched like the
        Rust client: while the next step is already published, only once
        ``(slots - hold) // 2`` retired steps have piled up, so the daemon wakes once per
        few steps; always before waiting."""
        conn = self._conn
        if conn is None or conn.gone or conn.done <= conn.released:
            return
        if conn.page is not None:
            # A store per release. A RELEASE frame only as the daemon's wake-up: when it
            # waits (its ring is full) and this client is about to wait too; while the
            # next step is published, the daemon's 2 ms backstop reads the page.
            conn.released = conn.done
            if not conn.publish_release(conn.done):
                return
            if not force and conn.published() > self._next_step:
                return
        else:
            batch = max(1, (conn.slots - self.hold) // 2)
            if not force and conn.done - conn.released < batch \
                    and conn.published() > self._next_step:
                return
            conn.released = conn.done
        try:
            _send(conn.sock, encode_frame(RELEASE, _U64.pack(conn.done)))
        except _Gone as e:
            conn.gone = True
            conn.gone_reason = str(e)
            # The steps published before the daemon went are still this client's to
            # read (docs/PROTOCOL.md, ERROR): `_next_batch` hands them out first. A
            # reconnect at once made a TP peer whose batching sent a frame here rejoin
            # at its own next step while its twins, which sent none, read on: the new
            # ring waited for them and they for it in the step's collective.
            conn.gone_readable = True
            # The daemon may have closed after an ERROR this client has not read yet
            # (while it trained): that frame, not the broken pipe, says why. Read it, or
            # a daemon's error would pass for a restart and be reconnected to.
            pending = _pending_frame(conn.sock)
            if pending is not None and pending[0] == ERROR:
                code, message = _reason(pending[1])
                conn.gone_reason = f"{code}: {message}"
                if code == "protocol":
                    # This client was put off a ring that goes on for its peers: its
                    # slots may be refilled under it, so nothing more is read.
                    conn.gone_readable = False
                    raise DaemonError(code, message) from None
                if code != "shutdown" and not self._stale_ring_resumes(conn, code):
                    conn.gone_error = DaemonError(code, message)

    def release_all(self):
        """Releases every batch handed out (their views become stale)."""
        if self._closed:
            return
        self._check_usable()
        while self._outstanding:
            self._retire_oldest()
        self._flush_release(force=True)

    # -- state --------------------------------------------------------------------------

    @property
    def plan_state(self) -> int | None:
        """The plan state digest of the last batch handed out (:attr:`Batch.plan_state`;
        None before one): what :func:`millrace.check_plans_agree` compares across nodes."""
        return self._plan_state

    def state_dict(self) -> dict:
        """Where this stream is: ``{"cursor": bytes | None, "step": int}``.

        ``cursor`` is the blob of the last batch handed out (``step``); a client given it
        (``cursor=`` or :meth:`load_state_dict`) resumes at ``step + 1``. Before any batch,
        ``cursor`` is the one this client was started with (or None, then ``step + 1`` is
        the start step).
        """
        if self._last_step is not None:
            return {"cursor": bytes(self._resume_cursor), "step": self._last_step}
        cur = None if self._resume_cursor is None else bytes(self._resume_cursor)
        if self._next_step is None and cur is not None and self._state_step is not None:
            # Not connected yet: the step load_state_dict was given with the blob (-1
            # here would be saved in a checkpoint taken now).
            return {"cursor": cur, "step": self._state_step}
        nxt = self._next_step if self._next_step is not None else (self._start_step or 0)
        return {"cursor": cur, "step": nxt - 1}

    def load_state_dict(self, state: dict):
        """Sets the resume point (before the first batch): the step after ``state``.

        With a cursor, ``state["step"]`` (when given and not -1) must be the blob's step:
        a checkpoint whose cursor and step come from different points is refused
        (:class:`MillraceError`, naming both) on connecting, not resumed at the blob's."""
        if self._last_step is not None or self._conn is not None:
            raise MillraceError("load_state_dict must be called before the client connects")
        cursor = state.get("cursor")
        step = state.get("step")
        self._resume_cursor = _as_blob(cursor)
        if cursor is not None:
            self._start_step = None
            # -1: what a client that had not connected yet used to save with its blob.
            self._state_step = None if step is None or int(step) < 0 else int(step)
        else:
            self._start_step = int(-1 if step is None else step) + 1
            self._state_step = None

    # -- closing ------------------------------------------------------------------------

    def close(self):
        """Says BYE and closes the socket and fds. Outstanding batches become stale."""
        if self._closed:
            return
        self._closed = True
        if self._forked():
            # The parent's connection: close this process's copies of its fds, nothing
            # more (no BYE, no release, no GPU work in a forked child).
            for b in self._outstanding:
                b._released = True
            self._outstanding.clear()
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close_fds()
            return
        for b in self._outstanding:
            _wait_fence(b)
            b._released = True
        self._outstanding.clear()
        self._drop_conn(send_bye=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _wait_fence(batch: Batch):
    fence = batch._fence
    if fence is not None:
        batch._fence = None
        fence.synchronize()


def _as_blob(cursor):
    if cursor is None:
        return None
    if isinstance(cursor, str):
        return bytes.fromhex(cursor)
    return bytes(cursor)



# ---------------------------------------------------------------------------- fork


# Clients that have connected in this process: at a fork, the slots of their batches
# still held are copied for the child (_before_fork).
_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()
# Between the hooks of one fork: (start, length, copy address, batches) per page range.
_FORK_COPIES: list = []
_LIBC = None


def _libc():
    """libc's mmap, mremap, munmap and memmove through ctypes (loaded at the first fork
    that has a batch to copy)."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        lib.mmap.restype, lib.mmap.argtypes = vp, [vp, sz, i, i, i, ctypes.c_long]
        lib.mremap.restype, lib.mremap.argtypes = vp, [vp, sz, sz, i, vp]
        lib.munmap.restype, lib.munmap.argtypes = i, [vp, sz]
        lib.mprotect.restype, lib.mprotect.argtypes = i, [vp, sz, i]
        _LIBC = (lib, ctypes.memmove)
    return _LIBC


def _held_ranges() -> list:
    """The page ranges ``[start, end)`` of every batch handed out and not released by a
    client of this process, merged, each with its batches."""
    spans = []
    page = mmap.PAGESIZE
    for client in list(_CLIENTS):
        if client._forked() or client._closed:
            continue
        for b in list(client._outstanding):
            views = [v for v in b._views if v.nbytes]
            if b._released or b._pid is None or not views:
                continue
            at = [v.__array_interface__["data"][0] for v in views]
            lo = min(at)
            hi = max(a + v.nbytes for a, v in zip(at, views))
            spans.append([lo - lo % page, -(-hi // page) * page, [b]])
    spans.sort(key=lambda s: s[0])
    merged = []
    for s in spans:
        if merged and s[0] <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s[1])
            merged[-1][2].extend(s[2])
        else:
            merged.append(s)
    return merged


def _before_fork():
    """Copies the ring slots of the batches held now into private memory, which the
    child inherits (the ring itself is shared: the parent's next steps refill them)."""
    _FORK_COPIES.clear()
    try:
        ranges = _held_ranges()
        if not ranges:
            return
        lib, memmove = _libc()
        for lo, hi, batches in ranges:
            copy = lib.mmap(None, hi - lo, mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            if copy in (None, 2**64 - 1, -1):
                continue
            memmove(copy, lo, hi - lo)
            lib.mprotect(copy, hi - lo, mmap.PROT_READ)
            _FORK_COPIES.append((lo, hi - lo, copy, batches))
    except Exception as e:  # a fork must not fail for this: the child refuses the batches
        log.debug("millrace: copying held slots before a fork failed: %s", e)


def _after_fork_parent():
    """Lets go of the parent's copies made for the child."""
    if _FORK_COPIES:
        lib, _ = _libc()
        for _lo, length, copy, _batches in _FORK_COPIES:
            lib.munmap(copy, length)
    _FORK_COPIES.clear()


_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def _after_fork_child():
    """Moves each copy over the range of the ring it was taken from, so every view of a
    batch held at the fork (and every array taken out of one) reads the batch as it was,
    and makes those batches the child's own (as :meth:`Batch.copy` would)."""
    copies = list(_FORK_COPIES)
    _FORK_COPIES.clear()
    if not copies:
        return
    lib, _ = _libc()
    for lo, length, copy, batches in copies:
        # Moved, not mapped anew and filled: a failed move leaves the ring's pages
        # mapped (their batches refused), where a failed MAP_FIXED may leave a hole.
        if lib.mremap(copy, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, lo) != lo:
            lib.munmap(copy, length)  # its batches stay refused (StaleBatch)
            continue
        for b in batches:
            if b._released:  # released while the copy was made: it may be torn
                continue
            client = b._client
            if client is not None:
                try:
                    client._outstanding.remove(b)
                except ValueError:
                    pass
            b._pid = b._client_ref = b._conn_id = b._fence = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                        after_in_child=_after_fork_child)
