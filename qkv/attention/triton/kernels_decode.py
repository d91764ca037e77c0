"""Decode kernels: split-KV attention for a few queries (Lq <= 16) over a long cache.

A decode step has too few query rows to fill the GPU with one program per query block, so the
cache is cut into `splits` chunks of keys. Each program takes one chunk of one K/V head, and
stacks the queries of every head in its group as rows (G·Lq rows), so each K/V tile is read once
for the whole group. It writes a partial (out, m, l) (log2 domain); a second small kernel merges
the partials into the forward's saved statistics (row max m and log2 of the row sum):

    m = max_s m_s;   w_s = l_s · exp2(m_s - m);   l = Σ_s w_s;   out = Σ_s w_s · out_s / l
"""

import torch
import triton
import triton.language as tl

from qkv.attention.triton.kernels_common import _seq_info
from qkv.attention.triton.kernels_fwd import _fwd_block
from qkv.attention.triton.launch import INTERPRET_BLOCK, interpreting, pow2


@triton.jit
def _attn_decode_split(
    Q, K, V, OP, MP, LP,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    CU_Q, CU_K, KVLEN, QOFF,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
    SLOPES, Hq, G, Lq, Lk, head_dim, head_dim_v,
    sm_scale, softcap, wl, wr, drop_thresh, drop_scale, seed, n_splits, chunk,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Partial (out, m, l) of keys [split·chunk, (split+1)·chunk); grid (splits, B·Hk)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hk = Hq // G
    b = pid_bh // Hk
    hk = pid_bh % Hk
    _qs, lq, _ks, lk, off, kv_end = _seq_info(b, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk,
                                              False, HAS_KVLEN, HAS_QOFF)
    b64 = b.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)  # row r is query i = r % Lq of head hk·G + r // Lq
    row_ok = rows < G * Lq
    i = rows % Lq
    h = hk * G + tl.minimum(rows // Lq, G - 1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b64 * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 += tl.load(SLOPES + b * Hq + h, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    lo = pid_s * 0
    hi = kv_end + pid_s * 0
    if HAS_WL:
        lo = tl.maximum(off - wl, 0)
    if IS_CAUSAL:
        hi = tl.minimum(hi, lq + off)
    if HAS_WR:
        hi = tl.minimum(hi, lq + off + wr)
    lo = tl.maximum(lo, pid_s * chunk)
    hi = tl.minimum(hi, (pid_s + 1) * chunk)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n0, i, row_ok,
            offs_d, offs_dv, head_dim, head_dim_v, lk, off, tl.minimum(kv_end, (pid_s + 1) * chunk),
            sm_scale, softcap, wl, wr, BIAS, 0, MASK, 0, slope2, seed, 0, drop_thresh, drop_scale,
            IS_CAUSAL, HAS_WL, HAS_WR, False, False, HAS_ALIBI, HAS_SOFTCAP, False,
            True, True, BLOCK_N, PREC)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    part = ((b64 * Hq + h) * Lq + i) * n_splits + pid_s  # (B·Hq·Lq, splits) row-major
    tl.store(OP + part[:, None] * head_dim_v + offs_dv[None, :], out,
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(MP + part, tl.where(empty, float("-inf"), m_i), mask=row_ok)
    tl.store(LP + part, l_i, mask=row_ok)


@triton.jit
def _attn_decode_merge(OP, MP, LP, O, M, L2, stride_ob, stride_oh, stride_om,
                       stride_lb, stride_lh, stride_lm, Hq, Lq, head_dim_v, n_splits,
                       BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the partials of one query row through their (m, l); grid (B·Hq·Lq,)."""
    row = tl.program_id(0)
    b = row // (Hq * Lq)
    h = (row // Lq) % Hq
    i = row % Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_splits
    row64 = row.to(tl.int64)
    m_s = tl.load(MP + row64 * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(LP + row64 * n_splits + offs_s, mask=s_ok, other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = l_s * tl.exp2(m_s - m_safe)
    total = tl.sum(w, 0)
    parts = tl.load(OP + (row64 * n_splits + offs_s[:, None]) * head_dim_v + offs_dv[None, :],
                    mask=s_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(w[:, None] * parts, 0) / total_safe
    o_ptr = O + b.to(tl.int64) * stride_ob + h * stride_oh + i * stride_om
    tl.store(o_ptr + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < head_dim_v)
    l_off = b.to(tl.int64) * stride_lb + h * stride_lh + i * stride_lm
    tl.store(M + l_off, tl.where(total == 0.0, float("-inf"), m))
    tl.store(L2 + l_off, tl.log2(total_safe))


def num_splits(Lk: int, block_n: int, programs: int, device: torch.device) -> int:
    """Enough splits for about two waves of programs on the device, at most one per key block."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(Lk, block_n), 256))


def decode_forward(q, k, v, out, m, l2, prob):
    """Fill out (B, Hq, Lq, Dv), m and log2 l (B, Hq, Lq) by split-KV over the cache."""
    c = prob.call
    block_m = pow2(c.groups * c.Lq)
    block_n = INTERPRET_BLOCK if interpreting() else (64 if max(prob.block_d, prob.block_dv) <= 128 else 32)
    splits = num_splits(c.Lk, block_n, c.B * c.Hk, q.device)
    chunk = triton.cdiv(triton.cdiv(c.Lk, splits), block_n) * block_n
    splits = triton.cdiv(c.Lk, chunk)
    rows = c.B * c.Hq * c.Lq
    part_out = torch.empty(rows, splits, c.Dv, dtype=torch.float32, device=q.device)
    part_m, part_l = torch.empty(2, rows, splits, dtype=torch.float32, device=q.device)
    tune = {} if interpreting() else {"num_warps": 4, "num_stages": 3}
    _attn_decode_split[(splits, c.B * c.Hk)](
        Q=q, K=k, V=v, OP=part_out, MP=part_m, LP=part_l,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2),
        n_splits=splits, chunk=chunk, BLOCK_M=block_m, BLOCK_N=block_n, **prob.args, **tune)
    _attn_decode_merge[(rows,)](
        part_out, part_m, part_l, out, m, l2, out.stride(0), out.stride(1), out.stride(2),
        m.stride(0), m.stride(1), m.stride(2), c.Hq, c.Lq, c.Dv, splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_DV=prob.block_dv)
