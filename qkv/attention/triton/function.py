"""Launchers for the Triton kernels and the autograd.Function that joins forward and backward.

`Problem` gathers, once per call, what every kernel launch shares: the layout (padded
(B, H, L, D) or packed (total, H, D) with cu_seqlens), the mask tensors with broadcast
strides, and the feature switches. On CUDA each kernel is autotuned over a small config list
keyed on head dim and sequence lengths; under TRITON_INTERPRET=1 (CPU) a fixed config runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from qkv.attention.spec import AttentionCall
from qkv.attention.triton import kernels_bwd, kernels_decode, kernels_fwd
from qkv.attention.triton.launch import FWD_PAIRS, bhl_strides, interpreting, launch, pow2

MAX_HEAD_DIM = 256
# Decode (split-KV) is used when Lq <= DECODE_MAX_LQ, groups * Lq <= DECODE_MAX_ROWS and the
# cache holds at least DECODE_MIN_LK keys.
DECODE_MAX_LQ = 16
DECODE_MAX_ROWS = 64
DECODE_MIN_LK = 1024
def _broadcast_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor with 0 for every size-1 (broadcast) dimension."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride(), strict=True))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class Problem:
    """One call's shapes, layout and kernel arguments shared by every launch."""

    call: AttentionCall
    varlen: bool
    Lq: int  # longest query sequence (padded Lq)
    Lk: int
    args: dict  # pointer / scalar / constexpr arguments common to all kernels
    bias_grad: bool
    dtype: torch.dtype

    @property
    def block_d(self) -> int:
        return pow2(self.call.D)

    @property
    def block_dv(self) -> int:
        return pow2(self.call.Dv)


def make_problem(call: AttentionCall, q: torch.Tensor, cu_seqlens_q=None, cu_seqlens_k=None
                 ) -> Problem:
    """Build the shared kernel arguments for `call` (packed layout when cu_seqlens are given)."""
    dev = q.device
    dummy_i = torch.zeros(2, dtype=torch.int32, device=dev)
    varlen = cu_seqlens_q is not None
    a = dict(CU_Q=dummy_i, CU_K=dummy_i, KVLEN=dummy_i, QOFF=dummy_i,
             BIAS=q, stride_bias_b=0, stride_bias_h=0, stride_bias_m=0, stride_bias_n=0,
             MASK=q, stride_mask_b=0, stride_mask_h=0, stride_mask_m=0, stride_mask_n=0,
             SLOPES=q)
    if varlen:
        a["CU_Q"] = cu_seqlens_q.to(device=dev, dtype=torch.int32).contiguous()
        a["CU_K"] = cu_seqlens_k.to(device=dev, dtype=torch.int32).contiguous()
    has_kvlen = call.kv_lengths is not None and not varlen  # varlen: lengths come from cu_k
    has_qoff = call.q_offset is not None and not varlen
    if has_kvlen:
        a["KVLEN"] = call.kv_lengths.to(device=dev, dtype=torch.int32).contiguous()
    if has_qoff:
        a["QOFF"] = call.q_offset.to(device=dev, dtype=torch.int32).contiguous()
    if call.bias is not None:
        a["BIAS"] = call.bias
        (a["stride_bias_b"], a["stride_bias_h"], a["stride_bias_m"],
         a["stride_bias_n"]) = _broadcast_strides(call.bias)
    if call.mask is not None:
        m = call.mask.view(torch.uint8)
        a["MASK"] = m
        (a["stride_mask_b"], a["stride_mask_h"], a["stride_mask_m"],
         a["stride_mask_n"]) = _broadcast_strides(m)
    if call.alibi_slopes is not None:
        a["SLOPES"] = call.alibi_slopes.to(device=dev, dtype=torch.float32).contiguous()
    left, right = call.window if call.window is not None else (None, None)
    p = call.dropout_p
    a.update(
        Hq=call.Hq, G=call.groups, Lq=call.Lq, Lk=call.Lk, head_dim=call.D, head_dim_v=call.Dv,
        sm_scale=call.scale, softcap=call.softcap or 1.0, wl=left or 0, wr=right or 0,
        drop_thresh=math.ceil(p * (1 << 24)) if p > 0 else 0,
        drop_scale=1.0 / (1.0 - p), seed=call.dropout_seed or 0,
        IS_CAUSAL=call.causal, HAS_WL=left is not None, HAS_WR=right is not None,
        HAS_KVLEN=has_kvlen, HAS_QOFF=has_qoff, IS_VARLEN=varlen,
        HAS_BIAS=call.bias is not None, HAS_MASK=call.mask is not None,
        HAS_ALIBI=call.alibi_slopes is not None, HAS_SOFTCAP=call.softcap is not None,
        HAS_DROPOUT=p > 0,
        BLOCK_D=pow2(call.D), BLOCK_DV=pow2(call.Dv),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return Problem(call=call, varlen=varlen, Lq=call.Lq, Lk=call.Lk, args=a,
                   bias_grad=call.bias is not None and call.bias.requires_grad, dtype=q.dtype)


# ---- forward ---------------------------------------------------------------------------------

def use_decode(prob: Problem, q: torch.Tensor) -> bool:
    """Split-KV decode for short query blocks over long caches (no bias, mask, dropout, varlen)."""
    c = prob.call
    return (c.Lq <= DECODE_MAX_LQ and c.groups * c.Lq <= DECODE_MAX_ROWS
            and c.Lk >= DECODE_MIN_LK and not prob.varlen and c.bias is None
            and c.mask is None and not c.needs_dropout)


def forward(q, k, v, prob: Problem):
    """out (B, Hq, Lq, Dv) or (total_q, Hq, Dv), and the fp32 row statistics (m, log2 l) of
    shape (B, Hq, Lq) or (total_q, Hq), in the log2 domain: lse = (m + log2 l) · ln 2."""
    c = prob.call
    if prob.varlen:
        out = q.new_empty(q.shape[0], c.Hq, c.Dv)
        m, l2 = torch.empty(2, q.shape[0], c.Hq, dtype=torch.float32, device=q.device)
        lse_strides = (0, 1, c.Hq)
    else:
        out = q.new_empty(c.B, c.Hq, c.Lq, c.Dv)
        m, l2 = torch.empty(2, c.B, c.Hq, c.Lq, dtype=torch.float32, device=q.device)
        lse_strides = (c.Hq * c.Lq, c.Lq, 1)
    if out.numel() == 0:
        return out, m, l2
    if c.Lk == 0 or prob.Lk == 0:
        out.zero_()
        m.fill_(float("-inf"))
        l2.zero_()
        return out, m, l2
    if use_decode(prob, q):
        kernels_decode.decode_forward(q, k, v, out, m, l2, prob)
        return out, m, l2
    sq, sk, sv, so = (bhl_strides(t, prob.varlen) for t in (q, k, v, out))
    launch(
        kernels_fwd._attn_fwd,
        lambda bm, bn: (triton.cdiv(prob.Lq, bm), c.B * c.Hq),
        FWD_PAIRS, prob,
        Q=q, K=k, V=v, O=out, M=m, L2=l2,
        stride_qb=sq[0], stride_qh=sq[1], stride_qm=sq[2],
        stride_kb=sk[0], stride_kh=sk[1], stride_kn=sk[2],
        stride_vb=sv[0], stride_vh=sv[1], stride_vn=sv[2],
        stride_ob=so[0], stride_oh=so[1], stride_om=so[2],
        stride_lb=lse_strides[0], stride_lh=lse_strides[1], stride_lm=lse_strides[2],
        SAFE_SOFTMAX=c.bias is not None or c.mask is not None,
    )
    return out, m, l2


# ---- autograd --------------------------------------------------------------------------------

class TritonAttention(torch.autograd.Function):
    """Saves q, k, v, out and the row statistics (m, log2 l); backward runs the deterministic
    dK/dV and dQ kernels. The lse it returns is (m + log2 l) · ln 2 in float32."""

    @staticmethod
    def forward(ctx, q, k, v, bias, prob: Problem):
        dtype = q.dtype
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        if dtype == torch.bfloat16 and interpreting():
            # The interpreter multiplies bf16 tiles as raw bits; it computes them in fp32.
            q, k, v = q.float(), k.float(), v.float()
        out, m, l2 = forward(q, k, v, prob)
        ctx.save_for_backward(q, k, v, out, m, l2)
        ctx.prob, ctx.dtype = prob, dtype
        ctx.set_materialize_grads(False)
        return out.to(dtype), (m + l2) * math.log(2.0)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, m, l2 = ctx.saved_tensors
        prob = ctx.prob
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
        dq, dk, dv, dbias = kernels_bwd.backward(q, k, v, out, m, l2, dout, dlse, prob)
        if dbias is not None:
            dbias = dbias.to(prob.call.bias.dtype)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), dbias, None


def attention(q, k, v, call: AttentionCall):
    """Registry entry point, padded layout: (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) fp32)."""
    prob = make_problem(call, q)
    return TritonAttention.apply(q, k, v, call.bias, prob)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, call: AttentionCall):
    """Packed entry point: q (total_q, Hq, D) -> (out (total_q, Hq, Dv), lse (total_q, Hq))."""
    prob = make_problem(call, q, cu_seqlens_q, cu_seqlens_k)
    return TritonAttention.apply(q, k, v, None, prob)
