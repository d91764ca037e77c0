"""Backward kernels: delta preprocess, dK/dV (per key block) and dQ (per query block).

No atomics: each program owns the rows it writes (dK/dV of one key block and K/V head, summed
over the query heads of its group in a fixed order; dQ of one query block), so gradients are
bit-identical from run to run. Weights are recomputed from the forward's row max m and log2 of
the row sum l2 (log2 domain), with the scores s2 computed exactly as the forward did:

    p = exp2(s2 - m - l2);  dP = dO @ Vᵀ;  dS = p ∘ (dP - delta),  delta = rowsum(dO ∘ O) - dlse
    dV += dropout(p)ᵀ @ dO;  dK += scale·dS'ᵀ @ Q;  dQ += scale·dS' @ K,  dS' = dS·(1 - tanh²) with softcap
"""

import torch
import triton
import triton.language as tl

from qkv.attention.masking import reduce_to
from qkv.attention.triton.kernels_common import (
    _dropout_keep,
    _key_range,
    _load_kT,
    _query_range,
    _scores,
    _seq_info,
)
from qkv.attention.triton.launch import (
    BWD_PAIRS,
    INTERPRET_BLOCK,
    bhl_strides,
    interpreting,
    launch,
)


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_om,
                    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
                    CU_Q, Hq, Lq, head_dim_v,
                    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO ∘ O) - dlse for one block of query rows; grid (Lq/BM, B·Hq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        lq = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = b * 0
        lq = b * 0 + Lq
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    b64 = b.to(tl.int64)
    qs = q_start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < lq) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + (qs + offs_m[:, None]) * stride_om + offs_dv[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + (qs + offs_m[:, None]) * stride_dom + offs_dv[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_ptrs = b64 * stride_lb + h * stride_lh + (qs + offs_m) * stride_lm
    if HAS_DLSE:
        delta -= tl.load(DLSE + l_ptrs, mask=offs_m < lq, other=0.0)
    tl.store(DELTA + l_ptrs, delta, mask=offs_m < lq)


@triton.jit
def _bwd_tile(q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
              sm_scale, softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n,
              slope2, seed, bh, drop_thresh, drop_scale,
              IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
              PREC: tl.constexpr):
    """For a (BM, BN) tile: dropped weights, dS (= dbias) and dS' (w.r.t. scale·q·k)."""
    qk = tl.dot(q, kT, input_precision=PREC)
    s, t = _scores(qk, offs_m, offs_n, row_ok, col_ok, off, kv_end, sm_scale, softcap, wl, wr,
                   bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                   IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, MASKED)
    p = tl.exp2((s - m2[:, None]) - l2[:, None])  # m2 = +inf on rows that see nothing: p = 0
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
def _load_rows(X, base, offs_m, stride_m, offs_d, row_ok, dim):
    return tl.load(base + offs_m[:, None] * stride_m + offs_d[None, :],
                   mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0)


@triton.jit
def _load_stats(M, L2, l_off, offs_m, stride_lm, row_ok):
    """The forward's (m, log2 l); m = +inf for rows past the end or with no visible key."""
    m = tl.load(M + l_off + offs_m * stride_lm, mask=row_ok, other=float("inf"))
    l2 = tl.load(L2 + l_off + offs_m * stride_lm, mask=row_ok, other=0.0)
    return tl.where(m == float("-inf"), float("inf"), m), l2


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, M, L2, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
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
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hk = Hq // G
    b = pid_bh // Hk
    hk = pid_bh % Hk
    q_start, lq, k_start, lk, off, kv_end = _seq_info(b, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk,
                                                       IS_VARLEN, HAS_KVLEN, HAS_QOFF)
    n0 = pid_n * BLOCK_N
    if n0 >= lk:
        return
    b64 = b.to(tl.int64)
    qs = q_start.to(tl.int64)
    ks = k_start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < lk
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kT = _load_kT(K + b64 * stride_kb + hk * stride_kh + ks * stride_kn, offs_n, stride_kn, offs_d, col_ok, head_dim)
    v = _load_rows(V, V + b64 * stride_vb + hk * stride_vh + ks * stride_vn, offs_n, stride_vn, offs_dv, col_ok, head_dim_v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    start, mid_lo, mid_hi, hi = _query_range(n0, lq, off, kv_end, wl, wr, BLOCK_M, BLOCK_N,
                                             IS_CAUSAL, HAS_WL, HAS_WR)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b64 * stride_qb + h * stride_qh + qs * stride_qm
        do_base = DO + b64 * stride_dob + h * stride_doh + qs * stride_dom
        l_off = b64 * stride_lb + h * stride_lh + qs * stride_lm
        bias_base = BIAS + b64 * stride_bias_b + h * stride_bias_h
        mask_base = MASK + b64 * stride_mask_b + h * stride_mask_h
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_ALIBI:
            slope2 += tl.load(SLOPES + b * Hq + h).to(tl.float32) * 1.4426950408889634
        bh = b * Hq + h
        for m0 in range(start, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < lq
            q = _load_rows(Q, q_base, offs_m, stride_qm, offs_d, row_ok, head_dim)
            do = _load_rows(DO, do_base, offs_m, stride_dom, offs_dv, row_ok, head_dim_v)
            m2, l2 = _load_stats(M, L2, l_off, offs_m, stride_lm, row_ok)
            delta = tl.load(DELTA + l_off + offs_m * stride_lm, mask=row_ok, other=0.0)
            if (m0 >= mid_lo) & (m0 < mid_hi):  # fully visible block: no element mask
                pd, ds, dsc = _bwd_tile(
                    q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
                    sm_scale, softcap, wl, wr, bias_base + offs_m * stride_bias_m, stride_bias_n,
                    mask_base + offs_m * stride_mask_m, stride_mask_n, slope2, seed, bh,
                    drop_thresh, drop_scale, IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK,
                    HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, False, PREC)
            else:
                pd, ds, dsc = _bwd_tile(
                    q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
                    sm_scale, softcap, wl, wr, bias_base + offs_m * stride_bias_m, stride_bias_n,
                    mask_base + offs_m * stride_mask_m, stride_mask_n, slope2, seed, bh,
                    drop_thresh, drop_scale, IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK,
                    HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, True, PREC)
            dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=PREC)
            dk = tl.dot(tl.trans(dsc.to(q.dtype)), q, dk, input_precision=PREC)
    dk = dk * sm_scale
    dk_base = DK + b64 * stride_dkb + hk * stride_dkh + ks * stride_dkn
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < head_dim))
    dv_base = DV + b64 * stride_dvb + hk * stride_dvh + ks * stride_dvn
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _dq_block(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_vn, n0, offs_m, row_ok,
              offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale, softcap, wl, wr,
              bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
              seed, bh, drop_thresh, drop_scale, dbias_rows, Lk,
              IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
              STORE_DBIAS: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Add keys [n0, n0 + BLOCK_N) to dQ of BLOCK_M query rows (and write their dbias tile)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < lk
    kT = _load_kT(k_base, offs_n, stride_kn, offs_d, col_ok, head_dim)
    v = _load_rows(v_base, v_base, offs_n, stride_vn, offs_dv, col_ok, head_dim_v)
    pd, ds, dsc = _bwd_tile(q, kT, v, do, m2, l2, delta, offs_m, offs_n, row_ok, col_ok, off, kv_end,
                            sm_scale, softcap, wl, wr, bias_rows, stride_bias_n, mask_rows,
                            stride_mask_n, slope2, seed, bh, drop_thresh, drop_scale,
                            IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                            HAS_DROPOUT, MASKED, PREC)
    if STORE_DBIAS:
        tl.store(dbias_rows[:, None] + offs_n[None, :], ds, mask=row_ok[:, None] & col_ok[None, :])
    dq = tl.dot(dsc.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, M, L2, DELTA, DQ, DBIAS,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh, stride_lm, stride_dqb, stride_dqh, stride_dqm,
    CU_Q, CU_K, KVLEN, QOFF,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    SLOPES, Hq, G, Lq, Lk, head_dim, head_dim_v,
    sm_scale, softcap, wl, wr, drop_thresh, drop_scale, seed,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ of one block of query rows (and dbias (B, Hq, Lq, Lk) when asked); grid (Lq/BM, B·Hq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    q_start, lq, k_start, lk, off, kv_end = _seq_info(b, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk,
                                                       IS_VARLEN, HAS_KVLEN, HAS_QOFF)
    m0 = pid_m * BLOCK_M
    if m0 >= lq:
        return
    b64 = b.to(tl.int64)
    qs = q_start.to(tl.int64)
    ks = k_start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q, Q + b64 * stride_qb + h * stride_qh + qs * stride_qm, offs_m, stride_qm, offs_d, row_ok, head_dim)
    do = _load_rows(DO, DO + b64 * stride_dob + h * stride_doh + qs * stride_dom, offs_m, stride_dom, offs_dv, row_ok, head_dim_v)
    l_off = b64 * stride_lb + h * stride_lh + qs * stride_lm
    m2, l2 = _load_stats(M, L2, l_off, offs_m, stride_lm, row_ok)
    delta = tl.load(DELTA + l_off + offs_m * stride_lm, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh + ks * stride_kn
    v_base = V + b64 * stride_vb + hk * stride_vh + ks * stride_vn
    bias_rows = BIAS + b64 * stride_bias_b + h * stride_bias_h + offs_m * stride_bias_m
    mask_rows = MASK + b64 * stride_mask_b + h * stride_mask_h + offs_m * stride_mask_m
    dbias_rows = DBIAS + ((b64 * Hq + h) * Lq + offs_m) * Lk
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 += tl.load(SLOPES + b * Hq + h).to(tl.float32) * 1.4426950408889634
    bh = b * Hq + h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start, mid_lo, mid_hi, hi = _key_range(m0, lq, off, kv_end, wl, wr, BLOCK_M, BLOCK_N,
                                           IS_CAUSAL, HAS_WL, HAS_WR)
    for n0 in range(start, mid_lo, BLOCK_N):
        dq = _dq_block(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_vn, n0, offs_m,
                       row_ok, offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale,
                       softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                       seed, bh, drop_thresh, drop_scale, dbias_rows, Lk,
                       IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                       HAS_DROPOUT, True, STORE_DBIAS, BLOCK_N, PREC)
    for n0 in range(mid_lo, mid_hi, BLOCK_N):
        dq = _dq_block(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_vn, n0, offs_m,
                       row_ok, offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale,
                       softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                       seed, bh, drop_thresh, drop_scale, dbias_rows, Lk,
                       IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                       HAS_DROPOUT, False, STORE_DBIAS, BLOCK_N, PREC)
    for n0 in range(mid_hi, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, m2, l2, delta, k_base, v_base, stride_kn, stride_vn, n0, offs_m,
                       row_ok, offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale,
                       softcap, wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                       seed, bh, drop_thresh, drop_scale, dbias_rows, Lk,
                       IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                       HAS_DROPOUT, True, STORE_DBIAS, BLOCK_N, PREC)
    dq = dq * sm_scale
    dq_base = DQ + b64 * stride_dqb + h * stride_dqh + qs * stride_dqm
    tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


def backward(q, k, v, out, m, l2, dout, dlse, prob):
    """(dq, dk, dv, dbias or None) for the layout of `prob` (padded or packed)."""
    c = prob.call
    vl = prob.varlen
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dbias = None
    if prob.bias_grad:
        dbias = torch.zeros(c.B, c.Hq, c.Lq, c.Lk, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0 or c.Lk == 0 or c.Lq == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, None if dbias is None else reduce_to(dbias, c.bias.shape)
    lse_strides = (0, 1, c.Hq) if vl else (c.Hq * c.Lq, c.Lq, 1)
    ls = dict(stride_lb=lse_strides[0], stride_lh=lse_strides[1], stride_lm=lse_strides[2])
    delta = torch.empty_like(m)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    so, sdo = bhl_strides(out, vl), bhl_strides(dout, vl)
    bm = INTERPRET_BLOCK if interpreting() else 64
    _bwd_preprocess[(triton.cdiv(c.Lq, bm), c.B * c.Hq)](
        out, dout, dlse if dlse is not None else m, delta, *so, *sdo, *lse_strides,
        prob.args["CU_Q"], c.Hq, c.Lq, c.Dv,
        IS_VARLEN=vl, HAS_DLSE=dlse is not None, BLOCK_M=bm, BLOCK_DV=prob.block_dv)
    qkv_strides = {}
    for name, t, tag in (("q", q, "m"), ("k", k, "n"), ("v", v, "n"), ("do", dout, "m")):
        sb, sh, sm = bhl_strides(t, vl)
        qkv_strides.update({f"stride_{name}b": sb, f"stride_{name}h": sh, f"stride_{name}{tag}": sm})
    sdk, sdv, sdq = bhl_strides(dk, vl), bhl_strides(dv, vl), bhl_strides(dq, vl)
    launch(_attn_bwd_dkdv, lambda bm_, bn_: (triton.cdiv(c.Lk, bn_), c.B * c.Hk), BWD_PAIRS, prob,
           Q=q, K=k, V=v, DO=dout, M=m, L2=l2, DELTA=delta, DK=dk, DV=dv, **qkv_strides, **ls,
           stride_dkb=sdk[0], stride_dkh=sdk[1], stride_dkn=sdk[2],
           stride_dvb=sdv[0], stride_dvh=sdv[1], stride_dvn=sdv[2])
    launch(_attn_bwd_dq, lambda bm_, bn_: (triton.cdiv(c.Lq, bm_), c.B * c.Hq), BWD_PAIRS, prob,
           Q=q, K=k, V=v, DO=dout, M=m, L2=l2, DELTA=delta, DQ=dq,
           DBIAS=dbias if dbias is not None else m, **qkv_strides, **ls,
           stride_dqb=sdq[0], stride_dqh=sdq[1], stride_dqm=sdq[2], STORE_DBIAS=dbias is not None)
    if dbias is not None:
        dbias = reduce_to(dbias, c.bias.shape)
    return dq, dk, dv, dbias
