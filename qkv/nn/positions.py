"""Position information: absolute embeddings, rotary embeddings (RoPE) and ALiBi slopes.

Positions are absolute token indices (B, L) that left padding does not count toward: the first
real token of every row is position 0. Models compute them from the padding mask, and caches keep
them across decoding steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from qkv.attention.varlen import check_cu_seqlens, sequence_positions
from qkv.nn.config import check_choice, check_float, check_int


def positions_from_mask(mask: torch.Tensor | None, B: int, L: int, device,
                        offset: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) absolute positions: count of real tokens before each one (+ offset (B,)).

    `mask` (B, L) is True (or 1) for real tokens; padding gets the position of the next real
    token (0 for left padding), which is harmless because nothing attends to it.
    """
    if mask is None:
        pos = torch.arange(L, device=device).expand(B, L)
    else:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if offset is not None:
        pos = pos + offset[:, None]
    return pos


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) positions of packed sequences: 0, 1, ... restarting at every sequence.

    cu_seqlens (B+1,) int32/int64 offsets: sequence b is rows cu_seqlens[b]:cu_seqlens[b+1],
    starting at 0 and ending at `total`. Raises ValueError naming cu_seqlens for anything else.
    Under torch.compile they are computed by tensor ops, without reading the offsets.
    """
    return sequence_positions(check_cu_seqlens("cu_seqlens", cu_seqlens, total), total)[1]


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """(n_positions, dim) table of Vaswani et al.: sin on even channels, cos on odd ones."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table.float()


class ExactBuffers(nn.Module):
    """A module whose `_exact_buffers` keep their dtype when the module is cast (`.to(dtype)`,
    `.half()`, `.bfloat16()`): they follow device moves only. Angles of rotary embeddings, the
    sinusoidal table and ALiBi slopes are multiplied by positions in the thousands, where a
    bfloat16 frequency or slope would be off by whole radians (logits)."""

    _exact_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self._exact_buffers
                if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self


def _check_positions(positions: torch.Tensor, max_len: int) -> None:
    if torch.compiler.is_compiling():  # a value check would break the compiled graph
        return
    if positions.numel() and int(positions.max()) >= max_len:
        raise ValueError(
            f"position {int(positions.max())} is past max_len={max_len} of the position table"
        )


class SinusoidalPositions(ExactBuffers):
    """Fixed sinusoidal embeddings looked up at absolute positions; not saved in state dicts.
    The table stays float32 under casts; the caller casts what it looks up."""

    _exact_buffers = ("table",)

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        _check_positions(positions, self.max_len)
        return self.table[positions]  # (B, L, dim)


class LearnedPositions(nn.Module):
    """A learned (max_len, dim) table looked up at absolute positions."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        _check_positions(positions, self.max_len)
        return self.weight[positions]  # (B, L, dim)


ROPE_SCALINGS = (None, "linear", "ntk")


class RotaryEmbedding(ExactBuffers):
    """RoPE in the half-split (GPT-NeoX / LLaMA) layout, applied at absolute positions.

    Channel pairs (i, i + D/2) are rotated by angle pos * base**(-2i/D). Scaling stretches the
    usable context by `factor`: "linear" divides positions by it (position interpolation), "ntk"
    raises the base to base * factor**(D / (D - 2)). The angles are computed in float64 from
    float64 frequencies, whatever the module is cast to.
    """

    _exact_buffers = ("inv_freq",)

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: str | None = None,
                 factor: float = 1.0):
        super().__init__()
        check_int("head_dim", head_dim, minimum=2)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        check_float("rope_base", base, low=1.0, low_open=True)
        check_choice("rope_scaling", scaling, ROPE_SCALINGS)
        check_float("rope_factor", factor, low=1.0)
        self.scaling, self.factor = scaling, float(factor)
        if scaling == "ntk":
            base = base * factor ** (head_dim / (head_dim - 2))
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)  # (D/2,) float64

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, L, D) at positions (B, L), or packed rows x (T, H, D) at (T,)."""
        pos = positions.to(torch.float64)
        if self.scaling == "linear":
            pos = pos / self.factor
        angle = (pos[..., None] * self.inv_freq)[:, None]  # (B, 1, L, D/2) or (T, 1, D/2)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = angle.cos().to(work), angle.sin().to(work)
        x1, x2 = x.to(work).chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """(n_heads,) ALiBi slopes: 2**(-8i/n) for a power of two n, else interpolated (Press et al.).

    For other n, take the slopes of the closest smaller power of two p, then every other slope of
    2p until there are n.
    """
    check_int("n_heads", n_heads)

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(p)
    if p < n_heads:
        slopes += power_of_two(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)
