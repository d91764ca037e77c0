"""Backward kernels: delta preprocess, dK/dV (per key block) and dQ (per query block).

No atomics: each program owns the rows it writes (dK/dV of one key block and K/V head, summed
over the query heads of its group in a fixed order; dQ of one query block), so gradients are
bit-identical from run to run. Weights are recomputed from the forward's row max m and log2 of
the row sum l2 (log2 domain), with the scores s2 computed exactly as the forward did:

    p = exp2(s2 - m - l2);  dP = dO @ Vᵀ;  dS = p ∘ (dP - delta),  delta = rowsum(dO ∘ O) - dlse
    dV += dropout(p)ᵀ @ dO;  dK += scale·dS'ᵀ @ Q;  dQ += scale·dS' @ K,  dS' = dS·(1 - tanh²) with softcap

Both walk their blocks in the forward's three stages: boundary blocks with element masks, fully
visible blocks without.
"""

import math

import torch
import triton
import triton.language as tl

from qkv.attention.masking import reduce_to
from qkv.attention.triton.kernels_common import (
    _base,
    _block,
    _dropout_keep,
    _head_rows,
    _key_range,
    _load_kT,
    _load_rows,
    _program,
    _query_range,
    _rows,
    _scores,
    _stage_bounds,
)
from qkv.attention.triton.launch import (
    INTERPRET_BLOCK,
    bhl_strides,
    interpreting,
    launch,
)

# Query blocks with a row whose largest score |m| exceeds this get the exact delta of the dQ
# kernel's DELTA_PASS (the criterion of the chunked backend). The error of the cheap one grows
# like 1e-7·|m| relative to the gradients, so below 64 it stays under 1e-5.
LARGE_SCORE = 64.0


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, n_rows, head_dim_v,
                    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO ∘ O) - dlse over the dense query rows; grid (rows/BM,)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < n_rows
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_rows(O, rows, head_dim_v, offs_dv, ok, head_dim_v)
    do = _load_rows(DO, rows, head_dim_v, offs_dv, ok, head_dim_v)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


@triton.jit
def _query_side(q_base, stride_qm, DO, M, L2, DELTA, rows, offs_m, row_ok, head_dim, head_dim_v,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """q, dO, the forward's (m, log2 l) and delta of query rows offs_m (dense row numbers
    `rows`); m = +inf for rows past the end or with no visible key, so their p is 0."""
    q = _load_rows(q_base, offs_m, stride_qm, tl.arange(0, BLOCK_D), row_ok, head_dim)
    do = _load_rows(DO, rows, head_dim_v, tl.arange(0, BLOCK_DV), row_ok, head_dim_v)
    m = tl.load(M + rows, mask=row_ok, other=float("inf"))
    l2 = tl.load(L2 + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    return q, do, tl.where(m == float("-inf"), float("inf"), m), l2, delta


@triton.jit
def _bwd_tile(q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
              sm_scale, softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n,
              slope2, seed, bh, drop_thresh, drop_scale,
              IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
              PREC: tl.constexpr):
    """For a (BM, BN) tile: dropped weights, dS (= dbias) and dS' (w.r.t. scale·q·k)."""
    s, t = _scores(q, kT, offs_m, offs_n, row_ok, col_ok, off, kv_end, sm_scale, softcap, wl, wr,
                   bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                   IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, MASKED,
                   PREC)
    p = tl.exp2((s - m2[:, None]) - l2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_thresh)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    dsc = ds * (1.0 - t * t) if HAS_SOFTCAP else ds
    return pd, ds, dsc


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, M, L2, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    CU_Q, CU_K, KVLEN, QOFF,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    SLOPES, Hq, G, Lq, Lk, head_dim, head_dim_v,
    sm_scale, softcap, wl, wr, drop_thresh, drop_scale, seed,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dK, dV of one key block of one K/V head, over its query heads; grid (Lk/BN, B·Hk)."""
    Hk = Hq // G
    b, hk, q_start, lq, k_start, lk, off, kv_end = _program(
        Hk, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk, IS_VARLEN, HAS_KVLEN, HAS_QOFF)
    n0, offs_n, col_ok = _block(lk, BLOCK_N)
    if n0 >= lk:  # a block past the end of this sequence
        return
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kT = _load_kT(_base(K, b, hk, k_start, stride_kb, stride_kh, stride_kn), offs_n, stride_kn,
                  offs_d, col_ok, head_dim)  # (D, BN)
    v = _load_rows(_base(V, b, hk, k_start, stride_vb, stride_vh, stride_vn), offs_n, stride_vn,
                   offs_dv, col_ok, head_dim_v)  # (BN, Dv)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start, mid_lo, mid_hi, hi = _query_range(n0, lq, off, kv_end, wl, wr, BLOCK_M, BLOCK_N,
                                             IS_CAUSAL, HAS_WL, HAS_WR)
    for g in range(0, G):
        h = hk * G + g
        q_base = _base(Q, b, h, q_start, stride_qb, stride_qh, stride_qm)
        for stage in tl.static_range(3):  # leading boundary, fully visible, trailing boundary
            lo, end = _stage_bounds(stage, start, mid_lo, mid_hi, hi)
            for m0 in range(lo, end, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < lq
                q, do, m2, l2, delta = _query_side(
                    q_base, stride_qm, DO, M, L2, DELTA, _rows(b, h, q_start, offs_m, Hq, Lq, IS_VARLEN),
                    offs_m, row_ok, head_dim, head_dim_v, BLOCK_D, BLOCK_DV)
                bias_rows, mask_rows, slope2 = _head_rows(
                    b, h, offs_m, Hq, BIAS, stride_bias_b, stride_bias_h, stride_bias_m,
                    MASK, stride_mask_b, stride_mask_h, stride_mask_m, SLOPES,
                    HAS_BIAS, HAS_MASK, HAS_ALIBI)
                pd, _ds, dsc = _bwd_tile(
                    q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
                    sm_scale, softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n,
                    slope2, seed, b * Hq + h, drop_thresh, drop_scale,
                    IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                    HAS_DROPOUT, stage != 1, PREC)
                dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=PREC)
                dk = tl.dot(tl.trans(dsc.to(q.dtype)), q, dk, input_precision=PREC)
    rows = _rows(b, hk, k_start, offs_n, Hk, Lk, IS_VARLEN)  # dK, dV are dense
    tl.store(DK + rows[:, None] * head_dim + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(DV + rows[:, None] * head_dim_v + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, M, L2, DLSE, DELTA, DQ, DBIAS,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    CU_Q, CU_K, KVLEN, QOFF,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    SLOPES, Hq, G, Lq, Lk, head_dim, head_dim_v,
    sm_scale, softcap, wl, wr, drop_thresh, drop_scale, seed, large_m2,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DLSE: tl.constexpr,
    STORE_DBIAS: tl.constexpr, DELTA_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ of one block of query rows (and dbias (B, Hq, Lq, Lk) when asked); grid (Lq/BM, B·Hq).

    DELTA_PASS (run before the dK/dV kernel): instead, replace delta of the rows whose largest
    score (log2 domain) exceeds large_m2 in size by rowsum(p ∘ dP) - dlse. Where the weights
    are one-hot or tied, the exact dP - delta is zero, and rowsum(dO ∘ O) rounds apart from the
    tiles' dP by about 2^-24·|dO||V|, which dQ and dK would see multiplied by the scale. Blocks
    without such rows return at once.
    """
    b, h, q_start, lq, k_start, lk, off, kv_end = _program(
        Hq, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk, IS_VARLEN, HAS_KVLEN, HAS_QOFF)
    m0, offs_m, row_ok = _block(lq, BLOCK_M)
    if m0 >= lq:  # a block past the end of this sequence
        return
    rows = _rows(b, h, q_start, offs_m, Hq, Lq, IS_VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, do, m2, l2, delta = _query_side(
        _base(Q, b, h, q_start, stride_qb, stride_qh, stride_qm), stride_qm, DO, M, L2, DELTA,
        rows, offs_m, row_ok, head_dim, head_dim_v, BLOCK_D, BLOCK_DV)
    k_base = _base(K, b, h // G, k_start, stride_kb, stride_kh, stride_kn)
    v_base = _base(V, b, h // G, k_start, stride_vb, stride_vh, stride_vn)
    bias_rows, mask_rows, slope2 = _head_rows(
        b, h, offs_m, Hq, BIAS, stride_bias_b, stride_bias_h, stride_bias_m,
        MASK, stride_mask_b, stride_mask_h, stride_mask_m, SLOPES, HAS_BIAS, HAS_MASK, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_dp = tl.zeros([BLOCK_M], dtype=tl.float32)  # rowsum(p ∘ dP), in the delta pass
    start, mid_lo, mid_hi, hi = _key_range(m0, lq, off, kv_end, wl, wr, BLOCK_M, BLOCK_N,
                                           IS_CAUSAL, HAS_WL, HAS_WR)
    if DELTA_PASS:
        exact = row_ok & (m2 < float("inf")) & (tl.abs(m2) > large_m2)
        hi = tl.where(tl.max(exact.to(tl.int32), 0) > 0, hi, start)  # no such row: walk nothing
        mid_lo = tl.minimum(mid_lo, hi)
        mid_hi = tl.minimum(mid_hi, hi)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)  # so that the tiles' dS is p ∘ dP
    for stage in tl.static_range(3):  # leading boundary, fully visible, trailing boundary
        lo, end = _stage_bounds(stage, start, mid_lo, mid_hi, hi)
        for n0 in range(lo, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < lk
            kT = _load_kT(k_base, offs_n, stride_kn, offs_d, col_ok, head_dim)  # (D, BN)
            v = _load_rows(v_base, offs_n, stride_vn, offs_dv, col_ok, head_dim_v)  # (BN, Dv)
            _pd, ds, dsc = _bwd_tile(
                q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
                sm_scale, softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n,
                slope2, seed, b * Hq + h, drop_thresh, drop_scale,
                IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                HAS_DROPOUT, stage != 1, PREC)
            if DELTA_PASS:
                p_dp += tl.sum(ds, 1)
            else:
                if STORE_DBIAS:  # dbias (B, Hq, Lq, Lk) fp32, padded layout only
                    tl.store(DBIAS + rows[:, None] * Lk + offs_n[None, :], ds,
                             mask=row_ok[:, None] & col_ok[None, :])
                dq = tl.dot(dsc.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    if DELTA_PASS:
        if HAS_DLSE:
            p_dp -= tl.load(DLSE + rows, mask=row_ok, other=0.0)
        tl.store(DELTA + rows, p_dp, mask=exact)
        return
    tl.store(DQ + rows[:, None] * head_dim + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


def backward(q, k, v, out, m, l2, dout, dlse, prob):
    """(dq, dk, dv, dbias or None) for the layout of `prob` (padded or packed).

    dq, dk, dv, dout, delta and the statistics are dense in that layout (indexed by `_rows`).
    """
    c = prob.call
    dout = dout.contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dbias = None
    if prob.bias_grad:
        dbias = torch.zeros(c.B, c.Hq, c.Lq, c.Lk, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0 or c.Lk == 0 or c.Lq == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, None if dbias is None else reduce_to(dbias, c.bias.shape)
    delta = torch.empty_like(m)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    bm = INTERPRET_BLOCK if interpreting() else 64
    _bwd_preprocess[(triton.cdiv(m.numel(), bm),)](
        out, dout, dlse, delta, m.numel(), c.Dv,
        HAS_DLSE=dlse is not None, BLOCK_M=bm, BLOCK_DV=prob.block_dv)
    strides = [s for t in (q, k, v) for s in bhl_strides(t, prob.varlen)]
    dq_args = (q, k, v, dout, m, l2, dlse, delta, dq, dbias, *strides)
    dq_grid = lambda bm_, bn_: (triton.cdiv(c.Lq, bm_), c.B * c.Hq)  # noqa: E731
    launch(_attn_bwd_dq, dq_grid, "dq_delta", prob, *dq_args, **prob.args,
           large_m2=LARGE_SCORE * math.log2(math.e), HAS_DLSE=dlse is not None,
           STORE_DBIAS=False, DELTA_PASS=True)
    launch(_attn_bwd_dkdv, lambda bm_, bn_: (triton.cdiv(c.Lk, bn_), c.B * c.Hk), "dkdv", prob,
           q, k, v, dout, m, l2, delta, dk, dv, *strides, **prob.args)
    launch(_attn_bwd_dq, dq_grid, "dq", prob, *dq_args, **prob.args,
           large_m2=0.0, HAS_DLSE=dlse is not None, STORE_DBIAS=dbias is not None,
           DELTA_PASS=False)
    if dbias is not None:
        dbias = reduce_to(dbias, c.bias.shape)
    return dq, dk, dv, dbias
