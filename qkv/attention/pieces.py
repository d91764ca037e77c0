"""A query block's visible keys, cut into pieces that torch's fused CPU kernel takes whole.

For a call whose visibility is a band (causal, window, kv_lengths, offsets) and that has no
bias, mask, softcap or dropout (ALiBi below), query row i sees the keys [lo(i), hi(i)) where
both ends rise by one per row (i' = i + offset; lo = i' - left, hi = i' + right + 1, right = 0
when causal). The keys of a query block [i0, i1) of bm rows then split into:

    anticausal band  [lo(i0), lo(i0) + bm)        row r sees columns c >= r
    full             [lo(i0) + bm, hi(i0) - 1)    every row sees every key
    causal band      [hi(i0) - 1, hi(i0) - 1 + bm)  row r sees columns c <= r

each cut to the keys [0, K) of the batch rows at hand (K = their kv_length). torch's CPU flash
kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, the kernel F.scaled_dot_product_
attention runs) computes a full piece, and a causal band with `is_causal`, whose mask is
top-left aligned: exactly that triangle. An anticausal band is a causal one with its rows and
columns reversed. A band that 0 or K cuts is "masked": chunked.py's Python blocks compute it.

ALiBi, -slope·|i' - j|, is a line in j on each side of the diagonal, so the call splits into two
halves that are bands themselves: keys j <= i' (the call made causal, sign +1) and keys
j >= i' + 1 (a window whose left end is i' + 1, sign -1). On a half the bias is
a·(j - c) + a·(c - i') with a = sign·slope and c a key of the piece next to the diagonal: the
kernel gets it as one more head-dim column, q' = [q, slope/scale] and k' = [k, sign·(j - c)]
(v gets a zero column; q, K and V are widened once and shared by both halves), and a·(c - i')
is added to the piece's lse. Query blocks stay short (ALIBI_SPAN) and c sits in the middle of a
band or at the diagonal end of a full piece, so the column's term is small next to the diagonal,
and large only for far keys, whose weights exp(-slope·distance) it makes small anyway.

The pieces' (out, lse) merge exactly: lse = log sum_p exp(lse_p), out = sum_p exp(lse_p - lse)
out_p. Backward, the kernel's backward of one piece, handed the merged out and lse, returns
exactly that piece's share of dQ, dK and dV: the weights it rebuilds are exp(s - lse) with the
merged lse, and its delta, rowsum(dO * out), is the merged one. A gradient of the lse enters
that delta through one more head-dim column (`backward`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qkv.attention.spec import AttentionCall

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# The narrowest band worth a kernel call: a window narrower than this (left + right) leaves
# query blocks so short that the Python blocks do them faster than many tiny calls.
MIN_ROWS = 16
# Under ALiBi a query block has at most ALIBI_SPAN / slope rows (a power of two), so the column
# adds at most slope·rows/2 = ALIBI_SPAN/2 to the scores next to the diagonal, which float32
# rounds by 2^-24 of it: 4e-6. Standard slopes (at most 1/2) keep blocks of 256 rows.
ALIBI_SPAN = 128.0


@dataclass(frozen=True)
class Piece:
    """Keys [j0, j1) of a query block; kind "full", "causal", "anticausal" or "masked"."""

    j0: int
    j1: int
    kind: str


@dataclass(frozen=True)
class Group:
    """Batch rows [b0, b1) that share their number of keys and their query offset."""

    b0: int
    b1: int
    keys: int
    offset: int


def usable(call: AttentionCall, q: torch.Tensor) -> bool:
    """Whether the call's visibility is a band the fused kernel can compute piece by piece."""
    return (q.device.type == "cpu" and call.bias is None
            and call.mask is None and call.softcap is None and not call.needs_dropout
            and call.Dv == call.D and call.Lq > 0 and call.Lk > 0)


def groups(call: AttentionCall) -> list[Group]:
    """Runs of consecutive batch rows with the same kv_length and query offset."""
    keys = call.kv_lengths.tolist() if call.kv_lengths is not None else [call.Lk] * call.B
    offsets = (call.q_offset.tolist() if call.q_offset is not None
               else [call.Lk - call.Lq] * call.B)
    out, b0 = [], 0
    for b in range(1, call.B + 1):
        if b == call.B or (keys[b], offsets[b]) != (keys[b0], offsets[b0]):
            out.append(Group(b0, b, keys[b0], offsets[b0]))
            b0 = b
    return out


def subcall(call: AttentionCall, g: Group) -> AttentionCall:
    """The call restricted to the group's batch rows."""
    rows = slice(g.b0, g.b1)
    return dataclasses.replace(
        call, B=g.b1 - g.b0,
        kv_lengths=None if call.kv_lengths is None else call.kv_lengths[rows],
        q_offset=None if call.q_offset is None else call.q_offset[rows],
        alibi_slopes=None if call.alibi_slopes is None else call.alibi_slopes[rows])


def halves(call: AttentionCall) -> list[tuple[AttentionCall, int]]:
    """[(call, sign)]: the call itself (sign 0) without ALiBi; with it, the keys left of and on
    the diagonal (sign +1) and, unless causal, those right of it (sign -1)."""
    if call.alibi_slopes is None:
        return [(call, 0)]
    left, right = call.window if call.window is not None else (None, None)
    out = [(dataclasses.replace(call, causal=True), 1)]
    if not call.causal and (right is None or right >= 1):
        out.append((dataclasses.replace(call, window=(-1, right)), -1))
    return out


def _reach(call: AttentionCall) -> tuple[int | None, int | None]:
    """(left, right): row i sees keys [i' - left, i' + right]; None where unbounded (left is
    -1 in the right half of an ALiBi call)."""
    left, right = call.window if call.window is not None else (None, None)
    if call.causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _band(start: int, bm: int, kind: str, keys: int) -> Piece | None:
    a, b = max(start, 0), min(start + bm, keys)
    if a >= b:
        return None
    if bm == 1:  # one column, seen by the one row
        return Piece(a, b, "full")
    return Piece(a, b, kind if (a, b) == (start, start + bm) else "masked")


def plan(call: AttentionCall, g: Group, i0: int, i1: int) -> list[Piece] | None:
    """The pieces of query rows [i0, i1) of the group, in key order; None when the two bands
    would overlap (a window narrower than the block)."""
    bm, p0 = i1 - i0, i0 + g.offset
    left, right = _reach(call)
    lo = 0 if left is None else p0 - left + bm  # the full part is [lo, hi)
    hi = g.keys if right is None else p0 + right
    if left is not None and right is not None and lo > hi:
        return None
    bands = [] if left is None else [_band(p0 - left, bm, "anticausal", g.keys)]
    full = Piece(max(lo, 0), min(hi, g.keys), "full")
    bands += [full if full.j0 < full.j1 else None]
    bands += [] if right is None else [_band(p0 + right, bm, "causal", g.keys)]
    out: list[Piece] = []
    for p in bands:
        if p is None:
            continue
        if out and out[-1].kind == p.kind == "full" and out[-1].j1 == p.j0:
            p = Piece(out.pop().j0, p.j1, "full")
        out.append(p)
    return out


def blocks(call: AttentionCall, g: Group, block_m: int, whole: bool = True):
    """[(i0, i1, pieces or None)] covering the query rows: one block of all rows when no piece
    of it is masked (and `whole`), else blocks of block_m rows (fewer for a narrow window)."""
    if call.alibi_slopes is not None:  # short blocks keep ALiBi's column small (ALIBI_SPAN)
        steepest = float(call.alibi_slopes.abs().max()) if call.B else 0.0
        rows = ALIBI_SPAN / steepest if steepest > 0 else block_m
        whole, block_m = False, max(MIN_ROWS, min(block_m, 1 << int(rows).bit_length() - 1))
    if whole:
        pieces = plan(call, g, 0, call.Lq)
        if pieces is not None and all(p.kind != "masked" for p in pieces):
            return [(0, call.Lq, pieces)]
    left, right = _reach(call)
    bm = block_m
    if left is not None and right is not None and left + right >= MIN_ROWS:
        while bm > left + right:
            bm //= 2
    return [(i0, min(i0 + bm, call.Lq), plan(call, g, i0, min(i0 + bm, call.Lq)))
            for i0 in range(0, call.Lq, bm)]


def _flip(kind: str, *tensors):
    """Reverse the rows of an anticausal band's tensors (dim 2, or the last dim of an lse)."""
    if kind != "anticausal":
        return tensors
    return tuple(t.flip(2 if t.dim() == 4 else -1) for t in tensors)


def widen(t: torch.Tensor, column=0.0) -> torch.Tensor:
    """t (B, H, n, D) with one more head-dim column (broadcast from `column`)."""
    return torch.cat((t, torch.as_tensor(column, dtype=t.dtype).expand(*t.shape[:3], 1)), -1)


def widened(call: AttentionCall, q, k, v):
    """q, k and v widened once per call: with ALiBi q's column is slope/scale and K's is written
    by each piece in place (`_alibi`); all else is zero (see `backward` for dlse)."""
    if call.alibi_slopes is None:
        return widen(q), widen(k), widen(v)
    slopes = call.alibi_slopes.to(q.dtype) / call.scale  # (B, Hq)
    return widen(q, slopes[:, :, None, None]), widen(k), widen(v)


def _alibi(call: AttentionCall, sign: int, p: Piece, i0: int, offset: int, qb, kb):
    """Write ALiBi's column of the piece into the widened kb (module docstring); return the
    shift of each row's lse."""
    # c: the key next to the diagonal of a full piece, the middle of a band.
    c = (p.j0 + p.j1) // 2 if p.kind != "full" else p.j1 - 1 if sign > 0 else p.j0
    kb[..., -1] = torch.arange(sign * (p.j0 - c), sign * (p.j1 - c), sign, dtype=qb.dtype,
                               device=qb.device)
    rows = torch.arange(i0 + offset, i0 + qb.shape[2] + offset, dtype=qb.dtype, device=qb.device)
    a = sign * call.alibi_slopes.to(qb.dtype)  # (B, Hq)
    return a[:, :, None] * (c - rows)


def forward(call: AttentionCall, sign: int, p: Piece, i0: int, offset: int, qb, kb, vb):
    """(out, lse) of one kernel piece, keys [p.j0, p.j1) of the rows [i0, i0 + bm) of qb
    (B, Hq, bm, D); kb and vb (B, Hk, n, D); all three `widened` in an ALiBi half (sign != 0)."""
    shift = _alibi(call, sign, p, i0, offset, qb, kb) if sign else None
    qb, kb, vb = _flip(p.kind, qb, kb, vb)
    out, lse = _flip(p.kind, *FLASH(qb, kb, vb, 0.0, p.kind != "full", scale=call.scale))
    if shift is None:
        return out, lse
    return out[..., :-1], lse + shift


def backward(call: AttentionCall, sign: int, p: Piece, i0: int, offset: int, dob, qb, kb, vb, ob,
             lseb, dlse=None):
    """(dq, dk, dv) of one kernel piece, given the merged out ob and lse lseb of its rows; kb and
    vb as in `forward`.

    With a gradient dlse of the lse (B, Hq, bm), q, k and v come widened (by zeros, or ALiBi's
    column): the kernel's dS = P * (dP - rowsum(dO * O)) then needs dO' = [dO, 1] and
    O' = [O, -dlse], which leave dP alone (V's extra column is zero) and make the delta
    rowsum(dO * O) - dlse, the delta of attention whose lse is used too."""
    wide = sign or dlse is not None
    if sign:
        lseb = lseb - _alibi(call, sign, p, i0, offset, qb, kb)
    if wide:
        dob = widen(dob, 0.0 if dlse is None else 1.0)
        ob = widen(ob, 0.0 if dlse is None else -dlse.unsqueeze(-1))
    dob, qb, kb, vb, ob, lseb = _flip(p.kind, dob, qb, kb, vb, ob, lseb)
    grads = FLASH_BACKWARD(dob.contiguous(), qb, kb, vb, ob.contiguous(), lseb.contiguous(), 0.0,
                           p.kind != "full", scale=call.scale)
    grads = _flip(p.kind, *grads)
    return tuple(g[..., :-1] for g in grads) if wide else grads


def merge(parts):
    """Merge pieces' (out (B, H, bm, D), lse (B, H, bm)) into those of all their keys. Rows that
    no piece sees keep out 0 and lse -inf."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([lse for _, lse in parts]).logsumexp(0)
    base = torch.where(lse.isfinite(), lse, 0.0)
    out = sum(o * (lse_p - base).exp().unsqueeze(-1) for o, lse_p in parts)
    return out, lse
