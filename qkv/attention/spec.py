"""The validated form of one attention call, shared by every backend.

`Keywords` names the public keywords of `qkv.attention` and their defaults, once; the public
functions take their signatures from it. `check_call` turns the keywords into an
`AttentionCall`, one small check per argument: shapes are checked once, masks are brought to
four dimensions, and every backend reads the same normalised description.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, fields

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Keywords:
    """The keywords of `qkv.attention` and their defaults: the one place they are defined."""

    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    kv_lengths: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float | None = None
    scale: float | None = None
    dropout_p: float = 0.0
    return_lse: bool = False
    backend: str = "auto"


PER_PAIR = ("kv_lengths", "mask", "bias")  # no meaning for packed rows (attention_varlen)


def takes_keywords(*positional: str, exclude: tuple[str, ...] = ()):
    """Decorator for fn(*positional, **keywords) taking the keywords of `Keywords` but `exclude`.

    help(), inspect.signature and IDEs that read it show every keyword with its default and
    type; an unknown keyword raises TypeError as for an explicit signature.
    """
    allowed = [f for f in fields(Keywords) if f.name not in exclude]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation="torch.Tensor") for n in positional]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for f in allowed]
    names = frozenset(positional) | {f.name for f in allowed}

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **keywords):
            unknown = keywords.keys() - names
            if unknown:
                raise TypeError(
                    f"{fn.__name__}() got an unexpected keyword argument {min(unknown)!r}")
            return fn(*args, **keywords)

        wrapper.__signature__ = inspect.Signature(params)
        return wrapper

    return decorate


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
    dropout_seed: int | torch.Tensor | None = None  # a 0-dim int64 tensor while traced
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


def _on_device(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device}, q is on {q.device}")


def _check_qkv(q, k, v) -> None:
    """Each of q, k, v a 4-D float tensor; one dtype and one device for all three."""
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


def _check_shapes(q, k, v) -> None:
    """q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), Hq a multiple of Hk."""
    B, Hq, _, D = q.shape
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


def _is_number(x) -> bool:
    # Comparisons, not math.isfinite: torch.compile traces them on symbolic floats too.
    return not isinstance(x, bool) and isinstance(x, (int, float)) and -math.inf < x < math.inf


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if not _is_number(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if not _is_number(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    return float(softcap)


def _dropout_p(p) -> float:
    if not _is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    return float(p)


def _window(window) -> tuple[int | None, int | None] | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    for side, w in zip(("left", "right"), window, strict=True):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"window {side} must be a non-negative int or None, got {w!r}")
    left, right = window
    return None if left is None and right is None else (left, right)


def _kv_lengths(kv_lengths, B: int, Lk: int, q: torch.Tensor) -> torch.Tensor | None:
    """(B,) integers in [0, Lk], as int64."""
    if kv_lengths is None:
        return None
    if not isinstance(kv_lengths, torch.Tensor) or kv_lengths.shape != (B,):
        got = _shape(kv_lengths) if isinstance(kv_lengths, torch.Tensor) else repr(kv_lengths)
        raise ValueError(f"kv_lengths must be a ({B},) integer tensor, got {got}")
    if kv_lengths.dtype.is_floating_point or kv_lengths.dtype == torch.bool:
        raise ValueError(f"kv_lengths must be an integer tensor, got {kv_lengths.dtype}")
    _on_device("kv_lengths", kv_lengths, q)
    if not torch.compiler.is_compiling():  # traced: the op checks the values (op.py)
        check_kv_lengths_range(kv_lengths, Lk)
    return kv_lengths.to(torch.int64)


def check_kv_lengths_range(kv_lengths: torch.Tensor, Lk: int) -> None:
    """ValueError unless every kv_length lies in [0, Lk]."""
    if kv_lengths.numel() and (int(kv_lengths.min()) < 0 or int(kv_lengths.max()) > Lk):
        raise ValueError(f"kv_lengths must lie in [0, Lk={Lk}], got {kv_lengths.tolist()}")


def _broadcastable(name: str, t, kind: str, target: tuple[int, int, int, int],
                   q: torch.Tensor) -> torch.Tensor | None:
    """A mask ("bool") or bias ("float") tensor on q's device that broadcasts to `target`
    (B, Hq, Lq, Lk), viewed with four dimensions."""
    if t is None:
        return None
    wanted = {"bool": "a bool tensor (True = may attend)", "float": "a floating-point tensor"}
    ok = isinstance(t, torch.Tensor) and (
        t.dtype == torch.bool if kind == "bool" else t.dtype.is_floating_point)
    if not ok:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be {wanted[kind]}, got {got}")
    _on_device(name, t, q)
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dimensions, got shape {_shape(t)}")
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    for got, want in zip(t4.shape, target, strict=True):
        if got not in (1, want):
            raise ValueError(
                f"{name} of shape {_shape(t)} does not broadcast to (B, Hq, Lq, Lk) = {target}"
            )
    return t4


def _alibi_slopes(slopes, B: int, Hq: int, q: torch.Tensor) -> torch.Tensor | None:
    """(Hq,) or (B, Hq) floats, as (B, Hq)."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor) or not slopes.dtype.is_floating_point:
        got = slopes.dtype if isinstance(slopes, torch.Tensor) else type(slopes).__name__
        raise ValueError(
            f"alibi_slopes must be a floating-point tensor of shape (Hq,) or (B, Hq), got {got}"
        )
    if slopes.shape == (Hq,):
        slopes = slopes.unsqueeze(0).expand(B, Hq)
    elif slopes.shape != (B, Hq):
        raise ValueError(
            f"alibi_slopes must have shape (Hq,)=({Hq},) or (B, Hq)=({B}, {Hq}), "
            f"got {_shape(slopes)}"
        )
    _on_device("alibi_slopes", slopes, q)
    return slopes


def check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               q_offset: torch.Tensor | None = None, varlen: bool = False,
               **keywords) -> AttentionCall:
    """Validate q, k, v and the keywords of `qkv.attention` (`Keywords`; `backend` is not
    looked at); raise ValueError naming what is wrong."""
    kw = Keywords(**keywords)
    _check_qkv(q, k, v)
    _check_shapes(q, k, v)
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    target = (B, Hq, Lq, Lk)
    checked = dict(
        scale=_scale(kw.scale, D), softcap=_softcap(kw.softcap),
        dropout_p=_dropout_p(kw.dropout_p), causal=_check_bool("causal", kw.causal),
        return_lse=_check_bool("return_lse", kw.return_lse), window=_window(kw.window),
        kv_lengths=_kv_lengths(kw.kv_lengths, B, Lk, q),
        mask=_broadcastable("mask", kw.mask, "bool", target, q),
        bias=_broadcastable("bias", kw.bias, "float", target, q),
        alibi_slopes=_alibi_slopes(kw.alibi_slopes, B, Hq, q),
    )
    seed = None
    if checked["dropout_p"] > 0:
        # Drawn from torch's default generator: the same torch.manual_seed gives the same mask.
        # Traced, it stays a tensor (an int would break the graph); the op reads it.
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        seed = seed if torch.compiler.is_compiling() else int(seed)
    return AttentionCall(B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, q_offset=q_offset,
                         dropout_seed=seed, varlen=varlen, **checked)
