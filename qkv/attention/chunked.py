"""The chunked backend: exact attention by online softmax over blocks, in plain PyTorch.

Forward walks query blocks of `BLOCK_M` rows and, inside each, key blocks of `BLOCK_N` columns,
keeping a running max `m`, normaliser `l` and un-normalised output `acc` per row:

    m' = max(m, rowmax(s));  p = exp(s - m');  l' = l·exp(m - m') + rowsum(p)
    acc' = acc·exp(m - m') + p @ v;            out = acc / l;  lse = m + log(l)

The autograd function saves q, k, v, out and, per row, m and log(l) (kept apart: at |s| = 1e6
a float32 lse = m + log(l) is rounded by 0.03, and every weight with it). Backward recomputes
the weights block by block from bit-identical scores, as exp(s - lse), or, in a query block
with scores past LARGE_SCORE, as exp((s - m) - log l) with delta = rowsum(P * dP) taken in one
more pass (see `_delta`). The extra memory of forward and backward is
O(B·H·BLOCK_M·BLOCK_N + n·d), never O(n²). Blocks that
causal, window or kv_lengths make empty are skipped, so causal does about half the work, and
only blocks that a mask cuts through pay for building it.

On the CPU, a call whose visibility is a band (plain, causal, window, kv_lengths, offsets,
with or without ALiBi; no bias, mask, softcap or dropout) takes the fused path: each query
block's keys are cut into pieces torch's fused CPU kernel computes whole, only the pieces a
sequence edge cuts run the Python blocks above, and the pieces merge through their lse
(pieces.py). A query block whose lse is past LARGE_SCORE is redone by the Python blocks, to
keep m and log_l apart. The backward runs the kernel's backward per piece, unless the call has
large scores: then the Python blocks.
"""

from __future__ import annotations

import torch

from qkv.attention import pieces
from qkv.attention.masking import (
    block_is_empty,
    block_is_full,
    dropout_keep,
    kv_limit,
    masked_scores,
    reduce_to,
)
from qkv.attention.reference import compute_dtype
from qkv.attention.spec import AttentionCall

BLOCK_M = 256
BLOCK_N = 512
# Query blocks with a row whose largest score |m| exceeds this rebuild the weights from m and
# log_l apart and take the exact delta of `_delta`. The error of the cheap path (one folded
# lse, delta = rowsum(dO * O)) grows like 1e-7·|m| relative to the gradients (measured on
# q = k = v, tests/attention/test_precision.py), so below 64 it stays under 1e-5.
LARGE_SCORE = 64.0


def _blocks(start: int, stop: int, size: int):
    return [(s, min(s + size, stop)) for s in range(start, stop, size)]


class _Chunked:
    """Shapes and helpers shared by forward and backward for one call."""

    def __init__(self, q, k, v, call: AttentionCall, block_m: int, block_n: int):
        self.call = call
        self.ct = compute_dtype(q.dtype)
        B, Hk, G = call.B, call.Hk, call.groups
        self.q5 = q.reshape(B, Hk, G, call.Lq, call.D)  # a view unless q is oddly strided
        self.q, self.k, self.v = q, k, v
        self.qx = self.kx = self.vx = None  # as the fused kernel takes them (`_wide`)
        rows = max(1, min(call.Lq, block_m))
        # Few query rows (decoding): widen the key blocks so each block keeps about the same
        # number of scores, instead of paying per-block overhead over a long cache.
        self.block_n = block_n * max(1, block_m // rows)
        self.rows = _blocks(0, call.Lq, block_m)
        self.cols = _blocks(0, call.Lk, self.block_n)
        self.kv_min, self.kv_max = kv_limit(call)
        self.offsets = call.offset_range()

    def q_block(self, i0, i1):
        """(B, Hk, G*bm, D) in the compute dtype, multiplied by the softmax scale."""
        c = self.call
        qb = self.q5[:, :, :, i0:i1].reshape(c.B, c.Hk, c.groups * (i1 - i0), c.D)
        return qb.to(self.ct) * c.scale

    def live_cols(self, i0, i1, keys=None):
        """Key blocks (of all keys, or of keys = (j0, j1)) with at least one visible pair, each
        with a flag: fully visible or not."""
        c = self.call
        cols = self.cols if keys is None else _blocks(*keys, self.block_n)
        return [(j0, j1, block_is_full(c, i0, i1, j0, j1, self.kv_min, self.offsets))
                for j0, j1 in cols
                if not block_is_empty(c, i0, i1, j0, j1, self.kv_max, self.offsets)]

    def scores(self, qb, i0, i1, j0, j1, full):
        """Final scores (B, Hq, bm, bn) with -inf where hidden, the K block, tanh of softcap."""
        c = self.call
        kb = self.k[:, :, j0:j1].to(self.ct)  # (B, Hk, bn, D)
        s = torch.matmul(qb, kb.transpose(-1, -2))  # (B, Hk, G*bm, bn), already scaled
        s = s.view(c.B, c.Hq, i1 - i0, j1 - j0)
        s, capped = masked_scores(c, s, i0, i1, j0, j1, full)
        return s, kb, capped

    def dropout_scale(self, i0, i1, j0, j1, device):
        """keep / (1 - p) for the block, or None without dropout."""
        c = self.call
        if not c.needs_dropout:
            return None
        keep = dropout_keep(c.dropout_seed, c.dropout_p, c.B, c.Hq, i0, i1, j0, j1, device)
        return keep.to(self.ct) / (1.0 - c.dropout_p)

    def weights_and_dp(self, qb, dob, stats, i0, i1, j0, j1, full):
        """For one block: the weights p = exp((s - m) - log_l), p after dropout, dP = dO @ V^T
        (after dropout), the K block and tanh of softcap. Shapes (B, Hq, bm, bn).

        `stats` is (m, log_l), or (m + log_l, None) where the scores are small enough that
        folding them loses nothing that matters (see LARGE_SCORE)."""
        c, bm = self.call, i1 - i0
        s, kb, capped = self.scores(qb, i0, i1, j0, j1, full)
        p = s.sub_(stats[0]) if stats[1] is None else s.sub_(stats[0]).sub_(stats[1])
        p = p.exp_()
        drop = self.dropout_scale(i0, i1, j0, j1, qb.device)
        vb = self.v[:, :, j0:j1].to(self.ct)
        dp = torch.matmul(dob, vb.transpose(-1, -2)).view(c.B, c.Hq, bm, j1 - j0)
        if drop is None:
            return p, p, dp, kb, capped
        return p, p * drop, dp.mul_(drop), kb, capped

    def grouped(self, x, rows):
        """(B, Hq, bm, n) -> (B, Hk, G*bm, n), the layout that multiplies a shared K/V head."""
        c = self.call
        return x.reshape(c.B, c.Hk, c.groups * rows, x.shape[-1])


def _online(ch, qb, i0, i1, cols):
    """Online softmax of query rows [i0, i1) (qb from `q_block`) over the key blocks `cols`:
    out (B, Hq, bm, Dv), m and log_l (B, Hq, bm), in the compute dtype. Rows that see no key get
    out 0, m -inf and log_l 0."""
    c, bm, dev = ch.call, i1 - i0, qb.device
    m = torch.full((c.B, c.Hq, bm), float("-inf"), dtype=ch.ct, device=dev)
    l = torch.zeros_like(m)
    acc = torch.zeros(c.B, c.Hk, c.groups * bm, c.Dv, dtype=ch.ct, device=dev)
    for j0, j1, full in cols:
        s, _, _ = ch.scores(qb, i0, i1, j0, j1, full)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = m_new.nan_to_num(neginf=0.0)  # a row that has seen nothing yet
        alpha = torch.exp(m - m_safe)
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()  # in place: s is not needed again
        l.mul_(alpha).add_(p.sum(dim=-1))
        drop = ch.dropout_scale(i0, i1, j0, j1, dev)
        if drop is not None:
            p = p * drop
        vb = ch.v[:, :, j0:j1].to(ch.ct)
        acc.mul_(ch.grouped(alpha.unsqueeze(-1), bm))
        acc.add_(torch.matmul(ch.grouped(p, bm), vb))
        m = m_new
    l = torch.where(l == 0, 1.0, l)
    return acc.view(c.B, c.Hq, bm, c.Dv).div_(l.unsqueeze(-1)), m, l.log_()


def chunked_forward(q, k, v, call: AttentionCall, block_m: int, block_n: int):
    """Returns out (B, Hq, Lq, Dv) in q's dtype, and the row max m and log-normaliser log_l
    (B, Hq, Lq) in the compute dtype, so lse = m + log_l. Empty rows have m = -inf, log_l = 0.
    On the fused path m holds the whole lse and log_l 0, except in blocks with large scores."""
    c = call
    if pieces.usable(c, q):
        wide = _wide(q, k, v, c, compute_dtype(q.dtype))
        parts = [_fused_half(q, k, v, wide, half, sign, block_m, block_n)
                 for half, sign in pieces.halves(c)]
        return _exact_where_large(q, k, v, c, block_m, block_n, *pieces.merge(parts))
    ch = _Chunked(q, k, v, c, block_m, block_n)
    out = torch.empty(c.B, c.Hq, c.Lq, c.Dv, dtype=q.dtype, device=q.device)
    row_max = torch.empty(c.B, c.Hq, c.Lq, dtype=ch.ct, device=q.device)
    log_l = torch.empty_like(row_max)
    for i0, i1 in ch.rows:
        res = _online(ch, ch.q_block(i0, i1), i0, i1, ch.live_cols(i0, i1))
        out[:, :, i0:i1], row_max[:, :, i0:i1], log_l[:, :, i0:i1] = res
    return out, row_max, log_l


def _one_piece(call: AttentionCall, block_m: int):
    """(group, piece) when all batch rows and query rows are one kernel call over all keys
    (plain attention, square causal), else None."""
    gs = pieces.groups(call)
    if len(gs) != 1:
        return None
    (_, _, pcs), *more = pieces.blocks(call, gs[0], block_m)
    if more or pcs is None or len(pcs) != 1 or pcs[0].kind == "masked" or (
            (pcs[0].j0, pcs[0].j1) != (0, call.Lk)):
        return None
    return gs[0], pcs[0]


def _fused_half(q, k, v, wide, call: AttentionCall, sign: int, block_m: int, block_n: int):
    """(out, lse) in the compute dtype of one half of the call (pieces.halves); `wide` is q, K
    and V as the kernel takes them (`_wide`)."""
    ct = compute_dtype(q.dtype)
    whole = _one_piece(call, block_m)
    qx, kx, vx = wide
    if whole is not None:  # one kernel call, straight into the result
        return pieces.forward(call, sign, whole[1], 0, whole[0].offset, qx, kx, vx)
    out = torch.empty(call.B, call.Hq, call.Lq, call.Dv, dtype=ct, device=q.device)
    lse = torch.empty(call.B, call.Hq, call.Lq, dtype=ct, device=q.device)
    for g in pieces.groups(call):
        r, sub = slice(g.b0, g.b1), pieces.subcall(call, g)
        ch = _Chunked(q[r], k[r], v[r], sub, block_m, block_n)
        ch.qx, ch.kx, ch.vx = qx[r], kx[r], vx[r]
        for i0, i1, pcs in pieces.blocks(sub, g, block_m):
            if pcs is None:
                o, m, log_l = _online(ch, ch.q_block(i0, i1), i0, i1, ch.live_cols(i0, i1))
                out[r, :, i0:i1], lse[r, :, i0:i1] = o, m + log_l
            else:
                out[r, :, i0:i1], lse[r, :, i0:i1] = _fused_block(ch, g, sign, i0, i1, pcs)
    return out, lse


def _wide(q, k, v, call, ct, dlse: bool = False):
    """q, K and V in the compute dtype, as the fused kernel takes them: widened by one column
    under ALiBi or for an lse gradient (`pieces.widened`); shared by both ALiBi halves."""
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    wide = call.alibi_slopes is not None or dlse
    return pieces.widened(call, q, k, v) if wide else (q, k, v)


def _fused_block(ch, g, sign, i0, i1, pcs):
    """(out, lse) of query rows [i0, i1) from their pieces, each from the fused kernel or, where
    a sequence edge cuts it, from the Python blocks."""
    c, ct = ch.call, ch.ct
    qb = ch.qx[:, :, i0:i1]
    parts = []
    for p in pcs:
        if p.kind == "masked":
            o, m, log_l = _online(ch, ch.q_block(i0, i1), i0, i1,
                                  ch.live_cols(i0, i1, (p.j0, p.j1)))
            parts.append((o, m + log_l))
        else:
            kb, vb = ch.kx[:, :, p.j0:p.j1], ch.vx[:, :, p.j0:p.j1]
            parts.append(pieces.forward(c, sign, p, i0, g.offset, qb, kb, vb))
    if not parts:  # no row sees any key
        return (torch.zeros(c.B, c.Hq, i1 - i0, c.Dv, dtype=ct, device=qb.device),
                torch.full((c.B, c.Hq, i1 - i0), float("-inf"), dtype=ct, device=qb.device))
    return pieces.merge(parts)


def _exact_where_large(q, k, v, call, block_m, block_n, out, lse):
    """(out, m, log_l) from the fused (out, lse): every block of block_m rows that holds a row
    with |lse| > LARGE_SCORE is redone by the Python blocks, so that its m and log_l stay apart
    (chunked_backward's exact path needs them); elsewhere m = lse and log_l = 0."""
    log_l = lse.new_zeros(()).expand_as(lse)  # no memory unless a block is redone
    large = (lse.abs() > LARGE_SCORE) & lse.isfinite()
    if bool(large.any()):
        log_l = torch.zeros_like(lse)
        ch = _Chunked(q, k, v, call, block_m, block_n)
        for i0, i1 in ch.rows:
            if bool(large[:, :, i0:i1].any()):
                out[:, :, i0:i1], lse[:, :, i0:i1], log_l[:, :, i0:i1] = _online(
                    ch, ch.q_block(i0, i1), i0, i1, ch.live_cols(i0, i1))
    return out.to(q.dtype).contiguous(), lse, log_l


def chunked_backward(q, k, v, out, row_max, log_l, dout, dlse, call: AttentionCall, block_m,
                     block_n, bias_grad: bool):
    """Gradients (dq, dk, dv, dbias-or-None), recomputing each block's weights.

    s is recomputed by the same operations on the same blocks as the forward. In a query block
    with scores past LARGE_SCORE the weights are p = exp((s - m) - log_l), where s - m is exact;
    folding m + log_l into one float32 lse would round it by up to |lse|·2^-24 (0.03 at
    |s| = 1e6) and every weight with it. Elsewhere that rounding is negligible and one
    subtraction of the folded lse saves a pass over each block. A fused call (module docstring)
    runs the fused kernel's backward piece by piece (an incoming lse gradient through one more
    head-dim column, `pieces.backward`), unless it has large scores: then all of it runs the
    Python blocks.
    """
    c = call
    ct = compute_dtype(q.dtype)
    m_safe = row_max.nan_to_num(neginf=0.0)  # empty rows: all their scores are -inf anyway
    large = (row_max.abs() > LARGE_SCORE) & row_max.isfinite()
    fused = pieces.usable(c, q) and not bool(large.any())
    if dlse is not None and not bool(dlse.any()):
        dlse = None
    halves = pieces.halves(c) if fused else []
    whole = _one_piece(halves[0][0], block_m) if len(halves) == 1 else None
    if whole is not None:  # one kernel call (a plain call, or causal ALiBi), no accumulation
        grads = pieces.backward(*halves[0], whole[1], 0, whole[0].offset, dout.to(ct),
                                *_wide(q, k, v, c, ct, dlse is not None), out.to(ct),
                                row_max + log_l, None if dlse is None else dlse.to(ct))
        return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True)), None)
    dq = torch.zeros(c.B, c.Hq, c.Lq, c.D, dtype=ct, device=q.device)
    dk = torch.zeros(c.B, c.Hk, c.Lk, c.D, dtype=ct, device=q.device)
    dv = torch.zeros(c.B, c.Hk, c.Lk, c.Dv, dtype=ct, device=q.device)
    dbias = torch.zeros(c.bias.shape, dtype=ct, device=q.device) if bias_grad else None
    if not fused:
        ch = _Chunked(q, k, v, c, block_m, block_n)
        state = (out, dout, dlse, m_safe, log_l, large)
        for i0, i1 in ch.rows:
            _python_grads(ch, i0, i1, ch.live_cols(i0, i1), state, (dq, dk, dv, dbias))
    wide = _wide(q, k, v, c, ct, dlse is not None) if fused else None
    for half, sign in halves:
        for g in pieces.groups(half):
            r, sub = slice(g.b0, g.b1), pieces.subcall(half, g)
            ch = _Chunked(q[r], k[r], v[r], sub, block_m, block_n)
            ch.qx, ch.kx, ch.vx = (t[r] for t in wide)
            state = (out[r], dout[r], None if dlse is None else dlse[r], m_safe[r], log_l[r],
                     large[r])
            grads = (dq[r], dk[r], dv[r], None)
            for i0, i1, pcs in pieces.blocks(sub, g, block_m):
                if pcs is None:
                    _python_grads(ch, i0, i1, ch.live_cols(i0, i1), state, grads)
                else:
                    _fused_grads(ch, g, sign, i0, i1, pcs, state, grads)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _fused_grads(ch, g, sign, i0, i1, pcs, state, grads):
    """Add the gradients of query rows [i0, i1), piece by piece."""
    c, ct = ch.call, ch.ct
    out, dout, dlse, m_safe, log_l, _ = state
    dq, dk, dv, _ = grads
    qb, dob, ob = ch.qx[:, :, i0:i1], dout[:, :, i0:i1].to(ct), out[:, :, i0:i1].to(ct)
    lse_b = m_safe[:, :, i0:i1] + log_l[:, :, i0:i1]
    dlse_b = None if dlse is None else dlse[:, :, i0:i1].to(ct)
    for p in pcs:
        if p.kind == "masked":
            _python_grads(ch, i0, i1, ch.live_cols(i0, i1, (p.j0, p.j1)), state, grads)
            continue
        kb, vb = ch.kx[:, :, p.j0:p.j1], ch.vx[:, :, p.j0:p.j1]
        dqp, dkp, dvp = pieces.backward(c, sign, p, i0, g.offset, dob, qb, kb, vb, ob, lse_b,
                                        dlse_b)
        dq[:, :, i0:i1] += dqp
        dk[:, :, p.j0:p.j1] += dkp
        dv[:, :, p.j0:p.j1] += dvp


def _python_grads(ch, i0, i1, cols, state, grads):
    """Add the gradients that query rows [i0, i1) send through the key blocks `cols`."""
    c, ct, bm = ch.call, ch.ct, i1 - i0
    out, dout, dlse, m_safe, log_l, large = state
    dq, dk, dv, dbias = grads
    qb = ch.q_block(i0, i1)  # scaled, so dK = dS^T @ (scale * Q)
    dob = ch.grouped(dout[:, :, i0:i1].to(ct), bm)  # (B, Hk, G*bm, Dv)
    dqb = torch.zeros(c.B, c.Hk, c.groups * bm, c.D, dtype=ct, device=qb.device)
    m_b, log_l_b = m_safe[:, :, i0:i1].unsqueeze(-1), log_l[:, :, i0:i1].unsqueeze(-1)
    exact = bool(large[:, :, i0:i1].any())
    stats = (m_b, log_l_b) if exact else (m_b + log_l_b, None)
    delta_b = _delta(ch, qb, dob, out, dout, stats, i0, i1, cols, exact)
    if dlse is not None:
        delta_b = delta_b - dlse[:, :, i0:i1].to(ct).unsqueeze(-1)
    for j0, j1, full in cols:
        p, pd, dp, kb, capped = ch.weights_and_dp(qb, dob, stats, i0, i1, j0, j1, full)
        dv[:, :, j0:j1] += torch.matmul(ch.grouped(pd, bm).transpose(-1, -2), dob)
        ds = dp.sub_(delta_b).mul_(p)
        if dbias is not None:
            rows = slice(i0, i1) if dbias.shape[2] != 1 else slice(0, 1)
            cols_b = slice(j0, j1) if dbias.shape[3] != 1 else slice(0, 1)
            dbias[:, :, rows, cols_b] += reduce_to(ds, dbias.shape)
        if capped is not None:
            ds = ds * (1.0 - capped * capped)
        dsg = ch.grouped(ds, bm)  # (B, Hk, G*bm, bn)
        dqb.add_(torch.matmul(dsg, kb))
        dk[:, :, j0:j1] += torch.matmul(dsg.transpose(-1, -2), qb)
    dq.view(c.B, c.Hk, c.groups, c.Lq, c.D)[:, :, :, i0:i1] += dqb.mul_(c.scale).view(
        c.B, c.Hk, c.groups, bm, c.D)


def _delta(ch, qb, dob, out, dout, stats, i0, i1, cols, exact: bool):
    """delta = rowsum(P * dP) (B, Hq, bm, 1) of one query block, for dS = P * (dP - delta).

    It equals rowsum(dO * O), one cheap product, but that rounds differently from the dP of the
    block matmuls. Where the weights are one-hot or tied, the exact dP - delta is zero, and the
    mismatch (about 2^-24 |dO| |V|) would reach dQ and dK multiplied by the scale: 0.1 relative
    at scale 1e4. So an `exact` block (one with large scores) sums P * dP from the same dP, in
    one more pass.
    """
    ct = ch.ct
    if not exact:
        return (dout[:, :, i0:i1].to(ct) * out[:, :, i0:i1].to(ct)).sum(dim=-1, keepdim=True)
    delta = 0.0
    for j0, j1, full in cols:
        p, _, dp, _, _ = ch.weights_and_dp(qb, dob, stats, i0, i1, j0, j1, full)
        delta = delta + (p * dp).sum(dim=-1, keepdim=True)  # dP carries the dropout scale
    return delta


class ChunkedAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and each row's m and log_l; backward recomputes
    the weights."""

    @staticmethod
    def forward(ctx, q, k, v, bias, call, block_m, block_n):
        out, row_max, log_l = chunked_forward(q, k, v, call, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, row_max, log_l)
        ctx.call, ctx.block_m, ctx.block_n = call, block_m, block_n
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.set_materialize_grads(False)  # no zero dlse when the lse goes unused
        if log_l.stride() == (0, 0, 0):  # the fused path's m is the lse itself
            return out, row_max
        return out, row_max + log_l  # -inf for empty rows

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, row_max, log_l = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dbias = chunked_backward(
            q, k, v, out, row_max, log_l, dout, dlse, ctx.call, ctx.block_m, ctx.block_n,
            ctx.bias_grad,
        )
        if dbias is not None:
            dbias = dbias.to(ctx.call.bias.dtype)
        return dq, dk, dv, dbias, None, None, None


def forward(q, k, v, call: AttentionCall):
    """Entry point used by the backend registry: (out, lse)."""
    return ChunkedAttention.apply(q, k, v, call.bias, call, BLOCK_M, BLOCK_N)
