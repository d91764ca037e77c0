"""Score modifiers, visibility and dropout for a block of the score matrix.

Every PyTorch backend calls these on a block (rows i0:i1, columns j0:j1) of the (B, Hq, Lq, Lk)
score matrix, so the mask semantics of DESIGN.md are written exactly once:

    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)                   if softcap
    s = s + bias[b, h, i, j]                          if bias
    s = s - slope[b, h] * |(i + Lk - Lq) - j|         if alibi_slopes
    s = -inf where the pair is not visible (causal, window, kv_lengths, mask)
"""

from __future__ import annotations

import torch

from qkv.attention.spec import AttentionCall

_U32 = 0xFFFFFFFF
# Multipliers below 2**31 keep every product of a uint32 inside int64 without overflow; the
# Triton kernels compute the same hash in uint32 arithmetic, where the product wraps.
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _U32
    x = x ^ (x >> 15)
    x = (x * _M2) & _U32
    return x ^ (x >> 16)


def dropout_keep(
    seed: int, p: float, B: int, Hq: int, i0: int, i1: int, j0: int, j1: int, device
) -> torch.Tensor:
    """Bool (B, Hq, i1-i0, j1-j0): which attention weights survive dropout.

    The decision for (b, h, i, j) is a hash of (seed, b*Hq + h, i, j), so every backend and every
    block order draws the same mask, and the backward pass can recompute it.
    """
    bh = torch.arange(B * Hq, device=device, dtype=torch.int64).view(B, Hq, 1, 1)
    i = torch.arange(i0, i1, device=device, dtype=torch.int64).view(1, 1, -1, 1)
    j = torch.arange(j0, j1, device=device, dtype=torch.int64).view(1, 1, 1, -1)
    x = _mix32((seed & _U32) ^ bh)
    x = _mix32(x ^ i)
    x = _mix32(x ^ j)
    u = (x >> 8).to(torch.float64) * (1.0 / (1 << 24))
    return u >= p


def _block(t: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """Rows i0:i1 and columns j0:j1 of a 4-D mask or bias, keeping its broadcast (size-1) dims."""
    rows = slice(i0, i1) if t.shape[2] != 1 else slice(None)
    cols = slice(j0, j1) if t.shape[3] != 1 else slice(None)
    return t[:, :, rows, cols]


def _query_positions(call: AttentionCall, i0: int, i1: int, device) -> torch.Tensor:
    """(B or 1, i1-i0) int64: each query row's bottom-right aligned position i' = i + offset."""
    i = torch.arange(i0, i1, device=device, dtype=torch.int64).unsqueeze(0)
    if call.q_offset is None:
        return i + (call.Lk - call.Lq)
    return i + call.q_offset.to(device).unsqueeze(1)


def visible(call: AttentionCall, i0: int, i1: int, j0: int, j1: int, device) -> torch.Tensor | None:
    """Bool, broadcastable to (B, Hq, i1-i0, j1-j0): True where query i may see key j.

    Returns None when nothing in the call restricts visibility.
    """
    out = None

    def both(cond):
        nonlocal out
        out = cond if out is None else out & cond

    j = torch.arange(j0, j1, device=device, dtype=torch.int64)
    if call.causal or call.window is not None:
        ip = _query_positions(call, i0, i1, device).unsqueeze(-1)  # (B', bm, 1)
        jj = j.view(1, 1, -1)
        if call.causal:
            both((jj <= ip).unsqueeze(1))
        if call.window is not None:
            left, right = call.window
            if left is not None:
                both((jj >= ip - left).unsqueeze(1))
            if right is not None:
                both((jj <= ip + right).unsqueeze(1))
    if call.kv_lengths is not None:
        both((j.view(1, -1) < call.kv_lengths.unsqueeze(1)).view(call.B, 1, 1, j1 - j0))
    if call.mask is not None:
        both(_block(call.mask, i0, i1, j0, j1))
    return out


def modify_scores(call: AttentionCall, s: torch.Tensor, i0: int, i1: int, j0: int, j1: int):
    """Apply softcap, bias and ALiBi to a (B, Hq, bm, bn) block of scaled scores.

    Returns (scores, tanh_of_capped) where the second is kept for the softcap gradient (or None).
    """
    capped = None
    if call.softcap is not None:
        capped = torch.tanh(s / call.softcap)
        s = call.softcap * capped
    if call.bias is not None:
        s = s + _block(call.bias, i0, i1, j0, j1).to(s.dtype)
    if call.alibi_slopes is not None:
        ip = _query_positions(call, i0, i1, s.device)  # (B', bm)
        j = torch.arange(j0, j1, device=s.device, dtype=torch.int64)
        dist = (ip.unsqueeze(-1) - j.view(1, 1, -1)).abs().unsqueeze(1).to(s.dtype)  # (B',1,bm,bn)
        s = s - call.alibi_slopes.to(s.dtype).reshape(call.B, call.Hq, 1, 1) * dist
    return s, capped


def masked_scores(call: AttentionCall, s: torch.Tensor, i0: int, i1: int, j0: int, j1: int,
                  full: bool = False):
    """Scores of a block after every modifier, with invisible pairs set to -inf.

    `full` says the caller knows every pair of the block is visible (see `block_is_full`), so no
    mask is built. Outside autograd the block is overwritten in place.
    Returns (scores, tanh_of_capped_or_None).
    """
    s, capped = modify_scores(call, s, i0, i1, j0, j1)
    vis = None if full else visible(call, i0, i1, j0, j1, s.device)
    if vis is not None:
        fill = s.masked_fill if s.requires_grad else s.masked_fill_
        s = fill(~vis, float("-inf"))
    return s, capped


def reduce_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient (B, Hq, rows, cols) over the dimensions where a broadcast `shape` has size 1,
    so it fits a mask or bias that was broadcast to the scores."""
    dims = [d for d, n in enumerate(shape) if n == 1 and x.shape[d] != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


def block_is_empty(call: AttentionCall, i0: int, i1: int, j0: int, j1: int, kv_max: int,
                   offsets: tuple[int, int] | None = None) -> bool:
    """True when causal, window or kv_lengths hide every pair of the block for every batch row.

    `offsets` is `call.offset_range()`, passed in by callers that test many blocks.
    """
    if j0 >= kv_max:
        return True
    lo, hi = call.offset_range() if offsets is None else offsets
    if call.causal and j0 > (i1 - 1) + hi:
        return True
    if call.window is not None:
        left, right = call.window
        if left is not None and (j1 - 1) < i0 + lo - left:
            return True
        if right is not None and j0 > (i1 - 1) + hi + right:
            return True
    return False


def block_is_full(call: AttentionCall, i0: int, i1: int, j0: int, j1: int, kv_min: int,
                  offsets: tuple[int, int] | None = None) -> bool:
    """True when no visibility rule hides any pair of the block, for every batch row.

    Such a block needs no mask at all. `kv_min` is the smallest kv_length (or Lk).
    """
    if call.mask is not None or j1 > kv_min:
        return False
    lo, hi = call.offset_range() if offsets is None else offsets
    if call.causal and (j1 - 1) > i0 + lo:
        return False
    if call.window is not None:
        left, right = call.window
        if left is not None and j0 < (i1 - 1) + hi - left:
            return False
        if right is not None and (j1 - 1) > i0 + lo + right:
            return False
    return True


def kv_limit(call: AttentionCall) -> tuple[int, int]:
    """(min, max) over the batch of the number of key columns that may be visible."""
    if call.kv_lengths is None or call.B == 0:
        return call.Lk, call.Lk
    return int(call.kv_lengths.min()), int(call.kv_lengths.max())
