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
    _base,
    _block,
    _dropout_keep,
    _head_rows,
    _key_range,
    _load_kT,
    _load_rows,
    _program,
    _rows,
    _scores,
    _stage_bounds,
)


@triton.jit
def _fwd_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, offs_m, row_ok,
               lk, off, kv_end, head_dim, head_dim_v, sm_scale, softcap, wl, wr,
               bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
               seed, bh, drop_thresh, drop_scale,
               IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l, m) of BLOCK_M query rows.

    MASKED: the blocks may hide some pairs (causal, window, kv end) and need element masks.
    """
    offs_d = tl.arange(0, q.shape[1])
    offs_dv = tl.arange(0, acc.shape[1])
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < lk
        kT = _load_kT(k_base, offs_n, stride_kn, offs_d, col_ok, head_dim)  # (D, BN)
        s, _t = _scores(q, kT, offs_m, offs_n, row_ok, col_ok, off, kv_end, sm_scale, softcap,
                        wl, wr, bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
                        IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP,
                        MASKED, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED | HAS_BIAS | HAS_MASK:
            # A row may still have seen nothing; keep exp2 away from (-inf) - (-inf).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, drop_thresh)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = _load_rows(v_base, offs_n, stride_vn, offs_dv, col_ok, head_dim_v)  # (BN, Dv)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _finish(acc, l_i, m_i):
    """(out, m, log2 l) of the running state; a row with no visible key gets 0, -inf, 0."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    return out, tl.where(empty, float("-inf"), m_i), tl.log2(l_safe)


@triton.jit
def _attn_fwd(
    Q, K, V, O, M, L2,
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
    """out, m and log2 l (dense rows, see `_rows`) of one block of query rows of one head;
    grid (Lq/BM, B·Hq)."""
    b, h, q_start, lq, k_start, lk, off, kv_end = _program(
        Hq, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk, IS_VARLEN, HAS_KVLEN, HAS_QOFF)
    m0, offs_m, row_ok = _block(lq, BLOCK_M)
    if m0 >= lq:  # a block past the end of this sequence
        return
    q = _load_rows(_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qm), offs_m, stride_qm,
                   tl.arange(0, BLOCK_D), row_ok, head_dim)  # (BM, D)
    k_base = _base(K, b, h // G, k_start, stride_kb, stride_kh, stride_kn)
    v_base = _base(V, b, h // G, k_start, stride_vb, stride_vh, stride_vn)
    bias_rows, mask_rows, slope2 = _head_rows(
        b, h, offs_m, Hq, BIAS, stride_bias_b, stride_bias_h, stride_bias_m,
        MASK, stride_mask_b, stride_mask_h, stride_mask_m, SLOPES, HAS_BIAS, HAS_MASK, HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start, mid_lo, mid_hi, hi = _key_range(m0, lq, off, kv_end, wl, wr, BLOCK_M, BLOCK_N,
                                           IS_CAUSAL, HAS_WL, HAS_WR)
    for stage in tl.static_range(3):  # leading boundary, fully visible, trailing boundary
        lo, end = _stage_bounds(stage, start, mid_lo, mid_hi, hi)
        acc, l_i, m_i = _fwd_range(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, end, offs_m, row_ok,
            lk, off, kv_end, head_dim, head_dim_v, sm_scale, softcap, wl, wr,
            bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
            seed, b * Hq + h, drop_thresh, drop_scale,
            IS_CAUSAL, HAS_WL, HAS_WR, HAS_BIAS, HAS_MASK, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT,
            stage != 1, BLOCK_N, PREC)

    out, m_i, l2 = _finish(acc, l_i, m_i)
    rows = _rows(b, h, q_start, offs_m, Hq, Lq, IS_VARLEN)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(O + rows[:, None] * head_dim_v + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(M + rows, m_i, mask=row_ok)
    tl.store(L2 + rows, l2, mask=row_ok)
