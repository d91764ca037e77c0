"""The public functions `attention` and `attention_weights` (`attention_varlen` is in varlen.py)."""

from __future__ import annotations

import torch

from qkv.attention import reference
from qkv.attention import registry as _registry
from qkv.attention.op import attention_op
from qkv.attention.spec import AttentionCall, Keywords, check_call, takes_keywords


def finish(out, lse, call: AttentionCall, q: torch.Tensor):
    """out alone, or (out, lse) with lse float32 (float64 for float64 q) when the call asks."""
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
    Under torch.compile the call is one custom op, `torch.ops.qkv.attention_forward` (op.py), so
    it never breaks the graph (fullgraph=True and dynamic shapes work); eager calls skip the op.

    Raises ValueError for shapes, dtypes or devices that do not fit (the message names the
    argument and the shapes), and NotImplementedError when an explicitly chosen backend lacks a
    feature the call uses. `backend="auto"` picks the fastest backend that supports the call.
    """
    call = check_call(q, k, v, **keywords)
    chosen = _registry.choose(call, q, keywords.get("backend", Keywords.backend))
    if torch.compiler.is_compiling():  # traced: one custom op (op.py); eager skips its cost
        out, lse = attention_op(q, k, v, call, chosen.name)
    else:
        out, lse = chosen.forward(q, k, v, call)
    return finish(out, lse, call, q)


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
