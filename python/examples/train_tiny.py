"""Train a tiny causal transformer from a millrace daemon, with resumable checkpoints.

    millrace serve --config run.toml &
    python train_tiny.py --socket /run/millrace/millrace.sock --steps 200 \\
        --checkpoint tiny.pt [--device cuda] [--dp-rank R --dp-size N]

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

This example uses a plain PyTorch block-diagonal causal mask built from position_ids
(exactly what cu_seqlens describes), so it runs on a CPU without flash-attn.
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


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, heads: int = 4, layers: int = 2,
                 max_pos: int = 4096):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.heads = heads

    def forward(self, tokens, position_ids, doc_mask):
        x = self.embed(tokens) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x, src_mask=doc_mask)
        return self.head(self.norm(x))


def document_causal_mask(position_ids: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows*heads, L, L] additive mask: position i attends to j <= i in its own document.

    Documents are the runs that position_ids restarts at 0 (the same boundaries as
    cu_seqlens). A flash-attn varlen kernel would take cu_seqlens instead of this mask.
    """
    rows, L = position_ids.shape
    doc = torch.cumsum((position_ids == 0).int(), dim=1)          # document id per position
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(rows, L, L, device=position_ids.device)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask.repeat_interleave(heads, dim=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--steps", type=int, default=100, help="train until this many steps")
    ap.add_argument("--checkpoint", default="tiny.pt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dp-rank", type=int, default=0)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--job", default="train_tiny")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--save-every", type=int, default=10)
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before connecting: the ring is registered there

    client = millrace.Client(args.socket, args.dp_rank, args.dp_size, job=args.job)
    # TorchClient copies each batch to the device on a side stream while the previous
    # step computes; on the CPU its tensors are zero-copy views of the ring.
    stream = TorchClient(client, device=device, prefetch=1 if device.type == "cuda" else 0)

    model = TinyLM(args.vocab).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if os.path.exists(args.checkpoint):
        ckpt = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        stream.load_state_dict(ckpt["data"])   # before the first batch
        print(f"resuming after step {ckpt['data']['step']}", flush=True)

    w = client.welcome
    print(f"fingerprint {client.fingerprint}, {w['rows']} rows x {w['seq_len']} tokens, "
          f"domains {w['domains']}", flush=True)

    def save():
        tmp = args.checkpoint + ".tmp"
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                    "data": stream.state_dict()}, tmp)
        os.replace(tmp, args.checkpoint)

    t0 = time.monotonic()
    last = stream.state_dict()["step"]
    while last + 1 < args.steps:
        tb = next(stream)
        tokens = tb.tokens.long()
        labels = tb.labels.long()
        mask = tb.loss_mask.float()
        logits = model(tokens, tb.position_ids.long(),
                       document_causal_mask(tb.position_ids, model.heads))
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                             reduction="none")
        loss = (ce * mask.view(-1)).sum() / mask.sum().clamp(min=1)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        last = tb.step
        print(f"step {tb.step} loss {loss.item():.4f} (ln V = {math.log(args.vocab):.2f}) "
              f"loss_tokens {tb.loss_tokens}", flush=True)
        if (tb.step + 1) % args.save_every == 0:
            save()
    save()
    stream.close()
    print(f"done: {args.steps} steps, {time.monotonic() - t0:.1f} s this run", flush=True)


if __name__ == "__main__":
    main()
