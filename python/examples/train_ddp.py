"""Data-parallel training from a millrace daemon under torchrun, resumable at any world size.

    millrace synth --out data && millrace serve --config data/millrace.toml &
    torchrun --nproc-per-node 2 train_ddp.py --steps 6 --checkpoint ddp.pt
    torchrun --nproc-per-node 1 train_ddp.py --steps 10 --checkpoint ddp.pt   # resumes

On a CPU the ranks talk over gloo, on GPUs over NCCL. What it shows:

- Each rank's client: ``dp_rank = RANK`` and ``dp_size = WORLD_SIZE`` from torchrun's
  environment. Rank r of R receives rows [rG/R, (r+1)G/R) of every global batch of G rows,
  so together the ranks train on exactly the batch a single process would.
- The loss normalised by the *global* loss-token count: each rank sums its cross entropy
  over its loss tokens and divides by the loss tokens of all ranks (an all-reduce of
  ``batch.loss_tokens``-like counts). DDP averages gradients over R ranks, so the loss is
  multiplied by R: the gradient is then that of ``sum(ce * mask) / global_loss_tokens``,
  the same at any world size (a per-rank mean would weight a token by its rank's count).
- Checkpoints hold ONE cursor, rank 0's. A cursor blob is the position of the whole
  global batch (every rank's rows: the plan is global, a rank only takes its slice), and
  ranks step in lockstep, so every rank's blob at a step is the same. The example checks
  that the ranks agree on the step before saving.
- Resume with a different world size: the blob does not depend on dp_size, so a run
  saved with 2 ranks resumes with 1 (or 4, any divisor of global_batch_rows) at exactly
  the next step; the model and optimizer state are the same at any world size.
- Every node plans alike: after the first batch, ``check_plans_agree`` compares every
  rank's cursor blob (one all_gather) and raises on every rank, naming the odd nodes,
  when a node's daemon plans other batches (another config, other shards or weights).
- A live mixture change: with ``--change-at STEP --change web=0.7,code=0.1`` rank 0
  decides the change, ``forward_change`` broadcasts it and has one rank per node send it
  to its node's daemon, and every rank gets the same reply (the step it applies from).
  The daemon's change journal travels in the cursor blobs, so a resumed run keeps it.

- Context parallelism (``--cp N``): the N CP ranks of a sequence are *peers* of one dp
  rank, like TP peers: ``dp_rank = RANK // N``, ``dp_size = WORLD_SIZE // N``,
  ``replica = "cp<i>"``, ``replicas = N``. They read the same ring (one copy of the rows
  on the node) and each takes its chunk of every row: positions ``[i L/N, (i+1) L/N)``
  (Megatron balances causal attention with 2N chunks instead, i and 2N-1-i). The chunks
  of all CP ranks of all dp ranks are the global batch exactly once, so the loss is
  normalised as above over all WORLD_SIZE ranks. The chunk's document boundaries come
  from its position ids (0 where a document or padding starts). This example's model
  attends within the chunk only; a real CP model exchanges keys and values in its group.
- Stages (``[[plan.stage]]``): a batch's ``rows`` and ``seq_len`` change at the switch
  step on the same connection; the model's position table is sized for the longest stage
  from WELCOME ``stages``, and every per-step size comes from the batch itself.

The model and step are those of train_tiny.py (beside this file): on a CPU each rank
trains on the first ``--positions`` inputs of its slice.
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import millrace
from millrace.control import Control, check_plans_agree, forward_change
from millrace.torch_adapter import TorchClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import TinyLM, train_step  # noqa: E402


def parse_weights(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        out[name.strip()] = float(w)
    return out


def cp_chunk(tb, cp_rank: int, cp: int):
    """Context-parallel rank ``cp_rank`` of ``cp``'s chunk of every row of ``tb``:
    positions ``[i L/cp, (i+1) L/cp)`` of tokens, labels, loss mask and position ids, and
    ``cu_seqlens`` over the flattened chunk (a piece starts where its position id is 0
    and at every row's start)."""
    if cp == 1:
        return tb
    seq = tb.tokens.shape[1]
    a, b = cp_rank * seq // cp, (cp_rank + 1) * seq // cp
    part = {k: getattr(tb, k)[:, a:b] for k in ("tokens", "labels", "loss_mask",
                                                 "position_ids")}
    pos = part["position_ids"].reshape(-1)
    idx = torch.arange(pos.numel(), device=pos.device)
    start = (pos == 0) | (idx % (b - a) == 0)
    end = torch.tensor([pos.numel()], device=pos.device)
    return SimpleNamespace(**part, cu_seqlens=torch.cat([idx[start], end]).int(),
                           step=tb.step)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", default=None,
                    help="the node's daemon (default: millrace.default_socket())")
    ap.add_argument("--steps", type=int, default=10, help="train until this many steps")
    ap.add_argument("--checkpoint", default="ddp.pt")
    ap.add_argument("--job", default="train_ddp")
    ap.add_argument("--positions", type=int, default=512,
                    help="inputs of each rank's slice to train on (CPU: keep it small)")
    ap.add_argument("--change-at", type=int, default=None,
                    help="at this step, change the mixture (for steps well ahead)")
    ap.add_argument("--change", default="web=0.7,code=0.1,books=0.1,wiki=0.1")
    ap.add_argument("--cp", type=int, default=1,
                    help="context-parallel ranks per sequence (peers of one dp rank)")
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)  # before connecting: the ring is registered there
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)  # the same initial model on every rank

    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} does not divide WORLD_SIZE {world}")
    cp_rank = rank % args.cp
    # CP ranks of one sequence are peers of one dp rank: one ring, each takes its chunk.
    client = millrace.Client(args.socket, dp_rank=rank // args.cp, dp_size=world // args.cp,
                             job=args.job, replica=f"cp{cp_rank}", replicas=args.cp)
    stream = TorchClient(client, device=device, prefetch=1 if cuda else 0)
    ckpt = None
    if os.path.exists(args.checkpoint):
        ckpt = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
        stream.load_state_dict(ckpt["data"])  # every rank: the same, global, position
        if rank == 0:
            print(f"resuming after step {ckpt['data']['step']} with {world} ranks "
                  f"(saved with {ckpt['world']})", flush=True)
    w = client.welcome
    # Sized for the longest stage: a long-context stage's rows arrive on this connection.
    longest = max(st["seq_len"] for st in w.get("stages") or [w])
    model = TinyLM(w["vocab_size"], max_pos=longest).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
    ddp = DDP(model)
    ctl = Control(client.socket_path)

    last = stream.state_dict()["step"]
    checked = False
    while last + 1 < args.steps:
        tb = cp_chunk(next(stream), cp_rank, args.cp)
        if not checked:
            # Every node's daemon must plan the same batches: a node with another config
            # or other shards would feed its ranks other rows, and nothing else fails.
            check_plans_agree(stream)
            checked = True
        n = min(args.positions, tb.tokens.numel())  # per step: stages change the shape
        mask = tb.loss_mask.reshape(-1)[:n]
        tokens = torch.tensor(float(mask.sum()), device=device)
        dist.all_reduce(tokens)  # the loss tokens of every rank at this step
        # / global tokens, * world: DDP's gradient mean then gives sum(ce*mask)/global.
        loss = train_step(ddp, optim, tb, n, loss_tokens_total=tokens.clamp(min=1) / world)
        last = tb.step
        shown = loss.detach().clone()
        dist.all_reduce(shown)  # sum over ranks of sum_r(ce*mask) * world / global
        if rank == 0:
            print(f"step {tb.step} loss {shown.item() / world:.4f} "
                  f"global_loss_tokens {int(tokens)}", flush=True)
        if args.change_at is not None and tb.step == args.change_at:
            change = None
            if rank == 0:
                # Ahead of what this node's daemon has published (ring slots and
                # prefetch, for every job it serves), with a margin for the other nodes.
                first = ctl.status()["first_changeable_step"]
                change = {"weights": parse_weights(args.change), "at_step": first + 8}
            reply = forward_change(ctl, change)
            if rank == 0:
                print(f"mixture change applies from step {reply['applied_step']}", flush=True)

    steps = [None] * world
    dist.all_gather_object(steps, last)
    assert len(set(steps)) == 1, f"ranks stopped at different steps: {steps}"
    if rank == 0:
        state = stream.state_dict()
        tmp = args.checkpoint + ".tmp"
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                    "data": state, "world": world}, tmp)
        os.replace(tmp, args.checkpoint)
        print(f"saved after step {state['step']}", flush=True)
    dist.barrier()
    stream.close()
    ctl.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
