"""The sdpa backend: torch's `scaled_dot_product_attention` for the calls it can express.

qkv's causal mask is aligned bottom-right; torch's `is_causal` is aligned top-left. The two agree
only when Lq == Lk, so every other visibility rule (bottom-right causal with Lq != Lk, window,
kv_lengths, bool mask, packed sequences) is passed to torch as an explicit mask built by the
shared helper in `masking.py`. Bias and ALiBi become an additive float mask. Rows that see no key
are given one harmless key and then zeroed, because torch would return NaN there.

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

import torch
import torch.nn.functional as F

from qkv.attention.masking import modify_scores, visible
from qkv.attention.spec import AttentionCall

UNSUPPORTED = {
    "softcap": "torch SDPA has no softcap",
    "return_lse": "torch SDPA's public function does not return the logsumexp",
    "dropout_p": "torch SDPA draws its own dropout mask, not qkv's reproducible one",
}

# Largest Lq * Lk for which `auto` lets torch SDPA take a call that needs an explicit mask on
# the CPU. Measured (benchmarks/RESULTS.md, "auto policy"): with a materialised mask SDPA wins
# up to about 512 x 512 (decode over any cache, padded batches of short sentences); beyond
# that chunked wins, since it skips masked blocks and never builds the (Lq x Lk) mask.
CPU_SDPA_MASKED_MAX_SCORES = 512 * 512


def prefers(call: AttentionCall, q: torch.Tensor) -> bool:
    """Whether `auto` should hand this call to torch SDPA rather than the next backend."""
    if q.dtype == torch.float64:  # torch runs float64 on its O(n^2) math path
        return False
    if q.device.type != "cpu":
        return True
    masked = needs_explicit_mask(call) or call.bias is not None or (
        call.alibi_slopes is not None)
    return not masked or call.Lq * call.Lk <= CPU_SDPA_MASKED_MAX_SCORES or call.Lq == 1


def needs_explicit_mask(call: AttentionCall) -> bool:
    """Whether torch needs a mask for the call's visibility (all but none and square causal)."""
    square_causal = call.causal and call.Lq == call.Lk and call.q_offset is None
    return (
        (call.causal and not square_causal)
        or call.window is not None
        or call.kv_lengths is not None
        or call.mask is not None
        or call.q_offset is not None
    )


def forward(q, k, v, call: AttentionCall):
    """Returns (out, None): torch SDPA gives no lse."""
    B, Hq, Lq, Lk = call.B, call.Hq, call.Lq, call.Lk
    if Lk == 0:
        # No keys, so every row is empty: zeros, still attached to the graph. The empty K/V
        # heads are repeated for free.
        k, v = k.repeat_interleave(call.groups, 1), v.repeat_interleave(call.groups, 1)
        return (q @ k.transpose(-1, -2)) @ v, None
    additive = call.bias is not None or call.alibi_slopes is not None
    # An additive mask switches off torch's is_causal, so causal must then be explicit too.
    explicit = needs_explicit_mask(call) or (call.causal and additive)
    attn_mask = None
    empty = None
    if explicit or additive:
        vis = visible(call, 0, Lq, 0, Lk, q.device) if explicit else None
        if vis is not None:
            vis = vis.expand(B, Hq, Lq, Lk)
        if additive:
            zero = torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device).expand(B, Hq, Lq, Lk)
            attn_mask, _ = modify_scores(call, zero, 0, Lq, 0, Lk)
            attn_mask = attn_mask.to(q.dtype).expand(B, Hq, Lq, Lk)
            if vis is not None:
                attn_mask = attn_mask.masked_fill(~vis, float("-inf"))
            seen = ~torch.isneginf(attn_mask)
        else:
            attn_mask = vis
            seen = vis
        empty = ~seen.any(dim=-1, keepdim=True)  # (B, Hq, Lq, 1)
        if bool(empty.any()):
            # Let empty rows see key 0 so torch stays finite; their output is zeroed below.
            first = torch.zeros(1, 1, 1, Lk, dtype=torch.bool, device=q.device)
            if Lk:
                first[..., 0] = True
            fix = empty & first
            if attn_mask.dtype == torch.bool:
                attn_mask = attn_mask | fix
            else:
                attn_mask = attn_mask.masked_fill(fix, 0.0)
        else:
            empty = None
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=attn_mask,
        is_causal=call.causal and attn_mask is None,
        scale=call.scale,
        enable_gqa=call.Hq != call.Hk,
    )
    if empty is not None:
        out = torch.where(empty, 0.0, out).to(q.dtype)
    return out, None
