"""A DecoderLM trained with each sequence sharded across the ranks of a context-parallel group.

Every rank of the group reads the same batch of whole sequences and keeps its shard (zigzag by
default): token ids, targets and their global positions, so that position embeddings and RoPE
see the positions the tokens have in the whole sequence. The layers run on the shard; only
self-attention talks to the other ranks (`context_parallel_attention`). The loss is the mean
over the whole batch's targets: each rank sums its shard's cross-entropy, divides by the
batch's target count (known to every rank, since each holds the whole batch's ids), and an
autograd-aware all-reduce over the group adds the shares. Its backward sums the ranks' upstream
gradients, so each rank's parameter gradient is group-size × its share: DistributedDataParallel
over all processes, which averages over world = dp × cp ranks, then gives the gradient of the
mean loss over the data-parallel replicas, as one process with their combined batch would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qkv.distributed.attention import context_parallel_attention
from qkv.distributed.ring import Ring
from qkv.distributed.sharding import chunks_per_rank, sequence_positions, shard_sequence
from qkv.nn import IGNORE_INDEX, DecoderLM


class _SumOverGroup(torch.autograd.Function):
    """The sum of `x` over the group's processes; its backward sums their gradients too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def check_model(config) -> None:
    """ValueError for a DecoderLM setting that context-parallel training does not offer."""
    refused = {"positions": config.positions == "alibi", "window": config.window is not None,
               "attn_dropout": config.attn_dropout > 0}
    wrong = [name for name, bad in refused.items() if bad]
    if wrong:
        raise ValueError(f"context parallelism does not offer model.{wrong[0]} "
                         f"({getattr(config, wrong[0])!r}): its attention takes causal, "
                         f"softcap and scale only (no ALiBi, window or attention dropout)")


def make_groups(context_parallel: int, world_size: int):
    """This process's context-parallel group: consecutive ranks [i·cp, (i+1)·cp). Every process
    must call it (dist.new_group is collective). ValueError unless cp >= 2 divides world_size."""
    if context_parallel < 2 or world_size % context_parallel:
        raise ValueError(f"context_parallel must be at least 2 and divide the number of "
                         f"processes, got context_parallel={context_parallel} with "
                         f"{world_size} process(es); launch a multiple of it under torchrun "
                         f"--nproc_per_node")
    mine = None
    for first in range(0, world_size, context_parallel):
        group = dist.new_group(list(range(first, first + context_parallel)))
        if first <= dist.get_rank() < first + context_parallel:
            mine = group
    return mine


class ContextParallelLM(nn.Module):
    """Runs `model` (a DecoderLM, whose parameters it shares) on this rank's shard of each
    sequence: forward(idx, targets) with the whole batch (B, L), the same on every rank of
    `group`, returns (logits of the shard (B, L/N, V), the mean loss over the whole batch, or
    None without targets). `shard_targets(targets)` gives the targets of those logits.

    L that the layout cannot split (2N for zigzag) is padded at the end with ignored targets.
    """

    def __init__(self, model: DecoderLM, group, *, layout: str = "zigzag"):
        super().__init__()
        check_model(model.config)
        self.model, self.group, self.layout = model, group, layout
        ring = Ring(group)
        self.rank, self.size = ring.rank, ring.size

    def _cut(self, t: torch.Tensor, fill: int) -> torch.Tensor:
        """This rank's shard (B, L'/N) of t (B, L), padded with `fill` to a length L' that the
        layout can split."""
        pad = -t.shape[1] % (self.size * chunks_per_rank(self.layout))
        t = F.pad(t, (0, pad), value=fill) if pad else t
        return shard_sequence(t, 1, self.rank, self.size, layout=self.layout)

    def shard_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets (B, L/N) of this rank's shard: the ones its logits are scored against."""
        return self._cut(targets, IGNORE_INDEX)

    def _positions(self, B: int, L: int, device) -> torch.Tensor:
        """(B, L/N) global positions of this rank's shard (padding repeats the last)."""
        padded = L + -L % (self.size * chunks_per_rank(self.layout))
        positions = sequence_positions(padded, self.rank, self.size, layout=self.layout,
                                       device=device)
        return positions.clamp(max=L - 1).expand(B, -1)

    def _attend(self, attn, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c = attn.config
        q, k, v, _ = attn._project(h, None, positions, None, 0, None)  # (B, H, L/N, D)
        y = context_parallel_attention(q, k, v, group=self.group, causal=True,
                                       softcap=c.softcap, scale=c.scale, layout=self.layout,
                                       backend=c.backend)
        return attn.dropout(attn.out_proj(y.transpose(1, 2).flatten(-2)))

    def _layer(self, layer, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = layer.residual(x, layer.attn_norm, lambda h: self._attend(layer.attn, h, positions))
        return layer.residual(x, layer.ffn_norm, layer.ffn)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        m = self.model
        positions = self._positions(*idx.shape, idx.device)
        x = m.embed(self._cut(idx, 0), positions)  # (B, L/N, d_model)
        for layer in m.layers:
            if m.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._layer, layer, x, positions, use_reentrant=False)
            else:
                x = self._layer(layer, x, positions)
        if m.final_norm is not None:
            x = m.final_norm(x)
        logits = m.lm_head(x)
        if targets is None:
            return logits, None
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)  # of the whole batch
        flat = logits.reshape(-1, logits.shape[-1])
        share = F.cross_entropy(flat if flat.dtype == torch.float64 else flat.float(),
                                self.shard_targets(targets).flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return logits, _SumOverGroup.apply(share / count, self.group)
