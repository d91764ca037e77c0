"""Forward kernel: FlashAttention-2 style online softmax over key blocks.

One program owns BLOCK_M query rows of one (batch, head). It walks only the key blocks that
causal, window and kv_lengths leave visible (`_key_range`), applies element masks only on the
boundary blocks, and keeps a running max `m`, sum `l` and fp32 accumulator in the log2 domain:

    m' = max(m, rowmax(s2));  p = exp2(s2 - m');  l' = l·exp2(m - m') + rowsum(p)
    acc' = acc·exp2(m - m') + dropout(p) @ v;     out = acc / l

It saves m and log2 l apart (lse = (m + log2 l) · ln 2): at large scores one float32 sum of the
two loses the low bits that the backward needs to rebuild p exactly.
"""

import triton
import triton.language as tl

from qkv.attention.triton.kernels_common import (
    _dropout_keep,
    _key_range,
    _load_kT,
    _scores,
    _seq_info,
)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n0, offs_m, row_ok,
               offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale, softcap, wl, wr,
               bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
               seed, bh, drop_thresh, drop_scale,
               IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
               SAFE: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Fold keys [n0, n0 + BLOCK_N) into the running (acc, l, m) of BLOCK_M query rows."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < lk
    kT = _load_kT(k_base, offs_n, stride_kn, offs_d, col_ok, head_dim)  # (D, BN)
    qk = tl.dot(q, kT, input_precision=PREC)  # (BM, BN) fp32
    s, _t = _scores(qk, offs_m, offs_n, row_ok, col_ok, off, kv_end, sm_scale, softcap, wl, wr,
                    bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                    IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # SAFE: a row may still have seen nothing; keep exp2 away from (-inf) - (-inf).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new) if SAFE else m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_thresh)
        p = tl.where(keep, p * drop_scale, 0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)  # (BN, Dv)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q, K, V, O, M, L2,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh, stride_lm,
    CU_Q, CU_K, KVLEN, QOFF,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    SLOPES, Hq, G, Lq, Lk, head_dim, head_dim_v,
    sm_scale, softcap, wl, wr, drop_thresh, drop_scale, seed,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAFE_SOFTMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """out (B, Hq, Lq, Dv), row max m and log2 of the row sum (B, Hq, Lq) (log2 domain) for one
    block of query rows; grid (Lq/BM, B·Hq)."""
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
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qm
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)  # (BM, D)
    k_base = K + b64 * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vn
    bias_rows = BIAS + b64 * stride_bias_b + h * stride_bias_h + offs_m * stride_bias_m
    mask_rows = MASK + b64 * stride_mask_b + h * stride_mask_h + offs_m * stride_mask_m
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 += tl.load(SLOPES + b * Hq + h).to(tl.float32) * 1.4426950408889634
    bh = b * Hq + h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start, mid_lo, mid_hi, hi = _key_range(m0, lq, off, kv_end, wl, wr, BLOCK_M, BLOCK_N,
                                           IS_CAUSAL, HAS_WL, HAS_WR)
    for n0 in range(start, mid_lo, BLOCK_N):  # leading boundary blocks (window left)
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n0, offs_m, row_ok,
            offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale, softcap, wl, wr,
            bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
            seed, bh, drop_thresh, drop_scale,
            IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT,
            True, True, BLOCK_N, PREC)
    for n0 in range(mid_lo, mid_hi, BLOCK_N):  # fully visible blocks: no element mask
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n0, offs_m, row_ok,
            offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale, softcap, wl, wr,
            bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
            seed, bh, drop_thresh, drop_scale,
            IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT,
            False, SAFE_SOFTMAX, BLOCK_N, PREC)
    for n0 in range(mid_hi, hi, BLOCK_N):  # trailing boundary blocks (causal, window, kv end)
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n0, offs_m, row_ok,
            offs_d, offs_dv, head_dim, head_dim_v, lk, off, kv_end, sm_scale, softcap, wl, wr,
            bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
            seed, bh, drop_thresh, drop_scale,
            IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT,
            True, True, BLOCK_N, PREC)

    empty = l_i == 0.0  # no visible key: out 0, m -inf, log2 l 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    o_base = O + b64 * stride_ob + h * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    l_off = b64 * stride_lb + h * stride_lh + (q_start.to(tl.int64) + offs_m) * stride_lm
    tl.store(M + l_off, tl.where(empty, float("-inf"), m_i), mask=row_ok)
    tl.store(L2 + l_off, tl.log2(l_safe), mask=row_ok)
