"""Decode kernels: split-KV attention for a few queries (Lq <= 16) over a long cache.

A decode step has too few query rows to fill the GPU with one program per query block, so the
cache is cut into `splits` chunks of keys. Each program takes one chunk of one K/V head, and
stacks the queries of every head in its group as rows (G·Lq rows), so each K/V tile is read once
for the whole group. It writes a partial (out, m, l) (log2 domain); a second small kernel merges
the partials into the forward's saved statistics (row max m and log2 of the row sum):

    m = max_s m_s;   w_s = l_s · exp2(m_s - m);   l = Σ_s w_s;   out = Σ_s w_s · out_s / l

Decode never sees bias, mask, dropout or packed sequences (`function.use_decode`).
"""

import torch
import triton
import triton.language as tl

from qkv.attention.triton.kernels_common import _program, _slopes2
from qkv.attention.triton.kernels_fwd import _fwd_range
from qkv.attention.triton.launch import INTERPRET_BLOCK, interpreting, pow2


@triton.jit
def _attn_decode_split(
    Q, K, V, OP, MP, LP,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    KVLEN, QOFF, SLOPES, Hq, G, Lq, Lk, head_dim, head_dim_v,
    sm_scale, softcap, wl, wr, n_splits, chunk,
    IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Partial (out, m, l) of keys [split·chunk, (split+1)·chunk); grid (splits, B·Hk)."""
    pid_s = tl.program_id(0)
    # Padded tensors only: every sequence starts at 0 and is Lq, Lk long.
    b, hk, _, _, _, _, off, kv_end = _program(
        Hq // G, None, None, KVLEN, QOFF, Lq, Lk, False, HAS_KVLEN, HAS_QOFF)
    rows = tl.arange(0, BLOCK_M)  # row r is query i = r % Lq of head hk·G + r // Lq
    row_ok = rows < G * Lq
    i = rows % Lq
    h = hk * G + tl.minimum(rows // Lq, G - 1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < head_dim),
                other=0.0)  # (G·Lq rows, D)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    slope2 = _slopes2(b, h, rows, Hq, SLOPES, HAS_ALIBI)

    lo = pid_s * chunk
    hi = tl.minimum(kv_end, (pid_s + 1) * chunk)
    if HAS_WL:
        lo = tl.maximum(lo, off - wl)
    if IS_CAUSAL:
        hi = tl.minimum(hi, Lq + off)
    if HAS_WR:
        hi = tl.minimum(hi, Lq + off + wr)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Every block is a boundary block here (rows of several queries, a chunk end); no bias,
    # mask or dropout (their pointers are never read).
    acc, l_i, m_i = _fwd_range(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo // BLOCK_N * BLOCK_N, hi,
        i, row_ok, Lk, off, tl.minimum(kv_end, (pid_s + 1) * chunk), head_dim, head_dim_v,
        sm_scale, softcap, wl, wr, Q, 0, Q, 0, slope2, 0, 0, 0, 1.0,
        IS_CAUSAL, HAS_WL, HAS_WR, False, False, HAS_ALIBI, HAS_SOFTCAP, False,
        True, BLOCK_N, PREC)
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    part = ((b64 * Hq + h) * Lq + i) * n_splits + pid_s  # (B·Hq·Lq, splits)
    tl.store(OP + part[:, None] * head_dim_v + offs_dv[None, :], out,
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(MP + part, tl.where(empty, float("-inf"), m_i), mask=row_ok)
    tl.store(LP + part, l_i, mask=row_ok)


@triton.jit
def _attn_decode_merge(OP, MP, LP, O, M, L2, head_dim_v, n_splits,
                       BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the partials of query row r of the dense (B·Hq·Lq) rows; grid (B·Hq·Lq,)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < n_splits
    m_s = tl.load(MP + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(LP + row * n_splits + offs_s, mask=s_ok, other=0.0)
    m = tl.max(m_s, 0)
    w = l_s * tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(w, 0)
    parts = tl.load(OP + (row * n_splits + offs_s[:, None]) * head_dim_v + offs_dv[None, :],
                    mask=s_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(w[:, None] * parts, 0) / total_safe
    tl.store(O + row * head_dim_v + offs_dv, out.to(O.dtype.element_ty), mask=offs_dv < head_dim_v)
    tl.store(M + row, tl.where(total == 0.0, float("-inf"), m))
    tl.store(L2 + row, tl.log2(total_safe))


def num_splits(Lk: int, block_n: int, programs: int, device: torch.device) -> int:
    """Enough splits for about two waves of programs on the device, at most one per key block."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, triton.cdiv(Lk, block_n), 256))


def split_config(fp32: bool, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages) of decode split: the largest key block that compiles without a
    spill for sm_90 and sm_80 in every feature set, a 64-row GQA stack included
    (benchmarks/RESULTS.md, the compile check of 2026-11-30). fp32's ieee dots hold twice the
    registers: 8 warps and short key blocks (at D = 128, 32 keys spilled 2.1 KB on sm_90 and
    the old 64 keys x 3 stages needed 176-200 KB of shared memory, over sm_80's 163 KB)."""
    if fp32:
        return (32, 8, 2) if head_dim <= 64 else (16, 8, 2)
    return (64, 4, 3) if head_dim <= 128 else (32, 8, 2)


def decode_forward(q, k, v, out, m, l2, prob):
    """Fill out (B, Hq, Lq, Dv), m and log2 l (B, Hq, Lq), all dense, by split-KV over the cache."""
    c = prob.call
    block_m = pow2(c.groups * c.Lq)
    block_n, warps, stages = split_config(q.dtype == torch.float32,
                                          max(prob.block_d, prob.block_dv))
    block_n = INTERPRET_BLOCK if interpreting() else block_n
    splits = num_splits(c.Lk, block_n, c.B * c.Hk, q.device)
    chunk = triton.cdiv(triton.cdiv(c.Lk, splits), block_n) * block_n
    splits = triton.cdiv(c.Lk, chunk)
    rows = c.B * c.Hq * c.Lq
    part_out = torch.empty(rows, splits, c.Dv, dtype=torch.float32, device=q.device)
    part_m, part_l = torch.empty(2, rows, splits, dtype=torch.float32, device=q.device)
    tune = {} if interpreting() else {"num_warps": warps, "num_stages": stages}
    _attn_decode_split[(splits, c.B * c.Hk)](
        q, k, v, part_out, part_m, part_l, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        **prob.cache, **prob.window, **prob.score, **prob.shape,
        n_splits=splits, chunk=chunk, BLOCK_M=block_m, BLOCK_N=block_n, **tune)
    _attn_decode_merge[(rows,)](part_out, part_m, part_l, out, m, l2, c.Dv, splits,
                                BLOCK_S=max(2, triton.next_power_of_2(splits)),
                                BLOCK_DV=prob.block_dv)
