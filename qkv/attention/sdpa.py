"""The sdpa backend: torch's `scaled_dot_product_attention` for the calls it can express.

qkv's causal mask is aligned bottom-right; torch's `is_causal` is aligned top-left. The two agree
only when Lq == Lk, so every other visibility rule (bottom-right causal with Lq != Lk, window,
kv_lengths, bool mask, packed sequences) is passed to torch as an explicit mask built by the
shared helper in `masking.py`, as an additive float mask to which bias and ALiBi are added.
Rows that see no key are given one harmless key and then zeroed, because torch would return NaN
there. The mask keeps the smallest shape its inputs need (`explicit_mask`): with a per-head copy
of a (B, 1, Lq, Lk) mask torch's CPU kernel runs about twice as slow.

Not expressible through torch's public function: softcap, return_lse, and qkv's
counter-based dropout mask (torch draws its own), so those raise NotImplementedError.

Precision: torch's kernels compute the backward's delta as rowsum(dO * O). Where a row's weights
are one-hot or tied and the scores large, float32 gradients of q and k then lose about
1e-7·|max score| relative to the gradients (2e-2 at scale 1e3 on q = k = v of D = 64), where
plain autograd and the chunked backend stay near 1e-7 (tests/attention/test_precision.py).
`auto` cannot see this before computing the scores, so it keeps sdpa for such calls; choose
backend="chunked" when training with scores in the hundreds or more.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from qkv.attention.masking import modify_scores, visible
from qkv.attention.spec import AttentionCall

UNSUPPORTED = {
    "softcap": "torch SDPA has no softcap",
    "return_lse": "torch SDPA's public function does not return the logsumexp",
    "dropout_p": "torch SDPA draws its own dropout mask, not qkv's reproducible one",
}

# Largest Lq * Lk for which `auto` lets torch SDPA take, on the CPU, a call whose visibility is a
# band (bottom-right causal, window, kv_lengths, offsets) or that has ALiBi. Beyond it chunked
# wins (benchmarks/RESULTS.md, "auto on the CPU", 2026-11-30): it cuts the band into pieces of
# the same fused kernel torch runs, where torch must first build the (Lq x Lk) mask. Below it
# (short padded batches, short prompts) the pieces' per-call overhead loses, and decoding
# (Lq = 1) is one kernel call either way.
CPU_SDPA_MASKED_MAX_SCORES = 512 * 512


def prefers(call: AttentionCall, q: torch.Tensor) -> bool:
    """Whether `auto` should hand this call to torch SDPA rather than the next backend."""
    if q.dtype == torch.float64:  # torch runs float64 on its O(n^2) math path
        return False
    if q.device.type != "cpu":
        return True
    if call.bias is not None or call.mask is not None:
        return True  # chunked runs these in its Python blocks: slower at every size measured
    band = needs_explicit_mask(call) or call.alibi_slopes is not None
    return not band or call.Lq * call.Lk <= CPU_SDPA_MASKED_MAX_SCORES or call.Lq == 1


def needs_explicit_mask(call: AttentionCall) -> bool:
    """Whether torch needs a mask for the call's visibility (all but none, square causal, and
    causal with one query, which sees every key: a decoding step)."""
    trivial_causal = call.Lq == 1 and call.q_offset is None
    return (
        (call.causal and not torch_is_causal(call) and not trivial_causal)
        or call.window is not None
        or call.kv_lengths is not None
        or call.mask is not None
        or call.q_offset is not None
    )


def torch_is_causal(call: AttentionCall) -> bool:
    """torch's top-left `is_causal` for the call: qkv's bottom-right causal only when square."""
    return call.causal and call.Lq == call.Lk and call.q_offset is None


def _alibi_call(call: AttentionCall) -> AttentionCall:
    """The call with batch 1 when every batch row shares the ALiBi slopes and the alignment,
    so the ALiBi term is built once, (1, Hq, Lq, Lk), rather than once per batch row."""
    slopes = call.alibi_slopes
    shared = slopes is not None and call.q_offset is None and call.B > 1 and slopes.stride(0) == 0
    return dataclasses.replace(call, B=1, alibi_slopes=slopes[:1]) if shared else call


def explicit_mask(call: AttentionCall, q: torch.Tensor) -> torch.Tensor | None:
    """The additive mask torch is given, in q's dtype with -inf where a pair is hidden, or None
    when `is_causal` (or nothing) expresses the call.

    It keeps the smallest shape that broadcasts to (B, Hq, Lq, Lk): heads only for a per-head
    mask, bias or ALiBi; batch only for kv_lengths, per-batch offsets, or a per-batch mask or
    bias. torch's kernels broadcast it, where a per-head copy would make torch read Hq masks.
    Given as floats, not bools, torch need not convert it. Always a new tensor of this call's.
    """
    additive = call.bias is not None or call.alibi_slopes is not None
    # An additive mask switches off torch's is_causal, so causal must then be explicit too.
    explicit = needs_explicit_mask(call) or (call.causal and additive)
    vis = visible(call, 0, call.Lq, 0, call.Lk, q.device) if explicit else None
    if not additive:
        if vis is None:
            return None
        hidden = torch.full(vis.shape, float("-inf"), dtype=q.dtype, device=q.device)
        return hidden.masked_fill_(vis, 0.0)
    zero = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device)
    scores, _ = modify_scores(_alibi_call(call), zero, 0, call.Lq, 0, call.Lk)
    scores = scores.to(q.dtype)
    return scores if vis is None else torch.where(vis, scores, float("-inf"))


def _see_one_key(attn_mask: torch.Tensor) -> torch.Tensor | None:
    """Let rows that see no key see key 0, in place, so torch stays finite. Returns those rows
    (broadcastable to (B, Hq, Lq, 1)), to be zeroed afterwards, or None if there are none.
    Found on the mask as it is, before any broadcast."""
    with torch.no_grad():
        empty = attn_mask.amax(dim=-1, keepdim=True) == float("-inf")
        if not bool(empty.any()):
            return None
    attn_mask[..., :1].masked_fill_(empty, 0.0)
    return empty


def forward(q, k, v, call: AttentionCall):
    """Returns (out, None): torch SDPA gives no lse."""
    if call.Lk == 0:
        # No keys, so every row is empty: zeros, still attached to the graph. The empty K/V
        # heads are repeated for free.
        k, v = k.repeat_interleave(call.groups, 1), v.repeat_interleave(call.groups, 1)
        return (q @ k.transpose(-1, -2)) @ v, None
    attn_mask = explicit_mask(call, q)
    empty = None if attn_mask is None else _see_one_key(attn_mask)
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=attn_mask,
        is_causal=torch_is_causal(call) and attn_mask is None,
        scale=call.scale,
        # K/V heads as they are: torch's CPU flash kernel and its math path take GQA.
        enable_gqa=call.Hq != call.Hk,
    )
    if empty is None:
        return out, None
    if out.requires_grad:  # the where sends no gradient into the empty rows
        return torch.where(empty, 0.0, out), None
    return out.masked_fill_(empty, 0.0), None
