"""The reference backend: the explicit (Lq x Lk) computation, small and readable.

It is the oracle of the conformance tests (run in float64) and the only backend that can hand
back the attention weights themselves. Gradients come from PyTorch's autograd.
"""

from __future__ import annotations

import torch

from qkv.attention.masking import dropout_keep, masked_scores
from qkv.attention.spec import AttentionCall


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scores(q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Final scores (B, Hq, Lq, Lk) in the compute dtype, -inf where a pair is not visible."""
    B, Hq, Hk, Lq, Lk = call.B, call.Hq, call.Hk, call.Lq, call.Lk
    ct = compute_dtype(q.dtype)
    # Group the query heads that share one K/V head: (B, Hk, G*Lq, D). No copy of K.
    qg = q.to(ct).reshape(B, Hk, call.groups * Lq, call.D)
    s = (qg @ k.to(ct).transpose(-1, -2)) * call.scale  # (B, Hk, G*Lq, Lk)
    s = s.reshape(B, Hq, Lq, Lk)
    s, _ = masked_scores(call, s, 0, Lq, 0, Lk)
    return s


def weights(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over keys and the logsumexp; rows with no visible key get zeros and -inf."""
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
    # Give empty rows finite scores so no inf - inf appears, then blank them out: the `where`
    # sends no gradient into those rows.
    s = torch.where(empty, 0.0, s)
    p = torch.where(empty, 0.0, torch.softmax(s, dim=-1))
    lse = torch.where(empty.squeeze(-1), float("-inf"), torch.logsumexp(s, dim=-1))
    return p, lse


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
    """Returns (out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq))."""
    s = scores(q, k, call)
    p, lse = weights(s)
    if call.needs_dropout:
        keep = dropout_keep(call.dropout_seed, call.dropout_p, call.B, call.Hq, 0, call.Lq, 0,
                            call.Lk, q.device)
        p = p * keep / (1.0 - call.dropout_p)
    ct = p.dtype
    pg = p.reshape(call.B, call.Hk, call.groups * call.Lq, call.Lk)
    out = (pg @ v.to(ct)).reshape(call.B, call.Hq, call.Lq, call.Dv)
    return out.to(q.dtype), lse


def attention_weights(q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The softmax weights (B, Hq, Lq, Lk), before dropout; zero rows where nothing is visible."""
    p, _ = weights(scores(q, k, call))
    return p
