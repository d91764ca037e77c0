"""Triton helpers shared by the forward, backward and decode kernels.

Scores live in the log2 domain: s2 = s · log2(e), so every exponential is an `exp2`. The mask
semantics are those of `qkv.attention.masking` (DESIGN.md), written once here for the kernels:

    s  = scale · q·k                          (softcap: s = softcap · tanh(s / softcap))
    s += bias[b, h, i, j]                     if HAS_BIAS
    s -= slope[b, h] · |i + off - j|          if HAS_ALIBI  (off = bottom-right shift Lk - Lq)
    s  = -inf where j >= kv_end, or causal / window / bool mask hide the pair

Dropout draws the counter-based hash of `masking.dropout_keep` in uint32 arithmetic.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural-log scores to the log2 domain
# Under every int32 query position i + off, so comparing ip with it only widens vis to (BM, BN).
BELOW_ANY_POSITION = tl.constexpr(-2147483647)


@triton.jit
def _seq_bounds(b, CU, L, IS_VARLEN: tl.constexpr):
    """(start, length) of sequence b: packed ones start at cu_seqlens[b], padded ones at 0."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = b * 0
        length = b * 0 + L
    return start, length


@triton.jit
def _seq_shift(b, lq, lk, KVLEN, QOFF, HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr):
    """(off, kv_end) of batch row b: the bottom-right shift i' = i + off, and the number of keys
    that may be visible at all."""
    off = lk - lq
    if HAS_QOFF:
        off = tl.load(QOFF + b)
    kv_end = lk
    if HAS_KVLEN:
        kv_end = tl.minimum(lk, tl.load(KVLEN + b))
    return off, kv_end


@triton.jit
def _program(heads, CU_Q, CU_K, KVLEN, QOFF, Lq, Lk,
             IS_VARLEN: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_QOFF: tl.constexpr):
    """(b, h, q_start, lq, k_start, lk, off, kv_end) of this program, whose grid axis 1 runs
    over B·heads: its batch row b and head h, where b's queries and keys start and how many
    there are (`_seq_bounds`), and b's shift and visible keys (`_seq_shift`)."""
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    q_start, lq = _seq_bounds(b, CU_Q, Lq, IS_VARLEN)
    k_start, lk = _seq_bounds(b, CU_K, Lk, IS_VARLEN)
    off, kv_end = _seq_shift(b, lq, lk, KVLEN, QOFF, HAS_KVLEN, HAS_QOFF)
    return b, h, q_start, lq, k_start, lk, off, kv_end


@triton.jit
def _block(length, BLOCK: tl.constexpr):
    """(first, offs, ok) of this program's block along grid axis 0: its first position, the
    BLOCK positions from there, and which of them are < length."""
    first = tl.program_id(0) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    return first, offs, offs < length


@triton.jit
def _base(X, b, h, start, stride_b, stride_h, stride_l):
    """Pointer to position 0 of sequence b, head h of a padded (B, H, L, D) or packed
    (total, H, D) tensor (packed: stride_b = 0, `start` = cu_seqlens[b])."""
    return X + b.to(tl.int64) * stride_b + h * stride_h + start.to(tl.int64) * stride_l


@triton.jit
def _rows(b, h, start, offs, H, L, IS_VARLEN: tl.constexpr):
    """Row numbers of positions `offs` of (b, h) in a tensor we allocate dense: (B, H, L, ·)
    padded, (total, H, ·) packed. Outputs, gradients and row statistics are indexed this way."""
    if IS_VARLEN:
        return (start.to(tl.int64) + offs) * H + h
    return (b.to(tl.int64) * H + h) * L + offs


@triton.jit
def _load_rows(base, offs, stride, offs_d, ok, dim):
    """A (len(offs), D) tile of rows `offs` from `base`; zeros outside `ok` and past `dim`."""
    return tl.load(base + offs[:, None] * stride + offs_d[None, :],
                   mask=ok[:, None] & (offs_d[None, :] < dim), other=0.0)


@triton.jit
def _load_kT(k_base, offs_n, stride_kn, offs_d, col_ok, head_dim):
    """Keys offs_n as a (D, BN) tile, loaded transposed: every kernel then computes q·kᵀ as
    the same dot of the same operands, so the backward rebuilds the forward's scores exactly."""
    return tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                   mask=col_ok[None, :] & (offs_d[:, None] < head_dim), other=0.0)


@triton.jit
def _head_rows(b, h, offs_m, Hq, BIAS, stride_bias_b, stride_bias_h, stride_bias_m,
               MASK, stride_mask_b, stride_mask_h, stride_mask_m, SLOPES,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Per-row pointers to the bias and mask rows of query rows offs_m of head h (offs_m
    itself where there is none: never read), and the (BM,) ALiBi slope times log2(e)."""
    b64 = b.to(tl.int64)
    bias_rows = offs_m
    if HAS_BIAS:
        bias_rows = BIAS + b64 * stride_bias_b + h * stride_bias_h + offs_m * stride_bias_m
    mask_rows = offs_m
    if HAS_MASK:
        mask_rows = MASK + b64 * stride_mask_b + h * stride_mask_h + offs_m * stride_mask_m
    return bias_rows, mask_rows, _slopes2(b, h, offs_m, Hq, SLOPES, HAS_ALIBI)


@triton.jit
def _slopes2(b, h, offs_m, Hq, SLOPES, HAS_ALIBI: tl.constexpr):
    """(BM,) ALiBi slopes of rows offs_m (of head h, a scalar or one per row) times log2(e)."""
    slope2 = tl.zeros(offs_m.shape, dtype=tl.float32)
    if HAS_ALIBI:
        slope2 += tl.load(SLOPES + b * Hq + h).to(tl.float32) * LOG2E
    return slope2


@triton.jit
def _stage_bounds(STAGE: tl.constexpr, start, mid_lo, mid_hi, hi):
    """Block range of stage 0 (leading boundary blocks), 1 (fully visible) or 2 (trailing
    boundary blocks) of a `_key_range` / `_query_range` split."""
    lo = mid_lo if STAGE == 1 else (mid_hi if STAGE == 2 else start)
    end = mid_lo if STAGE == 0 else (mid_hi if STAGE == 1 else hi)
    return lo, end


@triton.jit
def _key_range(m0, lq, off, kv_end, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Key blocks for query rows [m0, m0 + BLOCK_M): (start, mid_lo, mid_hi, hi).

    Blocks in [start, mid_lo) and [mid_hi, hi) need element masks; blocks in [mid_lo, mid_hi)
    are fully visible for every row. Blocks outside [start, hi) are empty and never visited.
    """
    i_min = m0
    i_max = tl.minimum(m0 + BLOCK_M, lq) - 1
    lo = m0 * 0
    hi = kv_end + m0 * 0
    if HAS_WL:
        lo = tl.maximum(i_min + off - wl, 0)
    if IS_CAUSAL:
        hi = tl.minimum(hi, i_max + off + 1)
    if HAS_WR:
        hi = tl.minimum(hi, i_max + off + wr + 1)
    start = lo // BLOCK_N * BLOCK_N
    full_lo = start
    if HAS_WL:
        full_lo = tl.maximum(full_lo, (tl.maximum(i_max + off - wl, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(kv_end, 0) // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, tl.maximum(i_min + off + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_WR:
        full_hi = tl.minimum(full_hi, tl.maximum(i_min + off + wr + 1, 0) // BLOCK_N * BLOCK_N)
    ok = full_lo < full_hi
    edge = tl.maximum(hi, start)
    mid_lo = tl.where(ok, full_lo, edge)
    mid_hi = tl.where(ok, full_hi, edge)
    return start, mid_lo, mid_hi, hi


@triton.jit
def _query_range(n0, lq, off, kv_end, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Query blocks that see keys [n0, n0 + BLOCK_N): (start, mid_lo, mid_hi, hi), as `_key_range`."""
    j_min = n0
    j_max = tl.minimum(n0 + BLOCK_N, kv_end) - 1
    lo = n0 * 0
    hi = lq + n0 * 0
    if IS_CAUSAL:
        lo = tl.maximum(lo, j_min - off)
    if HAS_WR:
        lo = tl.maximum(lo, j_min - off - wr)
    if HAS_WL:
        hi = tl.minimum(hi, j_max + wl - off + 1)
    hi = tl.where(n0 < kv_end, hi, 0)  # keys past kv_end are seen by no query
    start = lo // BLOCK_M * BLOCK_M
    full_lo = start
    if IS_CAUSAL:
        full_lo = tl.maximum(full_lo, (tl.maximum(n0 + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    if HAS_WR:
        full_lo = tl.maximum(full_lo, (tl.maximum(n0 + BLOCK_N - 1 - off - wr, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    full_hi = hi
    if HAS_WL:
        full_hi = tl.minimum(hi, tl.maximum(n0 + wl - off + 1, 0) // BLOCK_M * BLOCK_M)
    ok = (full_lo < full_hi) & (n0 + BLOCK_N <= kv_end)
    edge = tl.maximum(hi, start)
    mid_lo = tl.where(ok, full_lo, edge)
    mid_hi = tl.where(ok, full_hi, edge)
    return start, mid_lo, mid_hi, hi


@triton.jit
def _scores(q, kT, offs_m, offs_n, row_ok, col_ok, off, kv_end, sm_scale, softcap, wl, wr,
            bias_rows, stride_bias_n, mask_rows, stride_mask_n, slope2,
            IS_CAUSAL: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Log2-domain scores of the (BM, BN) tile q·kᵀ, -inf where not visible; and tanh of the cap.

    `bias_rows` / `mask_rows` are (BM,) pointers to the start of each row's bias / mask;
    `slope2` is the (BM,) ALiBi slope times log2(e). MASKED applies causal, window and kv_end.
    """
    qk = tl.dot(q, kT, input_precision=PREC)  # (BM, BN) fp32
    t = qk
    if HAS_SOFTCAP:
        x = qk * (sm_scale / softcap)
        t = 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)  # tanh(x)
        s = t * (softcap * LOG2E)
    else:
        s = qk * (sm_scale * LOG2E)
    if HAS_BIAS:
        bias = tl.load(bias_rows[:, None] + offs_n[None, :] * stride_bias_n,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s += bias.to(tl.float32) * LOG2E
    if HAS_ALIBI:
        dist = tl.abs((offs_m + off)[:, None] - offs_n[None, :]).to(tl.float32)
        s -= slope2[:, None] * dist
    if MASKED:
        ip = (offs_m + off)[:, None]
        j = offs_n[None, :]
        vis = (j < kv_end) & (ip > BELOW_ANY_POSITION)
        if IS_CAUSAL:
            vis = vis & (j <= ip)
        if HAS_WL:
            vis = vis & (j >= ip - wl)
        if HAS_WR:
            vis = vis & (j <= ip + wr)
        s = tl.where(vis, s, float("-inf"))
    if HAS_MASK:
        keep = tl.load(mask_rows[:, None] + offs_n[None, :] * stride_mask_n,
                       mask=row_ok[:, None] & col_ok[None, :], other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    return s, t


@triton.jit
def _mix32(x):
    """The 32-bit finaliser of `masking._mix32`, in wrapping uint32 arithmetic."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, thresh):
    """Bool (BM, BN): hash(seed, b·Hq + h, i, j) >> 8 >= thresh, thresh = ceil(p · 2^24)."""
    x = _mix32((seed + bh * 0).to(tl.uint32) ^ bh.to(tl.uint32))
    x = _mix32(x ^ offs_m.to(tl.uint32))
    x = _mix32(x[:, None] ^ offs_n.to(tl.uint32)[None, :])
    return (x >> 8).to(tl.int32) >= thresh
