"""Train a tiny causal transformer from a millrace daemon, with resumable checkpoints.

    millrace synth --out data && millrace serve --config data/millrace.toml &
    python train_tiny.py --steps 20 --checkpoint tiny.pt [--device cuda] \\
        [--socket PATH] [--dp-rank R --dp-size N]

The socket defaults to the daemon's own default (``millrace.default_socket()``); the
vocabulary comes from the daemon (WELCOME's ``vocab_size``, the config's
``[plan] vocab_size``) unless ``--vocab`` says otherwise.

Run it again with a larger --steps and the same --checkpoint: the model, the optimizer
and the data stream continue where they stopped (the checkpoint holds the cursor of the
last batch trained on; the daemon resumes at exactly the next step).

What a batch holds (docs/PROTOCOL.md section 4), per row of ``seq_len`` positions:

- ``tokens`` / ``labels``: inputs and next-token targets (labels are tokens shifted by
  one within the row's ``seq_len + 1`` tokens). Padding holds ``pad_token``.
- ``loss_mask``: 1 where the prediction stays inside one document piece; 0 across a
  document boundary and into padding. The loss is ``sum(ce * mask) / sum(mask)``.
- ``position_ids``: restart at 0 at each packed document (and at the padding).
- ``cu_seqlens`` / ``max_seqlen``: the document boundaries over the flattened
  ``rows * seq_len`` inputs, for variable-length attention.

A Megatron-style consumer (GPTModel.forward(input_ids, position_ids, attention_mask,
labels)) takes them directly::

    tokens, labels = tb.tokens.long(), tb.labels.long()
    position_ids = tb.position_ids.long()     # resets per document: with RoPE this is
                                              # what makes packed documents independent
    loss_mask = tb.loss_mask.float()          # Megatron's get_batch() returns the same
    output = model(tokens, position_ids, attention_mask=None, labels=labels)
    loss = (output.float().view(-1) * loss_mask.view(-1)).sum() / loss_mask.sum()
    # With data parallelism, sum loss_mask over the dp group (batch.loss_tokens is this
    # rank's count) to normalise by the global number of loss tokens.

A flash-attention varlen consumer packs the rows into one sequence and lets cu_seqlens
stop attention at document boundaries::

    from flash_attn import flash_attn_varlen_func
    q, k, v = ...                             # [rows * seq_len, heads, head_dim]
    out = flash_attn_varlen_func(q, k, v,
                                 cu_seqlens_q=tb.cu_seqlens, cu_seqlens_k=tb.cu_seqlens,
                                 max_seqlen_q=tb.max_seqlen, max_seqlen_k=tb.max_seqlen,
                                 causal=True)
    # cu_seqlens is int32 on the GPU (TorchClient on "cuda"); max_seqlen is a Python int
    # read from the slot header, so no device-to-host sync is needed.

With gradient accumulation, ``for mb in tb.micro_batches()`` gives each micro-batch's rows
with its own rebased ``cu_seqlens`` and ``max_seqlen``.

Attention here is PyTorch's ``scaled_dot_product_attention``, causal, once per packed
document (the spans ``cu_seqlens`` names): memory grows with the longest document, not
with ``rows * seq_len`` squared, so the synth config's 256 x 4096 batches fit on a CPU.
A CPU trains on the first ``--positions`` inputs of each batch (default 512, an eighth
of one synth row: a 20-step run of the synth defaults then takes well under a minute on
two busy cores); a GPU on as many as keep the logits within 2 GiB (10,672 at the synth
vocabulary: all 256 x 4096 positions would take 211 GB of logits).
The model's position table covers the longest ``seq_len`` of the stages WELCOME lists;
a stage added live (``millrace ctl set-stage``) longer than that is not listed, so give
such a run ``--max-pos``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import millrace
from millrace.torch_adapter import TorchClient


class Block(nn.Module):
    """A pre-norm transformer block whose attention stays inside each document."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, spans: list) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, 3, self.heads, dim // self.heads).unbind(1)
        # [heads, len, head_dim] per document; each attends causally to itself only.
        out = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                              v[a:b].transpose(0, 1), is_causal=True)
               .transpose(0, 1) for a, b in spans]
        x = x + self.proj(torch.cat(out).reshape(n, dim))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, max_pos: int, dim: int = 64, heads: int = 4,
                 layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, position_ids, spans):
        """tokens, position_ids: [n] (rows flattened); spans: the documents' [a, b)."""
        x = self.embed(tokens) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x, spans)
        return self.head(self.norm(x))


def document_spans(cu_seqlens: torch.Tensor, positions: int) -> list:
    """The [a, b) spans of the packed documents (and padding) among the first
    ``positions`` flattened inputs: consecutive entries of cu_seqlens, which breaks at
    every row end too, so a span never crosses rows; the last span is cut at
    ``positions``."""
    cu = [int(c) for c in cu_seqlens.tolist() if c < positions] + [positions]
    return [(a, b) for a, b in zip(cu, cu[1:]) if b > a]


def train_step(model, optim, tb, n: int, loss_tokens_total=None):
    """One optimizer step on the first ``n`` flattened inputs of ``tb`` (rows in order):
    the cross entropy summed over loss tokens, divided by ``loss_tokens_total`` (default:
    the loss tokens among those ``n``)."""
    tokens = tb.tokens.reshape(-1)[:n].long()
    labels = tb.labels.reshape(-1)[:n].long()
    mask = tb.loss_mask.reshape(-1)[:n].float()
    logits = model(tokens, tb.position_ids.reshape(-1)[:n].long(),
                   document_spans(tb.cu_seqlens, n))
    ce = F.cross_entropy(logits, labels, reduction="none")
    total = mask.sum().clamp(min=1) if loss_tokens_total is None else loss_tokens_total
    loss = (ce * mask).sum() / total
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", default=None,
                    help="the daemon's socket (default: millrace.default_socket())")
    ap.add_argument("--steps", type=int, default=20, help="train until this many steps")
    ap.add_argument("--checkpoint", default="tiny.pt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dp-rank", type=int, default=0)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--job", default="train_tiny")
    ap.add_argument("--vocab", type=int, default=None,
                    help="embedding rows (default: the daemon's [plan] vocab_size)")
    ap.add_argument("--positions", type=int, default=None,
                    help="inputs of each batch to train on, rows in order (default: as "
                         "many as keep the logits within 2 GiB on CUDA, 512 on a CPU)")
    ap.add_argument("--max-pos", type=int, default=None,
                    help="position table size (default: the longest seq_len of the "
                         "stages WELCOME lists)")
    ap.add_argument("--save-every", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before connecting: the ring is registered there

    client = millrace.Client(args.socket, args.dp_rank, args.dp_size, job=args.job)
    # TorchClient copies each batch to the device on a side stream while the previous
    # step computes; on the CPU its tensors are copies (copy=False: zero-copy views of
    # the ring, read-only: an in-place op on one is a SIGSEGV).
    stream = TorchClient(client, device=device, prefetch=1 if device.type == "cuda" else 0)

    ckpt = None
    if os.path.exists(args.checkpoint):
        ckpt = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
        stream.load_state_dict(ckpt["data"])   # before connecting: resume after its step
        print(f"resuming after step {ckpt['data']['step']}", flush=True)

    w = client.welcome
    vocab = args.vocab or w.get("vocab_size")
    if not vocab:
        raise SystemExit("the daemon's config has no [plan] vocab_size: pass --vocab")
    every = w["rows"] * w["seq_len"]
    # Logits are positions x vocab floats: bounded, or a GPU runs out of memory.
    cap = max(512, (2 << 30) // (4 * vocab)) if device.type == "cuda" else 512
    n = args.positions or cap
    print(f"fingerprint {client.fingerprint}, {w['rows']} rows x {w['seq_len']} tokens "
          f"(training on the first {min(n, every)}), vocab {vocab}, domains {w['domains']}",
          flush=True)

    # Stages change seq_len: the table covers the longest WELCOME lists.
    longest = args.max_pos or max(st["seq_len"] for st in w.get("stages") or [w])
    model = TinyLM(vocab, max_pos=longest).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])

    def save():
        tmp = args.checkpoint + ".tmp"
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                    "data": stream.state_dict()}, tmp)
        os.replace(tmp, args.checkpoint)

    t0 = time.monotonic()
    last = stream.state_dict()["step"]
    while last + 1 < args.steps:
        tb = next(stream)
        m = min(n, tb.tokens.numel())  # per step: stages change the shape
        loss = train_step(model, optim, tb, m)
        last = tb.step
        print(f"step {tb.step} loss {loss.item():.4f} (ln V = {math.log(vocab):.2f}) "
              f"loss_tokens {int(tb.loss_mask.reshape(-1)[:m].sum())}", flush=True)
        if (tb.step + 1) % args.save_every == 0:
            save()
    save()
    stream.close()
    print(f"done: {args.steps} steps, {time.monotonic() - t0:.1f} s this run", flush=True)


if __name__ == "__main__":
    main()
