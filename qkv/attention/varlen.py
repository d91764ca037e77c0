"""`attention_varlen`: attention over packed sequences, natively or through `attention`.

A backend with `forward_varlen` takes the packed rows as they are. For the others, inference
(no gradient, no dropout) runs one `attention` call per run of consecutive sequences with equal
lengths, on free views of the packed rows; training pads the batch once to (B, H, L, D) and
masks the padding. Measured on the CPU with chunked and sdpa, 32 sentences of 8..64 tokens (or
of 20..27, sorted), H=12, D=64, float32: runs are 1.1-2.9x faster than padding without
gradients, padding 1.25-1.8x faster with them (autograd pays per call).

While torch.compile traces, the offsets are never read on the host (that would break the
graph): see `_traced`.
"""

from __future__ import annotations

import torch

from qkv.attention import registry as _registry
from qkv.attention.api import attention, finish
from qkv.attention.op import attention_op
from qkv.attention.reference import compute_dtype
from qkv.attention.spec import PER_PAIR, Keywords, check_call, takes_keywords


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device=None) -> torch.Tensor:
    """`cu` as int64 offsets, or ValueError naming `name`: a 1-D (B+1,) int32/int64 tensor that
    starts at 0, never decreases and ends at the `total` packed rows (on `device` if given).

    While torch.compile traces, the values are checked by the op `qkv::checked_cu_seqlens`
    when the graph runs (same ValueError)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        got = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D (B+1,) int32 or int64 tensor, got {got}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu.dtype}")
    if device is not None and cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, q is on {device}")
    if torch.compiler.is_compiling():
        return checked_cu_seqlens(cu, total, name)
    c = cu.to(torch.int64)
    _check_offsets(name, c, total)
    return c


def _check_offsets(name: str, c: torch.Tensor, total: int) -> None:
    if int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any()):
        raise ValueError(
            f"{name} must start at 0, never decrease and end at the packed length {total}, "
            f"got {c.tolist()}"
        )


@torch.library.custom_op("qkv::checked_cu_seqlens", mutates_args=())
def checked_cu_seqlens(cu: torch.Tensor, total: int, name: str) -> torch.Tensor:
    """int64 offsets after `check_cu_seqlens`'s value check, inside a compiled graph."""
    c = cu.to(torch.int64, copy=True)
    _check_offsets(name, c, total)
    return c


@checked_cu_seqlens.register_fake
def _checked_cu_seqlens_fake(cu, total, name):
    return cu.new_empty(cu.shape, dtype=torch.int64)


def sequence_positions(cu: torch.Tensor, total: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """For the packed rows of int64 offsets `cu`: (sequence index, position inside the
    sequence), each (total,). While torch.compile traces, `total` (= cu[-1]) must be given:
    the rows find their sequence by a sorted search of the offsets, read by no host code."""
    if torch.compiler.is_compiling():
        rows = torch.arange(total, device=cu.device)
        seq = torch.searchsorted(cu[1:], rows, right=True)  # sequences ending at or before
        return seq, rows - cu[seq]
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    pos = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq]
    return seq, pos


def _pad(x: torch.Tensor, seq, pos, B: int, L: int) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, L, D) zero-padded."""
    padded = x.new_zeros(B, L, x.shape[1], x.shape[2])
    padded = padded.index_put((seq, pos), x)
    return padded.transpose(1, 2)


def _padded(q, k, v, rows_q, rows_k, call, forward, B: int, Lq: int, Lk: int):
    """One call `forward(q, k, v, call)` on the zero-padded batch, rows_* the (sequence,
    position) of each packed row; (out (total_q, Hq, Dv), lse (total_q, Hq) or None)."""
    seq_q, pos_q = rows_q
    qp = _pad(q, seq_q, pos_q, B, Lq)
    kp, vp = (_pad(x, *rows_k, B, Lk) for x in (k, v))
    out, lse = forward(qp, kp, vp, call)
    out = out.transpose(1, 2)[seq_q, pos_q]
    return out, None if lse is None else lse.transpose(1, 2)[seq_q, pos_q]


def _run_view(x: torch.Tensor, start: int, n: int, length: int) -> torch.Tensor:
    """Packed rows of n sequences of one length from `start` -> (n, H, length, D), a view."""
    return x[start:start + n * length].view(n, length, *x.shape[1:]).transpose(1, 2)


def _runs(q, k, v, cq: list[int], ck: list[int], keywords: dict):
    """One `attention` call per run of consecutive sequences of equal (lq, lk), on views."""
    outs, lses, b, B = [], [], 0, len(cq) - 1
    alibi = keywords.get("alibi_slopes")
    while b < B:
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        e = b + 1
        while e < B and (cq[e + 1] - cq[e], ck[e + 1] - ck[e]) == (lq, lk):
            e += 1
        n = e - b
        kw = dict(keywords)
        if alibi is not None and alibi.dim() == 2:
            kw["alibi_slopes"] = alibi[b:e]
        res = attention(_run_view(q, cq[b], n, lq), _run_view(k, ck[b], n, lk),
                        _run_view(v, ck[b], n, lk), **kw)
        out, lse = res if kw.get("return_lse") else (res, None)
        outs.append(out.transpose(1, 2).reshape(n * lq, q.shape[1], v.shape[2]))
        if lse is not None:
            lses.append(lse.transpose(1, 2).reshape(n * lq, q.shape[1]))
        b = e
    out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], v.shape[2])
    return out, torch.cat(lses) if lses else None


def _stand_in(x: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """A (B, H, L, D) tensor of x's dtype and device that owns no memory, for checking."""
    return x.new_zeros(()).expand(B, x.shape[1], L, x.shape[2])


def _checked(q, k, v, cq, ck, B, Lq, Lk, keywords):
    """The call of the padded batch (B, H, Lq|Lk, D) and the backend chosen for it."""
    len_q, len_k = cq.diff(), ck.diff()
    qs = _stand_in(q, B, Lq)
    call = check_call(qs, _stand_in(k, B, Lk), _stand_in(v, B, Lk), kv_lengths=len_k,
                      q_offset=len_k - len_q, varlen=True, **keywords)
    return call, _registry.choose(call, qs, keywords.get("backend", Keywords.backend))


@takes_keywords("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", exclude=PER_PAIR)
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, **keywords):
    """`attention` over packed sequences: each sequence attends only within itself.

    q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv); cu_seqlens_q and cu_seqlens_k are
    (B+1,) int32 or int64 cumulative offsets, so sequence b holds rows cu[b]:cu[b+1]. Causal and
    window are aligned bottom-right per sequence (with that sequence's own lq and lk). Returns out
    (total_q, Hq, Dv), and with `return_lse` also lse (total_q, Hq).

    Per-pair `mask`, `bias` and `kv_lengths` have no meaning for packed rows and are not accepted.
    Dropout draws the mask of the padded batch (b, h, i, j) with i, j positions inside sequence b.
    Under torch.compile the call never reads the offsets on the host, so it compiles with
    fullgraph=True and dynamic shapes, with the eager numbers; see `_traced` for its cost.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be 3-D (total, H, D) for attention_varlen, got {got}")
    cq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cq.numel() != ck.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"{cq.numel() - 1} and {ck.numel() - 1}"
        )
    B = cq.numel() - 1
    if torch.compiler.is_compiling():
        return _traced(q, k, v, cq, ck, B, keywords)
    Lq, Lk = (int(n.max()) if B else 0 for n in (cq.diff(), ck.diff()))
    call, chosen = _checked(q, k, v, cq, ck, B, Lq, Lk, keywords)
    if chosen.forward_varlen is not None:
        out, lse = chosen.forward_varlen(q, k, v, cq.to(torch.int32), ck.to(torch.int32), call)
    elif call.needs_dropout or (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        out, lse = _padded(q, k, v, sequence_positions(cq), sequence_positions(ck), call,
                           chosen.forward, B, Lq, Lk)
    else:
        out, lse = _runs(q, k, v, cq.tolist(), ck.tolist(), keywords)
    return finish(out, lse, call, q)


def _traced(q, k, v, cq, ck, B, keywords):
    """`attention_varlen` while torch.compile traces: no sequence length is read on the host.

    The packed rows become one row of Tq queries over Tk keys (free views), through the same
    custom op as `attention`, with a (Tq, Tk) bool mask built by tensor ops: query i sees key j
    when both lie in one sequence and j passes that sequence's causal and window rules, aligned
    with the per-row offset lk - lq of its sequence; ALiBi becomes a (Hq, Tq, Tk) bias of the
    same per-sequence distances. The mask costs Tq·Tk bytes, and the backend works on the whole
    Tq x Tk score matrix (blocks outside every sequence are not skipped). The op's schema
    gives no cheaper exact form: kv_lengths, q_offset, causal and window act per batch row,
    and a padded batch without a host-read longest length must pad every sequence to T, B
    times the rows (memory B·T·H·D, work B·T²). Dropout still takes that padded form, whose
    rows (b, i) are those of the eager mask. Measured on the CPU (float32, H=8, D=32, causal,
    one thread, aot_eager), forward and backward take 2x eager's time for 4 sequences of
    32..64 tokens and 11-13x for 16 of 32..64 or 8 of 128..256: a varlen op taking the
    offsets would remove that cost.
    """
    Tq, Tk = q.shape[0], k.shape[0]
    call, chosen = _checked(q, k, v, cq, ck, B, Tq, Tk, keywords)
    rows_q, rows_k = sequence_positions(cq, Tq), sequence_positions(ck, Tk)
    if call.needs_dropout:
        def through_op(qp, kp, vp, c):
            return attention_op(qp, kp, vp, c, chosen.name)

        out, lse = _padded(q, k, v, rows_q, rows_k, call, through_op, B, Tq, Tk)
        return finish(out, lse, call, q)
    (seq_q, pos_q), (seq_k, pos_k) = rows_q, rows_k
    i = (pos_q + call.q_offset[seq_q]).unsqueeze(1)  # (Tq, 1): i' inside the sequence
    j = pos_k.unsqueeze(0)  # (1, Tk)
    mask = seq_q.unsqueeze(1) == seq_k.unsqueeze(0)
    if call.causal:
        mask = mask & (j <= i)
    left, right = call.window if call.window is not None else (None, None)
    if left is not None:
        mask = mask & (j >= i - left)
    if right is not None:
        mask = mask & (j <= i + right)
    bias = None
    if call.alibi_slopes is not None:  # -slope[b, h] * |i' - j|, as masking.modify_scores
        ct = compute_dtype(q.dtype)
        slopes = call.alibi_slopes.detach().to(ct)[seq_q].t().unsqueeze(-1)  # (Hq, Tq, 1)
        bias = -(slopes * (i - j).abs().to(ct)).unsqueeze(0)
    res = attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0), mask=mask[None, None], bias=bias,
                    softcap=call.softcap, scale=call.scale, return_lse=call.return_lse,
                    backend=keywords.get("backend", Keywords.backend))
    if not call.return_lse:
        return res[0].transpose(0, 1)
    return res[0][0].transpose(0, 1), res[1][0].transpose(0, 1)
