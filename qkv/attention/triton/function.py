"""Launchers for the Triton kernels and the autograd.Function that joins forward and backward.

`Problem` gathers, once per call, the kernel arguments the launches share, in groups (packed
sequences, cache, window, scores, bias and mask with broadcast strides, dropout, shape), so each
kernel takes the groups it uses. Inputs q, k, v are read through their strides (padded
(B, H, L, D) or packed (total, H, D) with cu_seqlens); everything the kernels write is dense.
On CUDA each kernel is autotuned over the config list of its shape family (fp16/bf16 or fp32,
head-dim class 64, 128 or 256), keyed on length buckets (the next power of two of Lq and Lk, at
least the smallest tile side, 16; see launch.py), never on exact lengths; under TRITON_INTERPRET=1
(CPU) a fixed config runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from qkv.attention.spec import AttentionCall
from qkv.attention.triton import kernels_bwd, kernels_decode, kernels_fwd
from qkv.attention.triton.launch import bhl_strides, interpreting, launch, pow2

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
    """One call's shapes, layout and the kernel arguments its launches share, by group.

    The forward, dQ and dK/dV kernels take every group (`args`); the decode kernel takes
    `cache`, `window`, `score` and `shape` only (no packed sequences, bias, mask or dropout).
    """

    call: AttentionCall
    varlen: bool
    seq: dict  # packed sequences: cu_seqlens of queries and keys
    cache: dict  # per-row kv_lengths and query offsets
    window: dict  # causal and sliding window
    score: dict  # scale, softcap, ALiBi slopes
    bias_mask: dict  # additive bias and boolean mask with broadcast strides
    dropout: dict
    shape: dict  # heads, lengths, head dims, their padded block sizes and the dot precision
    bias_grad: bool

    @property
    def args(self) -> dict:
        return {**self.seq, **self.cache, **self.window, **self.score, **self.bias_mask,
                **self.dropout, **self.shape}

    @property
    def block_d(self) -> int:
        return self.shape["BLOCK_D"]

    @property
    def block_dv(self) -> int:
        return self.shape["BLOCK_DV"]


def _int32(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=dev, dtype=torch.int32).contiguous()


def _broadcast_arg(name: str, t: torch.Tensor | None) -> dict:
    """{NAME: t, stride_name_b/h/m/n: broadcast strides, HAS_NAME: present} for bias / mask."""
    strides = _broadcast_strides(t) if t is not None else (0, 0, 0, 0)
    out = {name.upper(): t, f"HAS_{name.upper()}": t is not None}
    out.update({f"stride_{name}_{d}": s for d, s in zip("bhmn", strides, strict=True)})
    return out


def make_problem(call: AttentionCall, q: torch.Tensor, cu_seqlens_q=None, cu_seqlens_k=None
                 ) -> Problem:
    """Group the kernel arguments of `call` (packed layout when cu_seqlens are given)."""
    dev = q.device
    varlen = cu_seqlens_q is not None
    # Packed sequences take their lengths and alignment from cu_seqlens.
    kv_lengths = None if varlen else _int32(call.kv_lengths, dev)
    q_offset = None if varlen else _int32(call.q_offset, dev)
    left, right = call.window if call.window is not None else (None, None)
    slopes = call.alibi_slopes
    p = call.dropout_p
    return Problem(
        call=call, varlen=varlen,
        seq=dict(CU_Q=_int32(cu_seqlens_q, dev), CU_K=_int32(cu_seqlens_k, dev),
                 IS_VARLEN=varlen),
        cache=dict(KVLEN=kv_lengths, QOFF=q_offset, HAS_KVLEN=kv_lengths is not None,
                   HAS_QOFF=q_offset is not None),
        window=dict(wl=left or 0, wr=right or 0, IS_CAUSAL=call.causal,
                    HAS_WL=left is not None, HAS_WR=right is not None),
        score=dict(sm_scale=call.scale, softcap=call.softcap or 1.0,
                   SLOPES=None if slopes is None else slopes.to(dev, torch.float32).contiguous(),
                   HAS_ALIBI=slopes is not None, HAS_SOFTCAP=call.softcap is not None),
        bias_mask={**_broadcast_arg("bias", call.bias),
                   **_broadcast_arg("mask", None if call.mask is None
                                    else call.mask.view(torch.uint8))},
        dropout=dict(drop_thresh=math.ceil(p * (1 << 24)) if p > 0 else 0,
                     drop_scale=1.0 / (1.0 - p), seed=call.dropout_seed or 0,
                     HAS_DROPOUT=p > 0),
        shape=dict(Hq=call.Hq, G=call.groups, Lq=call.Lq, Lk=call.Lk, head_dim=call.D,
                   head_dim_v=call.Dv, BLOCK_D=pow2(call.D), BLOCK_DV=pow2(call.Dv),
                   PREC="ieee" if q.dtype == torch.float32 else "tf32"),
        bias_grad=call.bias is not None and call.bias.requires_grad,
    )


# ---- forward ---------------------------------------------------------------------------------

def use_decode(prob: Problem) -> bool:
    """Split-KV decode for short query blocks over long caches (no bias, mask, dropout, varlen)."""
    c = prob.call
    return (c.Lq <= DECODE_MAX_LQ and c.groups * c.Lq <= DECODE_MAX_ROWS
            and c.Lk >= DECODE_MIN_LK and not prob.varlen and c.bias is None
            and c.mask is None and not c.needs_dropout)


def forward(q, k, v, prob: Problem):
    """out (B, Hq, Lq, Dv) or (total_q, Hq, Dv), and the fp32 row statistics (m, log2 l) of
    shape (B, Hq, Lq) or (total_q, Hq), in the log2 domain: lse = (m + log2 l) · ln 2.
    All three are dense, as the kernels index them by row."""
    c = prob.call
    rows = (q.shape[0], c.Hq) if prob.varlen else (c.B, c.Hq, c.Lq)
    out = q.new_empty(*rows, c.Dv)
    m, l2 = torch.empty(2, *rows, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, m, l2
    if c.Lk == 0:
        out.zero_()
        m.fill_(float("-inf"))
        l2.zero_()
        return out, m, l2
    if use_decode(prob):
        kernels_decode.decode_forward(q, k, v, out, m, l2, prob)
        return out, m, l2
    strides = [s for t in (q, k, v) for s in bhl_strides(t, prob.varlen)]
    launch(kernels_fwd._attn_fwd, lambda bm, bn: (triton.cdiv(c.Lq, bm), c.B * c.Hq), "fwd",
           prob, q, k, v, out, m, l2, *strides, **prob.args)
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
