"""Evaluation of a language model on a split: loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from qkv.data import LMWindows
from qkv.train.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: LMWindows, token_bytes: torch.Tensor, *,
             batch_size: int, max_batches: int | None = None, device: str | torch.device = "cpu",
             autocast: AbstractContextManager | None = None,
             dist: DistInfo | None = None) -> dict[str, float]:
    """Mean next-token loss over `windows` (the first max_batches * batch_size of them, or all).

    Returns {"loss": nats per token, "ppl": exp(loss), "bpb": bits per byte, "tokens", "bytes"}.
    Bits per byte is the summed NLL in bits over the UTF-8 bytes the target tokens stand for
    (`token_bytes` (V,); eos counts as no bytes), so it compares models with any tokenizer.
    Under DDP each process takes every world_size-th window and the sums are all-reduced.
    """
    dist = dist or DistInfo()
    n = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    if n == 0:
        raise ValueError("evaluation needs at least one window")
    was_training = model.training
    model.eval()
    token_bytes = token_bytes.to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    mine = list(range(dist.rank, n, dist.world_size))
    for start in range(0, len(mine), batch_size):
        xs, ys = zip(*(windows[i] for i in mine[start:start + batch_size]), strict=True)
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)  # (b, L)
        with autocast or nullcontext():
            logits, _ = model(x)  # (b, L, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        sums += torch.stack([nll.double(), torch.tensor(y.numel(), device=device).double(),
                             token_bytes[y].sum().double()])
    all_reduce_sum(sums, dist)
    model.train(was_training)
    nll, tokens, nbytes = sums.tolist()
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bpb": nll / (max(nbytes, 1.0) * math.log(2)), "tokens": int(tokens),
            "bytes": int(nbytes)}
