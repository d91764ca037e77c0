"""The validated form of one attention call, shared by every backend.

`check_call` turns the public keywords into an `AttentionCall`: shapes are checked once, masks
are brought to four dimensions, and every backend reads the same normalised description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionCall:
    """Everything a backend needs to know about one call, validated.

    Shapes: q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv).
    `q_offset` (B,) int64 is the bottom-right shift i' = i + q_offset[b]; for the padded form it is
    Lk - Lq for every b, for packed sequences it is each sequence's own lk - lq.
    """

    B: int
    Hq: int
    Hk: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    scale: float
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    kv_lengths: torch.Tensor | None = None  # (B,) int64
    q_offset: torch.Tensor | None = None  # (B,) int64, None means Lk - Lq everywhere
    mask: torch.Tensor | None = None  # bool, 4-D, broadcastable to (B, Hq, Lq, Lk)
    bias: torch.Tensor | None = None  # float, 4-D, broadcastable to (B, Hq, Lq, Lk)
    alibi_slopes: torch.Tensor | None = None  # (B, Hq) float
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int | None = None
    return_lse: bool = False
    varlen: bool = False

    @property
    def groups(self) -> int:
        """Query heads per K/V head."""
        return self.Hq // self.Hk

    def offset_range(self) -> tuple[int, int]:
        """Smallest and largest bottom-right shift over the batch."""
        if self.q_offset is None:
            return self.Lk - self.Lq, self.Lk - self.Lq
        return int(self.q_offset.min()), int(self.q_offset.max())

    @property
    def needs_dropout(self) -> bool:
        return self.dropout_p > 0.0

    def features(self) -> set[str]:
        """Names of the optional features this call uses (for backend support checks)."""
        names = {
            "causal": self.causal,
            "window": self.window is not None,
            "kv_lengths": self.kv_lengths is not None,
            "mask": self.mask is not None,
            "bias": self.bias is not None,
            "alibi_slopes": self.alibi_slopes is not None,
            "softcap": self.softcap is not None,
            "dropout_p": self.dropout_p > 0.0,
            "return_lse": self.return_lse,
            "varlen": self.varlen,
            "bias_grad": self.bias is not None and self.bias.requires_grad,
        }
        return {name for name, used in names.items() if used}


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _as_4d(name: str, t: torch.Tensor, target: tuple[int, int, int, int]) -> torch.Tensor:
    """View `t` with four dimensions and check that it broadcasts to `target`."""
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dimensions, got shape {_shape(t)}")
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    for got, want in zip(t4.shape, target, strict=True):
        if got not in (1, want):
            raise ValueError(
                f"{name} of shape {_shape(t)} does not broadcast to (B, Hq, Lq, Lk) = {target}"
            )
    return t4


def _check_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}, q is on {q.device}")


def _window(window) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window, strict=True):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"window {side} must be a non-negative int or None, got {w!r}")
        out.append(int(w))
    if out == [None, None]:
        return None
    return (out[0], out[1])


def check_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window=None,
    kv_lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    q_offset: torch.Tensor | None = None,
    varlen: bool = False,
) -> AttentionCall:
    """Validate the arguments of `qkv.attention`; raise ValueError naming what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, L, D), got {t.dim()}-D tensor of shape {_shape(t)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(
            f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if Dk != D:
        raise ValueError(f"k head dim must equal q's: q {_shape(q)}, k {_shape(k)}")
    if (Hv, Lv) != (Hk, Lk):
        raise ValueError(f"k and v must agree in heads and length: k {_shape(k)}, v {_shape(v)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(
            f"q heads must be a multiple of k/v heads, got Hq={Hq} (q {_shape(q)}) "
            f"and Hk={Hk} (k {_shape(k)})"
        )
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims must be positive: q {_shape(q)}, v {_shape(v)}")

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if softcap is not None and (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not math.isfinite(softcap)
        or softcap <= 0
    ):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (
        0.0 <= dropout_p < 1.0
    ):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")

    target = (B, Hq, Lq, Lk)
    if kv_lengths is not None:
        if not isinstance(kv_lengths, torch.Tensor) or kv_lengths.shape != (B,):
            got = _shape(kv_lengths) if isinstance(kv_lengths, torch.Tensor) else repr(kv_lengths)
            raise ValueError(f"kv_lengths must be a ({B},) integer tensor, got {got}")
        if kv_lengths.dtype.is_floating_point or kv_lengths.dtype == torch.bool:
            raise ValueError(f"kv_lengths must be an integer tensor, got {kv_lengths.dtype}")
        _check_device("kv_lengths", kv_lengths, q)
        if B and (int(kv_lengths.min()) < 0 or int(kv_lengths.max()) > Lk):
            raise ValueError(
                f"kv_lengths must lie in [0, Lk={Lk}], got {kv_lengths.tolist()}"
            )
        kv_lengths = kv_lengths.to(torch.int64)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor (True = may attend), got {got}")
        _check_device("mask", mask, q)
        mask = _as_4d("mask", mask, target)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a floating-point tensor, got {got}")
        _check_device("bias", bias, q)
        bias = _as_4d("bias", bias, target)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.dtype.is_floating_point:
            got = (alibi_slopes.dtype if isinstance(alibi_slopes, torch.Tensor)
                   else type(alibi_slopes).__name__)
            raise ValueError(
                f"alibi_slopes must be a floating-point tensor of shape (Hq,) or (B, Hq), got {got}"
            )
        if alibi_slopes.shape == (Hq,):
            alibi_slopes = alibi_slopes.unsqueeze(0).expand(B, Hq)
        elif alibi_slopes.shape != (B, Hq):
            raise ValueError(
                f"alibi_slopes must have shape (Hq,)=({Hq},) or (B, Hq)=({B}, {Hq}), "
                f"got {_shape(alibi_slopes)}"
            )
        _check_device("alibi_slopes", alibi_slopes, q)
    seed = None
    if dropout_p > 0:
        # Drawn from torch's default generator: the same torch.manual_seed gives the same mask.
        seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    return AttentionCall(
        B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, scale=float(scale), causal=causal,
        window=_window(window), kv_lengths=kv_lengths, q_offset=q_offset, mask=mask, bias=bias,
        alibi_slopes=alibi_slopes, softcap=None if softcap is None else float(softcap),
        dropout_p=float(dropout_p), dropout_seed=seed, return_lse=return_lse, varlen=varlen,
    )
