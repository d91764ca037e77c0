"""FLOP and byte counts for attention, as FlashAttention's papers count them."""

from __future__ import annotations


def attention_flops(
    batch: int, heads: int, q_len: int, k_len: int, head_dim: int, *, causal: bool = False,
    mode: str = "fwd", head_dim_v: int | None = None,
) -> float:
    """Matmul FLOPs of one attention call: 2·B·H·Lq·Lk·(D + Dv) forward (4·B·H·n²·d when D = Dv).

    Causal halves the count (for Lq = Lk). Backward counts 2.5x the forward; "fwd_bwd" 3.5x.
    """
    dv = head_dim if head_dim_v is None else head_dim_v
    fwd = 2.0 * batch * heads * q_len * k_len * (head_dim + dv)
    if causal:
        fwd /= 2
    factors = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factors:
        raise ValueError(f"mode must be one of {sorted(factors)}, got {mode!r}")
    return fwd * factors[mode]


def kv_cache_bytes(batch: int, kv_heads: int, k_len: int, head_dim: int, elem_size: int,
                   head_dim_v: int | None = None) -> int:
    """Bytes of K and V that a decode step must read."""
    dv = head_dim if head_dim_v is None else head_dim_v
    return batch * kv_heads * k_len * (head_dim + dv) * elem_size
