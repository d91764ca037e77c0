"""Multi-head attention (MHA, GQA, MQA; self or cross) on top of `qkv.attention`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import qkv
from qkv.nn.config import check_choice, check_float, check_int, check_unpadded
from qkv.nn.positions import (
    ROPE_SCALINGS,
    ExactBuffers,
    RotaryEmbedding,
    alibi_slopes,
    positions_from_cu_seqlens,
)

ATTENTION_POSITIONS = ("none", "rope", "alibi")


@dataclass
class AttentionConfig:
    """Settings of one multi-head attention module."""

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None  # None: n_heads (MHA); 1: MQA; other divisors: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    bias: bool = True
    attn_dropout: float = 0.0  # on the attention weights
    dropout: float = 0.0  # on the output
    cross: bool = False  # queries from x, keys and values from a separate context
    positions: str = "none"  # none | rope | alibi (absolute embeddings live in the model)
    rope_base: float = 10000.0
    rope_scaling: str | None = None  # None | linear | ntk
    rope_factor: float = 1.0
    # Sliding window: qkv.attention's window=(window, 0) when causal, (window, window)
    # otherwise; keys at most `window` positions before (and, if not causal, after) a query.
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None  # None: 1/sqrt(head_dim)
    backend: str = "auto"

    def __post_init__(self):
        check_int("d_model", self.d_model)
        check_int("n_heads", self.n_heads)
        check_int("n_kv_heads", self.n_kv_heads, optional=True)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        check_int("head_dim", self.head_dim, optional=True)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                    "unless head_dim is given"
                )
            self.head_dim = self.d_model // self.n_heads
        check_float("attn_dropout", self.attn_dropout, low=0.0, high=1.0)
        check_float("dropout", self.dropout, low=0.0, high=1.0)
        check_choice("positions", self.positions, ATTENTION_POSITIONS)
        if self.cross and self.positions != "none":
            raise ValueError(
                f"positions must be 'none' for cross-attention, got {self.positions!r}"
            )
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_int("window", self.window, minimum=0, optional=True)
        check_float("softcap", self.softcap, low=0.0, low_open=True, optional=True)
        check_float("scale", self.scale, low=0.0, low_open=True, optional=True)
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a string, got {self.backend!r}")


class MultiHeadAttention(ExactBuffers):
    """Project, attend with `qkv.attention`, project back.

    Self-attention uses one fused projection `qkv_proj` (d_model -> (Hq + 2 Hk) * D); cross-
    attention uses `q_proj` on x and `kv_proj` on the context. With a cache, self-attention
    appends its new K/V through `cache.update(layer_idx, k, v)` and cross-attention computes its
    K/V once per generation and reads them back from the cross cache after that. ALiBi slopes
    stay float32 when the module is cast (float64 for float64 inputs).
    """

    _exact_buffers = ("alibi_slopes",)

    def __init__(self, config: AttentionConfig):
        super().__init__()
        c = config
        self.config = c
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        if c.cross:
            self.q_proj = nn.Linear(c.d_model, q_dim, bias=c.bias)
            self.kv_proj = nn.Linear(c.d_model, 2 * kv_dim, bias=c.bias)
        else:
            self.qkv_proj = nn.Linear(c.d_model, q_dim + 2 * kv_dim, bias=c.bias)
        self.out_proj = nn.Linear(q_dim, c.d_model, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)
        self.rope = (
            RotaryEmbedding(c.head_dim, c.rope_base, c.rope_scaling, c.rope_factor)
            if c.positions == "rope" else None
        )
        if c.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(c.n_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, L, n * D) -> (B, n, L, D); packed rows (T, n * D) -> (T, n, D)."""
        x = x.unflatten(-1, (n, self.head_dim))
        return x.transpose(1, 2) if x.dim() == 4 else x

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K and V (B, Hk, Lk, D) of a context (B, Lk, d_model), or (Tk, Hk, D)
        of a packed context (Tk, d_model)."""
        k, v = self.kv_proj(context).split(self.n_kv_heads * self.head_dim, dim=-1)
        return self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        positions: torch.Tensor | None = None,
        kv_lengths: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache=None,
        layer_idx: int = 0,
        backend: str | None = None,
        cu_seqlens: torch.Tensor | None = None,
        context_cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model); packed rows x (T, d_model) -> (T, d_model).

        context (B, Lk, d_model) is required for cross-attention (unless the cross cache already
        holds this layer's K/V). positions (B, L) are the absolute positions of x's tokens (for
        RoPE; default 0..L-1). Key padding is given as kv_lengths (B,) (keys j >= length are
        padding) or key_padding_mask (B, Lk) bool, True = real key; with a cache both describe
        every key the cache returns. Causal and window are aligned bottom-right, so the newest
        query sees the newest key.

        Packed rows: x holds sequences back to back, sequence b in rows
        cu_seqlens[b]:cu_seqlens[b+1] ((B+1,) int offsets), and `qkv.attention_varlen` keeps
        attention within each sequence: causal, window and ALiBi act per sequence exactly as for
        that sequence alone, and positions (T,) restart at 0 in each (the default). Cross-
        attention then takes a packed context (Tk, d_model) with context_cu_seqlens: query
        sequence b attends to context sequence b. Packed rows have no padding and no cache.
        """
        c = self.config
        packed = cu_seqlens is not None
        if x.dim() != (2 if packed else 3) or x.shape[-1] != c.d_model:
            want = f"(T, {c.d_model}) with cu_seqlens" if packed else f"(B, L, {c.d_model})"
            raise ValueError(f"x must be {want}, got {tuple(x.shape)}")
        if packed:
            _check_packed(c.cross, context, kv_lengths, key_padding_mask, cache,
                          context_cu_seqlens)
            if positions is None and self.rope is not None:
                positions = positions_from_cu_seqlens(cu_seqlens, x.shape[0])
        elif context_cu_seqlens is not None:
            raise ValueError("context_cu_seqlens describes a packed context; give cu_seqlens too")
        q, k, v, kv_lengths = self._project(x, context, positions, cache, layer_idx, kv_lengths)
        window = None
        if c.window is not None:
            window = (c.window, 0) if causal else (c.window, c.window)
        mask = None if packed else _key_mask(key_padding_mask, x.shape[0], k.shape[2])
        if not packed:
            k, v, mask, causal, window = _seen_keys(k, v, mask, q.shape[2], causal, window,
                                                    kv_lengths)
        slopes = self.alibi_slopes
        if slopes is not None and q.dtype == torch.float64:
            slopes = slopes.double()
        settings = dict(causal=causal, window=window, alibi_slopes=slopes, softcap=c.softcap,
                        scale=c.scale, dropout_p=c.attn_dropout if self.training else 0.0,
                        backend=backend or c.backend)
        if packed:
            cu_k = context_cu_seqlens if c.cross else cu_seqlens
            y = qkv.attention_varlen(q, k, v, cu_seqlens, cu_k, **settings)  # (T, Hq, D)
        else:
            y = qkv.attention(q, k, v, kv_lengths=kv_lengths, mask=mask, **settings)
            y = y.transpose(1, 2)  # (B, L, Hq, D)
        return self.dropout(self.out_proj(y.flatten(-2)))  # (B, L, d_model) or (T, d_model)

    def _project(self, x, context, positions, cache, layer_idx, kv_lengths):
        """q (B, Hq, L, D), k and v (B, Hk, Lk, D) (with the cache's keys), and the keys'
        lengths; packed: q (T, Hq, D), k and v (Tk, Hk, D)."""
        if self.config.cross:
            q = self._heads(self.q_proj(x), self.n_heads)
            if cache is not None and cache.has(layer_idx):
                k, v = cache.get(layer_idx)
            else:
                if context is None:
                    raise ValueError("cross-attention needs a context (B, Lk, d_model)")
                k, v = self.project_kv(context)
                if cache is not None:
                    cache.set(layer_idx, k, v)
            return q, k, v, kv_lengths
        if context is not None:
            raise ValueError("self-attention takes no context; build it with cross=True")
        Hq, Hk = self.n_heads, self.n_kv_heads
        qk, v = self.qkv_proj(x).split(((Hq + Hk) * self.head_dim, Hk * self.head_dim), dim=-1)
        qk, v = self._heads(qk, Hq + Hk), self._heads(v, Hk)  # heads in dim 1, packed or not
        if self.rope is not None:  # q's and k's heads rotated in one call
            if positions is None:
                B, L, _ = x.shape
                positions = torch.arange(L, device=x.device).expand(B, L)
            qk = self.rope(qk, positions)
        q, k = qk.split((Hq, Hk), dim=1)
        if cache is not None:
            k, v, cached_lengths = cache.update(layer_idx, k, v)  # (B, Hk, Lk, D)
            if cached_lengths is not None:
                kv_lengths = cached_lengths if kv_lengths is None else \
                    torch.minimum(kv_lengths, cached_lengths)
        return q, k, v, kv_lengths


def _seen_keys(k, v, mask, Lq: int, causal: bool, window, kv_lengths):
    """The same attention with less to read: (k, v, mask, causal, window).

    Visibility is aligned bottom-right (query i stands at key i + Lk - Lq), so no query sees
    a key before Lk - Lq - window[0]: those are dropped (distances from the end, and so ALiBi,
    stay the same). A single query (a decoding step) then sees every key left: causal and
    window are dropped, so the backend needs no mask built over the whole cache.
    """
    start = 0
    if window is not None and window[0] is not None:
        start = k.shape[2] - Lq - window[0]
    if start > 0 and kv_lengths is not None:  # lengths count from the first key: keep them all
        return k, v, mask, causal and Lq > 1, window
    if start > 0:
        k, v = k[:, :, start:], v[:, :, start:]
        mask = mask[..., start:] if mask is not None else None
    if Lq == 1:
        return k, v, mask, False, None
    return k, v, mask, causal, window


def _key_mask(key_padding_mask, B: int, Lk: int) -> torch.Tensor | None:
    """key_padding_mask (B, Lk) -> the bool mask (B, 1, 1, Lk) qkv.attention takes."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (B, Lk):
        raise ValueError(f"key_padding_mask must be (B, Lk) = {(B, Lk)}, "
                         f"got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.bool()[:, None, None, :]


def _check_packed(cross, context, kv_lengths, key_padding_mask, cache, context_cu_seqlens):
    """Packed rows take no padding and no cache; packed cross-attention a packed context."""
    check_unpadded(kv_lengths=kv_lengths, cache=cache, key_padding_mask=key_padding_mask)
    if not cross:
        if context_cu_seqlens is not None:
            raise ValueError("context_cu_seqlens is for cross-attention")
        return
    if context is None or context.dim() != 2 or context_cu_seqlens is None:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else None
        raise ValueError("packed cross-attention needs a packed context (Tk, d_model) and its "
                         f"context_cu_seqlens, got context {got}")
