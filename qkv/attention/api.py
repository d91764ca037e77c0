"""The public functions: `attention`, `attention_varlen`, `attention_weights`."""

from __future__ import annotations

import torch

from qkv.attention import reference
from qkv.attention import registry as _registry
from qkv.attention.spec import PER_PAIR, AttentionCall, Keywords, check_call, takes_keywords


def _finish(out, lse, call: AttentionCall, q: torch.Tensor):
    if not call.return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, lse.to(lse_dtype)


@takes_keywords("q", "k", "v")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **keywords):
    """Exact scaled dot-product attention, the same on every backend.

    Shapes (torch SDPA's layout): q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), with Hq a
    multiple of Hk (grouped-query; K/V heads are shared, never copied). Returns out (B, Hq, Lq, Dv)
    in q's dtype, and with `return_lse` also lse (B, Hq, Lq): float32 (float64 for float64 input).

    Equivalent to::

        s = scale * q @ k.T                      # scale defaults to 1/sqrt(D)
        s = softcap * tanh(s / softcap)          # if softcap
        s = s + bias                             # bias broadcastable to (B, Hq, Lq, Lk)
        s = s - slope[h] * |(i + Lk - Lq) - j|   # if alibi_slopes, shape (Hq,) or (B, Hq)
        s[not visible] = -inf
        out = dropout(softmax(s)) @ v            # dropout scales kept weights by 1/(1-p)

    Query i sees key j when every condition given holds:
      causal      j <= i + (Lk - Lq)         (bottom-right aligned: the last query sees all keys;
                                              torch SDPA's is_causal is top-left aligned)
      window      i' - left <= j <= i' + right with i' = i + Lk - Lq; either side may be None
      kv_lengths  j < kv_lengths[b]          (B,) ints: keys past it are padding
      mask        mask[b, h, i, j]           bool, True = may attend, broadcastable to 4-D

    A query row that sees no key outputs zeros, has lse -inf and passes no gradient; never NaN.
    Dropout uses a counter-based mask seeded from torch's default generator, so the same
    torch.manual_seed gives the same result on every backend that supports dropout.
    Gradients flow to q, k, v and to a floating-point bias that requires grad.

    Raises ValueError for shapes, dtypes or devices that do not fit (the message names the
    argument and the shapes), and NotImplementedError when an explicitly chosen backend lacks a
    feature the call uses. `backend="auto"` picks the fastest backend that supports the call.
    """
    call = check_call(q, k, v, **keywords)
    chosen = _registry.choose(call, q, keywords.get("backend", Keywords.backend))
    out, lse = chosen.forward(q, k, v, call)
    return _finish(out, lse, call, q)


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        got = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D (B+1,) int32 or int64 tensor, got {got}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, q is on {device}")
    c = cu.to(torch.int64)
    if int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any()):
        raise ValueError(
            f"{name} must start at 0, never decrease and end at the packed length {total}, "
            f"got {cu.tolist()}"
        )
    return c


def _pad_index(cu: torch.Tensor):
    """For packed rows: (sequence index, position inside the sequence), and the longest length."""
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    pos = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq]
    return seq, pos, lengths, int(lengths.max()) if lengths.numel() else 0


def _pad(x: torch.Tensor, seq, pos, B: int, L: int) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, L, D) zero-padded."""
    padded = x.new_zeros(B, L, x.shape[1], x.shape[2])
    padded = padded.index_put((seq, pos), x)
    return padded.transpose(1, 2)


@takes_keywords("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", exclude=PER_PAIR)
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, **keywords):
    """`attention` over packed sequences: each sequence attends only within itself.

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); cu_seqlens_q and cu_seqlens_k are
    (B+1,) int32 or int64 cumulative offsets, so sequence b holds rows cu[b]:cu[b+1]. Causal and
    window are aligned bottom-right per sequence (with that sequence's own lq and lk). Returns out
    (total_q, Hq, Dv), and with `return_lse` also lse (total_q, Hq).

    Per-pair `mask`, `bias` and `kv_lengths` have no meaning for packed rows and are not accepted.
    Dropout draws the mask of the padded batch (b, h, i, j) with i, j positions inside sequence b.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be 3-D (total, H, D) for attention_varlen, got {got}")
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cq.numel() != ck.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cq.numel() - 1} and {ck.numel() - 1}"
        )
    B = cq.numel() - 1
    seq_q, pos_q, len_q, Lq = _pad_index(cq)
    seq_k, pos_k, len_k, Lk = _pad_index(ck)
    qp = _pad(q, seq_q, pos_q, B, Lq)
    kp, vp = _pad(k, seq_k, pos_k, B, Lk), _pad(v, seq_k, pos_k, B, Lk)
    call = check_call(qp, kp, vp, kv_lengths=len_k, q_offset=len_k - len_q, varlen=True,
                      **keywords)
    chosen = _registry.choose(call, qp, keywords.get("backend", Keywords.backend))
    if chosen.forward_varlen is not None:
        out, lse = chosen.forward_varlen(q, k, v, cq.to(torch.int32), ck.to(torch.int32), call)
    else:
        out, lse = chosen.forward(qp, kp, vp, call)
        out = out.transpose(1, 2)[seq_q, pos_q]  # (total_q, Hq, Dv)
        if lse is not None:
            lse = lse.transpose(1, 2)[seq_q, pos_q]  # (total_q, Hq)
    return _finish(out, lse, call, q)


@takes_keywords("q", "k", exclude=("dropout_p", "return_lse", "backend"))
def attention_weights(q: torch.Tensor, k: torch.Tensor, **keywords) -> torch.Tensor:
    """The attention weights softmax(s) (B, Hq, Lq, Lk), before dropout, from the reference.

    Takes the keywords of `attention` that shape the scores (causal, window, kv_lengths, mask,
    bias, alibi_slopes, softcap, scale). Memory is quadratic: this is for inspection.
    """
    # A (B, Hk, Lk, 1) view of k stands in for v, so check_call reports k's own shape errors.
    v = k[..., :1] if isinstance(k, torch.Tensor) and k.dim() > 0 else k
    call = check_call(q, k, v, **keywords)
    return reference.attention_weights(q, k, call)
