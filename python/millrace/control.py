"""The control protocol from Python: ask the node's daemon for its status, change the
mixture from a given step, reload its config, read its change journal; and, across
nodes, change the mixture everywhere at one step (:func:`forward_change`) and check that
every node's daemon plans the same batches (:func:`check_plans_agree`).

A control connection opens the daemon's unix socket and sends CONTROL frames (type 7, a
JSON object with ``"protocol": 1`` and an ``op``) instead of HELLO; each is answered by one
CONTROL_REPLY (type 8, a JSON object), in order. :class:`Control` connects on first use
and keeps the connection for later requests.

Errors
------
- :class:`ChangeRefused` (a :class:`~millrace.client.DaemonError`): the daemon answered
  ``ok: false``: a change for a step some client already received (``code == "late"``,
  with ``first_changeable_step``), invalid weights (``"invalid"``: an unknown domain, a
  negative weight, all zero), ``"busy"`` or ``"protocol"``. That daemon changed nothing; with
  :func:`forward_change`, other nodes may have (the message counts them).
- :class:`~millrace.client.Refused`: the daemon refused the connection (REFUSED frame,
  e.g. this uid is not allowed).
- :class:`~millrace.client.DaemonError`: the daemon judged a frame malformed (ERROR frame)
  and closed the connection, or closed it as idle (``code == "idle"``) just as the
  request was being sent (it was not delivered: send it again).
- :class:`~millrace.client.DaemonGone`: no daemon at the socket, or it closed the
  connection or did not reply within ``timeout`` (or its listen backlog stayed full
  that long: connecting is retried until then). For a change sent without a reply the
  message says so: the daemon may have applied it (a stalled daemon applies it once it
  runs again), so check :meth:`Control.journal` before sending it again.
- ``ValueError``: weights that cannot be sent (NaN or infinite: JSON has no such numbers).

Requests are not retried: after an error the connection is dropped and the next call
opens a new one, so a change is never sent twice behind the caller's back. So is the
connection of a request that a Ctrl-C (any exception) interrupted before its whole reply
was read: that reply may still come, and must not answer the next request. Such a
change may or may not be in force: check :meth:`Control.journal`. A connection
the daemon closed while it sat unused (``[serve] control_idle_timeout_ms``, ERROR
``idle``) is replaced before a request is sent on it: nothing was sent on it yet.

Changing the mixture on every node of a job
-------------------------------------------
Every node runs its own daemon, and all of them must apply a change at the same step or
the nodes' batches diverge. Let rank 0 decide, broadcast the change, have one rank per
node forward it to that node's daemon, and check that every node applied it at the same
step (:func:`forward_change` does this; it needs torch.distributed)::

    import torch.distributed as dist
    from millrace import Control, forward_change

    ctl = Control()  # the node's daemon at the default socket, or Control(path)
    change = None
    if dist.get_rank() == 0:
        # Far enough ahead that no node has handed the step out yet.
        change = {"weights": {"code": 0.4, "web": 0.5}, "at_step": step + 100}
    reply = forward_change(ctl, change)   # the same reply on every rank
    print(reply["applied_step"])

which is, spelled out::

    obj = [change]
    dist.broadcast_object_list(obj, src=0)
    reply = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:     # one rank per node
        reply = ctl.set_weights(**obj[0])              # late="refuse": no silent moves
    replies = [None] * dist.get_world_size()
    dist.all_gather_object(replies, reply)
    steps = {r["applied_step"] for r in replies if r is not None}
    assert len(steps) == 1, f"nodes applied the change at different steps: {steps}"

Use ``late="refuse"`` (the default) across nodes: with ``late="next"`` each daemon could
move the change to a different step. Choose ``at_step`` well ahead of what any node has
prefetched (ring slots + prefetch steps, plus margin): a node that refuses while others
accept leaves the nodes disagreeing from that step, and only a further change (or a
restart from a checkpoint) brings them back together.

Checking that every node plans the same batches
-----------------------------------------------
Each node's daemon plans the global batches on its own, from its own config and shards.
A node whose config file or corpus differs (a stale copy, a shard missing from its
mount, other weights) plans other batches, and nothing fails: its ranks just train on
data the others never planned. Every slot carries its step's plan state (the planner's
position in every domain, by value), the same on every node that plans alike whatever
journal of live changes it holds, so comparing them finds it::

    for step, batch in enumerate(client):
        if step == 0:
            check_plans_agree(client)   # every rank; RuntimeError names the odd nodes
        ...

Call it on every rank of the group at the same step (after the first batch, and after a
resume or a live change if you like; it is one all_gather of a short record).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import select
import socket as _socket
import time

from .client import (
    ERROR,
    MAX_JSON_FRAME,
    REFUSED,
    DaemonError,
    DaemonGone,
    ProtocolError,
    Refused,
    _NO_DAEMON_ERRNOS,
    _BacklogFull,
    _Gone,
    _check_fallback_dir,
    _connect_unix,
    _no_daemon,
    _pending_frame,
    _reason,
    default_socket,
    encode_frame,
    read_frame,
)

__all__ = ["Control", "ChangeRefused", "forward_change", "CONTROL", "CONTROL_REPLY",
           "DEFAULT_SOCKET"]

CONTROL, CONTROL_REPLY = 7, 8
# The control protocol's version: unchanged by compact slots (HELLO speaks 2).
CONTROL_VERSION = 1
# The daemon's default socket for this user (see default_socket), as of import.
DEFAULT_SOCKET = default_socket()
_LATE = ("refuse", "next")
# Requests that change nothing: one without a reply is simply lost.
_READS = ("status", "journal")


class ChangeRefused(DaemonError):
    """A daemon answered a control request with ``ok: false``; that daemon changed nothing
    (from :func:`forward_change`, other nodes may have: the message says), but for one
    case: ``busy`` whose message says ``applied; the reply would not fit one frame``
    (a journal of tens of MB as JSON), where the change was applied and only its reply
    was cut: read ``journal()`` before sending it again.

    ``code`` is ``late``, ``invalid``, ``protocol``, ``busy`` or ``access`` (this uid is not
    in ``[serve] control_uids``); ``first_changeable_step`` is set when ``code == "late"``;
    ``reply`` is the whole reply.
    """

    def __init__(self, code: str, message: str, first_changeable_step: int | None = None,
                 op: str = "", reply: dict | None = None):
        super().__init__(code, message)
        self.first_changeable_step = first_changeable_step
        self.op = op
        self.reply = reply or {}

    def __str__(self):
        s = f"{self.code}: {self.message}"
        said = f"the first step that can still change is {self.first_changeable_step}"
        if self.first_changeable_step is not None and said not in self.message:
            s += f" (the first step that can still change is {self.first_changeable_step})"
        return s


class Control:
    """A control connection to one daemon, opened on first use.

    ``timeout`` (seconds) bounds connecting and each reply. Not thread safe: use it from
    one thread (or one per thread).
    """

    def __init__(self, socket_path: str | os.PathLike | None = None, timeout: float = 10.0):
        self.socket_path = default_socket() if socket_path is None else os.fspath(socket_path)
        self.timeout = timeout
        self._sock = None
        # True from a request's send until its whole reply is read: still set when the
        # next request comes, an exception (a Ctrl-C) cut that one short, and its reply,
        # or the rest of it, may still arrive on the connection.
        self._unanswered = False

    # -------------------------------------------------------------------- requests

    def status(self) -> dict:
        """The daemon's STATUS object: clients, rings, mixture, journal, counters."""
        return self.request({"op": "status"})["status"]

    def set_weights(self, weights: dict, at_step: int | None = None,
                    late: str = "refuse") -> dict:
        """Changes mixture weights from ``at_step`` on (default: the first step that can
        still change); domains not named keep theirs. Returns the reply (``applied_step``,
        ``moved``, ``journal``, ``message``); raises :class:`ChangeRefused` if refused.

        ``late="next"`` applies a change for an already delivered step at the first step
        that can still change (the reply's ``moved`` is then true) instead of refusing it.
        A daemon no trainer has connected to since it started does not know the run's
        step and refuses a change without ``at_step`` (``invalid``).
        """
        if late not in _LATE:
            raise ValueError(f"late={late!r}: must be one of {_LATE}")
        if not isinstance(weights, dict) or not weights:
            raise ValueError("weights must be a non-empty dict of domain name -> weight")
        clean = {}
        for name, w in weights.items():
            if not isinstance(name, str):
                raise ValueError(f"domain name {name!r} is not a string")
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                try:
                    w = float(w)  # numpy scalars
                except (TypeError, ValueError):
                    raise ValueError(f"weight of {name!r} is not a number: {w!r}") from None
            if not math.isfinite(w):
                raise ValueError(f"weight of {name!r} is {w}: weights must be finite")
            clean[name] = float(w)
        # "client" marks the change as the trainer's own in the daemon's journal.
        req = {"op": "set_weights", "weights": clean, "late": late, "source": "client"}
        if at_step is not None:
            if isinstance(at_step, bool) or int(at_step) != at_step or at_step < 0:
                raise ValueError(f"at_step={at_step!r} must be a non-negative integer")
            req["at_step"] = int(at_step)
        return self.request(req)

    def set_stage(self, seq_len: int, global_batch_rows: int, at_step: int | None = None,
                  best_fit_window: int | None = None, chain_groups: bool = False,
                  late: str = "refuse") -> dict:
        """Adds a stage from ``at_step`` on (default: the first step that can still
        change): rows of ``seq_len`` tokens, ``global_batch_rows`` per step, as a
        ``[[plan.stage]]`` would (a long-context stage without a restart). Clients get
        the new shape at that step on the same connection. Raises :class:`ChangeRefused`
        (``invalid``) when the job's dp_size or micro_batches do not divide the rows or
        the rings' slots are too small (``[serve] stage_reserve_tokens``)."""
        if late not in _LATE:
            raise ValueError(f"late={late!r}: must be one of {_LATE}")
        req = {"op": "set_stage", "late": late, "source": "client",
               "chain_groups": bool(chain_groups)}
        for name, v in (("seq_len", seq_len), ("global_batch_rows", global_batch_rows),
                        ("best_fit_window", best_fit_window), ("at_step", at_step)):
            if v is None and name in ("best_fit_window", "at_step"):
                continue
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative integer")
            req[name] = int(v)
        return self.request(req)

    def reload(self) -> dict:
        """Re-reads the daemon's config file (as SIGHUP does); returns the reply
        (``applied_step`` is None when nothing changed)."""
        return self.request({"op": "reload"})

    def journal(self) -> list:
        """The changes in force, oldest first (the journal cursor blobs carry)."""
        return self.request({"op": "journal"})["journal"]

    def request(self, req: dict) -> dict:
        """Sends one request (``protocol`` is added) and returns its reply; an ``ok: false``
        reply raises :class:`ChangeRefused`."""
        body = dict(req)
        body.setdefault("protocol", CONTROL_VERSION)
        try:
            payload = json.dumps(body, allow_nan=False).encode()
        except ValueError as e:
            raise ValueError(f"the request cannot be sent as JSON: {e}") from None
        if len(payload) + 1 > MAX_JSON_FRAME:
            raise ValueError(f"the request is {len(payload) + 1} bytes; a frame holds "
                             f"at most {MAX_JSON_FRAME}")
        sock = self._connect()
        self._unanswered = True
        try:
            sock.sendall(encode_frame(CONTROL, payload), _socket.MSG_NOSIGNAL)
        except OSError as e:
            # The daemon closed between _connect's look and this send (so the request was
            # not delivered); the ERROR frame it sent first says why.
            pending = _pending_frame(sock) if e.errno in (errno.EPIPE, errno.ECONNRESET) \
                else None
            self.close()
            if pending is not None and pending[0] == ERROR:
                code, message = _reason(pending[1])
                raise DaemonError(code, f"{message} (the request was not delivered; send "
                                        "it again)") from None
            raise DaemonGone(f"{self.socket_path}: cannot send: {e}") from e
        try:
            kind, reply = read_frame(sock)
        except (_Gone, OSError) as e:
            self.close()
            # The daemon may have refused us and closed before reading the request, or
            # be slow and apply it after we gave up: a change may or may not be in force.
            unsure = "" if body.get("op") in _READS else (
                f" (the {body.get('op')} request was sent: the daemon may have applied it, "
                "or still apply it; check journal() before sending it again)")
            raise DaemonGone(f"{self.socket_path}: no reply: {e}{unsure}") from e
        except ProtocolError:
            self.close()
            raise
        self._unanswered = False
        if kind == REFUSED:
            self.close()
            raise Refused(*_reason(reply))
        if kind == ERROR:
            self.close()
            raise DaemonError(*_reason(reply))
        if kind != CONTROL_REPLY:
            self.close()
            raise ProtocolError(f"expected CONTROL_REPLY (type {CONTROL_REPLY}), "
                                f"got frame type {kind}")
        try:
            value = json.loads(reply)
        except ValueError as e:
            self.close()
            raise ProtocolError(f"CONTROL_REPLY is not JSON: {e}") from None
        if not isinstance(value, dict):
            self.close()
            raise ProtocolError("CONTROL_REPLY is not a JSON object")
        if value.get("ok") is not True:
            fcs = value.get("first_changeable_step")
            raise ChangeRefused(str(value.get("code", "?")), str(value.get("message", "")),
                                fcs if isinstance(fcs, int) else None,
                                str(value.get("op", body.get("op", ""))), value)
        return value

    # -------------------------------------------------------------------- connection

    def _connect(self):
        if self._sock is not None:
            if not self._unanswered and not _readable(self._sock):
                return self._sock
            # Every reply was read, so anything to read now is the daemon closing the
            # connection (ERROR `idle` after control_idle_timeout_ms unused, or its end):
            # open a new one. Nothing was sent on this one since its last reply. A
            # request an exception cut short may still get its reply, which the next
            # request would read as its own: a new connection then too.
            self.close()
        # Not to an impostor in another user's /tmp/millrace-UID: a control connection
        # sends changes and trusts the replies (the trainer client refuses it too).
        _check_fallback_dir(self.socket_path)
        deadline = time.monotonic() + self.timeout
        while True:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                _connect_unix(sock, self.socket_path)
                break
            except _BacklogFull as e:
                # `timeout` bounds connecting: a blocking connect would have waited that
                # long for room in the backlog, where ours fails at once. Nothing was
                # sent, so this retries no request.
                sock.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonGone(f"cannot connect to {self.socket_path} within "
                                     f"{self.timeout:g} s: {e}") from None
                time.sleep(min(0.1, left))
            except DaemonGone:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                if e.errno in _NO_DAEMON_ERRNOS:
                    raise DaemonGone(_no_daemon(self.socket_path, e)) from e
                raise DaemonGone(f"cannot connect to {self.socket_path}: {e}") from e
        self._sock = sock
        return sock

    def close(self) -> None:
        """Closes the connection (the next request opens a new one)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._unanswered = False

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "connected" if self._sock is not None else "not connected"
        return f"Control({self.socket_path!r}, {state})"


def _readable(sock) -> bool:
    """Whether ``sock`` has something to read or was hung up, without waiting."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


def forward_change(control: Control, change: dict | None, src: int = 0, group=None,
                   forward: bool | None = None) -> dict:
    """Broadcasts ``change`` (kwargs of :meth:`Control.set_weights`, given on rank ``src``)
    to every rank, has one rank per node send it to that node's daemon, and returns the
    reply, the same on every rank. Raises :class:`ChangeRefused` on every rank if any node
    refused it, and ``RuntimeError`` if nodes applied it at different steps. Both mean the
    nodes may now disagree: the message says how many applied it.

    ``change`` must name ``at_step`` and must not ask for ``late="next"``: otherwise each
    daemon would pick its own step. ``ValueError`` (on every rank, before anything is
    sent) says so.

    Applied at one step is not enough: ``set_weights`` keeps the weights each node has
    in force for the domains it does not name, so nodes whose journals already differed
    would apply different mixtures. The replies' journals (each change's step, points
    and stage; not its source) are compared too, and ``RuntimeError`` names the nodes
    that differ.

    ``forward`` says whether this rank talks to its daemon (default: ``LOCAL_RANK == 0``;
    without ``LOCAL_RANK``, the lowest rank of each host). Needs torch.distributed,
    initialised; imported only when called.
    """
    import torch.distributed as dist

    obj = [change]
    dist.broadcast_object_list(obj, src=src, group=group)
    change = obj[0]
    if not isinstance(change, dict) or change.get("at_step") is None:
        raise ValueError("forward_change needs an explicit at_step, the same on every node")
    if change.get("late", "refuse") != "refuse":
        raise ValueError('forward_change takes late="refuse" only: with "next" each node '
                         "could move the change to a different step")
    if forward is None:
        forward = _first_on_host(dist, group)
    mine = None
    if forward:
        try:
            mine = {"reply": control.set_weights(**change)}
        except ChangeRefused as e:
            mine = {"refused": (e.code, e.message, e.first_changeable_step, e.op, e.reply)}
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            mine = {"error": f"{type(e).__name__}: {e}"}
    world = dist.get_world_size(group)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    sent = [m for m in everyone if m is not None]
    if not sent:
        # Every rank was told not to forward (``forward=False`` everywhere, or no rank
        # with LOCAL_RANK 0): no daemon got the change.
        raise RuntimeError(f"no rank of the {world} forwarded the change, so no daemon "
                           "got it: pass forward=True on one rank per node")
    applied = sum(1 for m in sent if "reply" in m)
    for m in sent:
        if "error" in m:
            raise RuntimeError(f"a node could not forward the change: {m['error']} "
                               f"({applied} of {len(sent)} nodes applied it)")
    for m in sent:
        if "refused" in m:
            code, message, first, op, reply = m["refused"]
            if applied:
                message = (f"{message} ({applied} of {len(sent)} nodes applied the change: "
                           "the nodes now disagree from its step; send a further change to "
                           "every node to bring them together)")
            raise ChangeRefused(code, message, first, op, reply)
    steps = {m["reply"].get("applied_step") for m in sent}
    if len(steps) != 1:
        raise RuntimeError(f"nodes applied the change at different steps: {sorted(steps)}")
    journals = [_journal_key(m["reply"].get("journal")) for m in sent]
    differ = [i for i, j in enumerate(journals) if j != journals[0]]
    if differ:
        raise RuntimeError(
            f"the nodes' journals of live changes differ after the change (forwarding "
            f"nodes {differ} of {len(sent)} disagree with the first): they now mix "
            "differently; restore every rank from one checkpoint or send the full weights "
            "of every domain to every node")
    return sent[0]["reply"]


def _journal_key(journal) -> str:
    """A journal as nodes must agree on it: each change's steps, points and stage, not
    where it came from (a node that learned a change from a cursor blob says `cursor`)."""
    entries = [{k: v for k, v in e.items() if k != "source"} for e in (journal or [])
               if isinstance(e, dict)]
    return json.dumps(entries, sort_keys=True)


def _first_on_host(dist, group) -> bool:
    """Whether this rank forwards for its node: ``LOCAL_RANK == 0`` when the launcher
    sets it, else the lowest rank on this host (gathered, so every rank must call it)."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None:
        return int(local) == 0
    host = _socket.gethostname()
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, host, group=group)
    return hosts.index(host) == dist.get_rank(group)


def plan_record(client, rank: int, host: str | None = None) -> dict:
    """What one rank's stream says about the plan its daemon follows, for
    :func:`plan_disagreement`: its step, the plan fingerprint (corpus and static config)
    and the plan state of that step: the slot's ``plan_state`` digest (the planner's
    position in every domain, by value, so nodes whose journals differ but plan alike
    agree; None before a batch, or from a daemon before 2026-12-06), and a digest of the
    cursor blob (compared when some rank has no state). ``client`` is a
    :class:`~millrace.Client`, a ``TorchClient`` or anything with ``state_dict()`` and a
    WELCOME; it must have handed out a batch or been given a cursor to resume from. Or
    it is an item a ``MillraceIterableDataset`` yielded (a dict: a DataLoader's dataset
    has no client in the trainer's process when a worker reads it)."""
    if isinstance(client, dict):
        missing = [k for k in ("cursor", "step", "plan_state", "fingerprint")
                   if k not in client]
        if missing:
            raise ValueError(f"a dict passed as the client must be an item of "
                             f"MillraceIterableDataset; it has no {', '.join(missing)}")
        state = _compared_position({"cursor": client["cursor"], "step": client["step"]})
        fingerprint, digest = client["fingerprint"], int(client["plan_state"], 16)
    else:
        state = _compared_position(client.state_dict())
        fingerprint = getattr(client, "fingerprint", None)
        if fingerprint is None:
            fingerprint = client.welcome["fingerprint"]
        digest = getattr(client, "plan_state", None)
    return {"rank": int(rank), "host": host or _socket.gethostname(),
            "step": int(state["step"]), "fingerprint": str(fingerprint),
            "state": f"{digest:016x}" if digest else None,
            "blob": hashlib.sha256(bytes(state["cursor"])).hexdigest()[:32]}


def _compared_position(state: dict) -> dict:
    """``state`` (a stream's position), checked to name a step a plan can be compared at."""
    if state.get("cursor") is None:
        raise ValueError("a plan can be compared only after a batch (or a resume cursor): "
                         "call check_plans_agree after the first batch")
    if int(state["step"]) < 0:
        raise ValueError("the client resumes from a cursor but has not connected yet: call "
                         "check_plans_agree after the first batch")
    return state


def _ranks(ranks: list) -> str:
    """Ranks as ranges: ``0-7, 16``."""
    out, ranks = [], sorted(ranks)
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(out)


def _groups(records: list, key: str) -> str:
    """The records grouped by ``key``: per value, its ranks and (up to 4) hosts."""
    by = {}
    for r in records:
        by.setdefault(r[key], []).append(r)
    parts = []
    for value, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        hosts = sorted({r["host"] for r in rs})
        shown = ", ".join(hosts[:4]) + (f" and {len(hosts) - 4} more" if len(hosts) > 4 else "")
        parts.append(f"{key} {value} on ranks {_ranks([r['rank'] for r in rs])} ({shown})")
    return "; ".join(parts)


def plan_disagreement(records: list) -> str | None:
    """``None`` when every rank's :func:`plan_record` names the same step and plan, else
    what differs, with the ranks and hosts of each side (the largest group first)."""
    if not records:
        return None
    if len({r["step"] for r in records}) > 1:
        return ("ranks are at different steps of the stream: " + _groups(records, "step")
                + ". Every rank must have consumed the same number of batches, from one "
                "checkpoint")
    # The plan state where every rank has one; else (a daemon before 2026-12-06, a rank
    # resumed but not yet served) the blobs, which agree when the journals do.
    key = "state" if all(r.get("state") for r in records) else "blob"
    if len({r[key] for r in records}) == 1:
        return None
    step = records[0]["step"]
    if len({r["fingerprint"] for r in records}) > 1:
        return (f"the nodes' daemons plan step {step} from different corpora or plan "
                "configs: " + _groups(records, "fingerprint") + ". Give every node the same "
                "config and shards (`millrace check-config` on each prints the fingerprint)")
    return (f"the nodes' daemons plan different batches at step {step} from the same corpus "
            f"and config (fingerprint {records[0]['fingerprint']}): their weights, schedule, "
            "skips, reseeds or live changes differ, or their ranks resumed from different "
            "checkpoints. " + _groups(records, key) + ". Compare `millrace ctl journal` "
            "and the config's [plan] on each node")


def check_plans_agree(client, group=None) -> dict:
    """Raises ``RuntimeError`` on every rank of ``group`` unless every rank's daemon plans
    the same global batches (:func:`plan_disagreement` says how they differ); returns this
    rank's :func:`plan_record`. Every rank of the group must call it at the same step:
    it is one ``all_gather_object``. A rank that cannot tell its plan (no batch yet, its
    daemon gone) takes part in it all the same, so every rank raises ``RuntimeError``
    naming that rank and why, instead of the others waiting in the gather. ``client``:
    what :func:`plan_record` takes (with a DataLoader, an item the
    ``MillraceIterableDataset`` yielded). Needs torch.distributed, initialised; imported
    only when called."""
    import torch.distributed as dist

    rank = dist.get_rank()
    failure = None
    try:
        mine = plan_record(client, rank)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        failure = e
        mine = {"rank": rank, "host": _socket.gethostname(),
                "error": f"{type(e).__name__}: {e}"}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    failed = [r for r in everyone if "error" in r]
    if failed:
        raise RuntimeError("check_plans_agree: " + "; ".join(
            f"rank {r['rank']} ({r['host']}) could not tell its plan: {r['error']}"
            for r in failed)) from failure
    why = plan_disagreement(everyone)
    if why:
        raise RuntimeError(why)
    return mine
