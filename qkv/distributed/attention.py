"""Exact attention over a sequence whose queries, keys and values are sharded across the ranks
of a process group (context parallelism), by a ring that passes K/V blocks point to point.

Forward: each rank keeps its query shard and, over N steps, sees the K/V shard of every rank
in turn (its own first), sending the block it holds to the next rank while it computes. Each
(query chunk, key chunk) pair is one `qkv.attention` call that returns (out_b, lse_b); the
partial results merge through their lse:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) · out_a + exp(lse_b - lse) · out_b

with each weight taken as 0 where its lse is -inf, so a chunk that sees no key, or a row that
sees none at all (lse -inf, out 0), never makes a NaN.

Backward: the K/V blocks travel the ring again, each with an accumulator of its dK/dV that every
rank adds its queries' share to; after N steps the accumulator arrives back at the rank that
owns the block. A pair's share is the gradient of qkv.attention recomputed on that pair with
the upstream gradients of the merge: dout_b = w·dout and dlse_b = w·(<dout, out_b - out> +
dlse), w = exp(lse_b - lse). Memory per rank is linear in its shard: its own Q, K, V, out and
lse, plus two K/V blocks (and two dK/dV accumulators) in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import qkv
from qkv.attention.spec import check_call
from qkv.distributed.ring import GRAD_TAG, KV_TAG, Ring
from qkv.distributed.sharding import LAYOUTS, check_layout, chunk_ids, chunks_per_rank

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Pair:
    """One (query chunk, key chunk) pair a rank computes: slices of its Q and of the K/V block,
    whether it is the causal diagonal, and where the key chunk starts in the sequence."""

    q: slice
    k: slice
    causal: bool
    k_start: int


@dataclass(frozen=True)
class _Plan:
    """Everything one call's forward and backward share."""

    ring: Ring
    layout: str
    causal: bool
    scale: float
    softcap: float | None
    backend: str
    q_chunk: int  # rows of one query chunk
    k_chunk: int  # rows of one key chunk
    kv_lengths: tuple[int, ...] | None  # the same on every rank

    def pairs(self, source: int) -> list[_Pair]:
        """The pairs of this rank's queries with the K/V block of group rank `source` that hold
        a visible key. Under causal, chunk a sees chunk b fully if b < a, causally if b == a,
        and not at all if b > a."""
        n = self.ring.size
        pairs = []
        for a, qa in enumerate(chunk_ids(self.ring.rank, n, self.layout)):
            for b, kb in enumerate(chunk_ids(source, n, self.layout)):
                start = kb * self.k_chunk
                if self.causal and kb > qa:
                    continue
                if self.kv_lengths is not None and max(self.kv_lengths, default=0) <= start:
                    continue  # every key of the chunk is padding
                pairs.append(_Pair(slice(a * self.q_chunk, (a + 1) * self.q_chunk),
                                   slice(b * self.k_chunk, (b + 1) * self.k_chunk),
                                   self.causal and kb == qa, start))
        return pairs

    def attend(self, q, k, v, pair: _Pair, kv_lengths):
        """(out_b, lse_b) of one pair, given its query chunk and its K/V chunk."""
        if kv_lengths is not None:
            kv_lengths = (kv_lengths - pair.k_start).clamp(0, self.k_chunk)
        return qkv.attention(q, k, v, causal=pair.causal, kv_lengths=kv_lengths,
                             softcap=self.softcap, scale=self.scale, return_lse=True,
                             backend=self.backend)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight(part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """exp(part - total), and 0 where part is -inf (also where total is -inf: no key at all)."""
    seen = part != float("-inf")
    return torch.where(seen, torch.exp(torch.where(seen, part - total, 0.0)), 0.0)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> None:
    """Fold the partial result (out_b, lse_b) of more keys into (out, lse), in place.

    out (B, H, L, Dv) and lse (B, H, L) hold the attention over the keys seen so far; rows that
    have seen no key hold out 0 and lse -inf, and stay so until a visible key comes.
    """
    total = torch.logaddexp(lse, lse_b.to(lse.dtype))
    a, b = _weight(lse, total), _weight(lse_b.to(lse.dtype), total)
    out.mul_(a.unsqueeze(-1).to(out.dtype)).add_(out_b.to(out.dtype)
                                                 * b.unsqueeze(-1).to(out.dtype))
    lse.copy_(total)


def _ring_forward(q, k, v, kv_lengths, plan: _Plan):
    ring, ct = plan.ring, _accumulation_dtype(q.dtype)
    B, Hq, Lq, _ = q.shape
    out = torch.zeros(B, Hq, Lq, v.shape[-1], dtype=ct, device=q.device)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=ct, device=q.device)
    block = (k, v)
    for step in range(ring.size):
        pending = ring.shift(block, KV_TAG) if step < ring.size - 1 else None
        for pair in plan.pairs(ring.source(step)):
            k, v = block
            out_b, lse_b = plan.attend(q[:, :, pair.q], k[:, :, pair.k], v[:, :, pair.k], pair,
                                       kv_lengths)
            merge_partials(out[:, :, pair.q], lse[:, :, pair.q], out_b, lse_b)
        if pending is not None:
            block = pending.wait()
    return out.to(q.dtype), lse


def _pair_grads(q, k, v, out, lse, dout, dlse, kv_lengths, pair: _Pair, plan: _Plan):
    """(dq, dk, dv) of one pair: qkv.attention recomputed on it, with the upstream gradients
    that the lse merge passes to its (out_b, lse_b)."""
    with torch.enable_grad():
        qs, ks, vs = (t[:, :, rows].detach().requires_grad_()
                      for t, rows in ((q, pair.q), (k, pair.k), (v, pair.k)))
        out_b, lse_b = plan.attend(qs, ks, vs, pair, kv_lengths)
        rows = pair.q
        w = _weight(lse_b.detach().to(lse.dtype), lse[:, :, rows])
        d = dout[:, :, rows]
        dout_b = d * w.unsqueeze(-1)
        dlse_b = w * ((d * (out_b.detach().to(d.dtype) - out[:, :, rows])).sum(-1)
                      + dlse[:, :, rows])
        return torch.autograd.grad((out_b, lse_b), (qs, ks, vs),
                                   (dout_b.to(out_b.dtype), dlse_b.to(lse_b.dtype)))


def _ring_backward(q, k, v, out, lse, kv_lengths, dout, dlse, plan: _Plan):
    ring, ct = plan.ring, _accumulation_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dkv = [torch.zeros(k.shape, dtype=ct, device=q.device),
           torch.zeros(v.shape, dtype=ct, device=q.device)]
    out, dout = out.to(ct), dout.to(ct)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(lse.dtype)
    block = (k, v)
    for step in range(ring.size):
        pending = ring.shift(block, KV_TAG) if step < ring.size - 1 else None
        for pair in plan.pairs(ring.source(step)):
            gq, gk, gv = _pair_grads(q, *block, out, lse, dout, dlse, kv_lengths, pair, plan)
            dq[:, :, pair.q] += gq
            dkv[0][:, :, pair.k] += gk
            dkv[1][:, :, pair.k] += gv
        # The accumulator of this block goes on with it; after the last step it is home.
        dkv = ring.shift(dkv, GRAD_TAG).wait()
        if pending is not None:
            block = pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """Saves this rank's q, k, v, out and lse; backward runs the ring again."""

    @staticmethod
    def forward(ctx, q, k, v, kv_lengths, plan):
        out, lse = _ring_forward(q, k, v, kv_lengths, plan)
        ctx.save_for_backward(q, k, v, out, lse, kv_lengths)
        ctx.plan = plan
        kind = q.device.type  # backward recomputes the blocks under the forward's autocast
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_lengths = ctx.saved_tensors
        kind, dtype, enabled = ctx.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            dq, dk, dv = _ring_backward(q, k, v, out, lse, kv_lengths, dout, dlse, ctx.plan)
        return dq, dk, dv, None, None


def _check_kv_lengths(kv_lengths, B: int, Lk: int, q: torch.Tensor):
    """(B,) integers in [0, Lk] (the whole sequence's Lk), as int64 on q's device."""
    if kv_lengths is None:
        return None
    if (not isinstance(kv_lengths, torch.Tensor) or kv_lengths.shape != (B,)
            or kv_lengths.dtype.is_floating_point or kv_lengths.dtype == torch.bool):
        got = (f"{tuple(kv_lengths.shape)} {kv_lengths.dtype}"
               if isinstance(kv_lengths, torch.Tensor) else repr(kv_lengths))
        raise ValueError(f"kv_lengths must be a ({B},) integer tensor, got {got}")
    if kv_lengths.device != q.device:
        raise ValueError(f"kv_lengths is on {kv_lengths.device}, q is on {q.device}")
    if B and (int(kv_lengths.min()) < 0 or int(kv_lengths.max()) > Lk):
        raise ValueError(f"kv_lengths must lie in [0, Lk={Lk}] (the whole sequence's length), "
                         f"got {kv_lengths.tolist()}")
    return kv_lengths.to(torch.int64)


def _check_shards(q, k, causal: bool, layout: str) -> None:
    Lq, Lk = q.shape[2], k.shape[2]
    per = chunks_per_rank(layout)
    for name, length in (("q", Lq), ("k", Lk)):
        if length % per:
            raise ValueError(f"{name} holds {length} positions per rank, which the zigzag "
                             f"layout cannot cut into its two equal chunks; the sequence "
                             f"length must be divisible by 2 × the group size")
    if causal and Lq != Lk:
        raise ValueError(f"causal needs q and k sharded alike (self-attention over one "
                         f"sequence), got Lq={Lq} and Lk={Lk} per rank: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")


def _shape_ints(t) -> list[int]:
    return list(t.shape) if isinstance(t, torch.Tensor) and t.dim() == 4 else [0] * 4


def _check_group_agrees(ring: Ring, q, k, v, causal, layout, kv_lengths, refused) -> None:
    """Every rank of the group holds shards of one shape and asks for the same attention;
    otherwise every rank raises a ValueError (and none waits forever for the others). `refused`
    is the ValueError this rank's own checks raised, or None."""
    checksum = -1
    if refused is None and kv_lengths is not None:
        checksum = int((kv_lengths * torch.arange(1, len(kv_lengths) + 1,
                                                  device=kv_lengths.device)).sum())
    dtype = _DTYPES.index(q.dtype) if refused is None else -1
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    header = torch.tensor([*_shape_ints(q), *_shape_ints(k), *_shape_ints(v), dtype,
                           int(causal is True), LAYOUTS.index(layout) if layout in LAYOUTS
                           else -1, checksum, int(refused is not None)],
                          dtype=torch.int64, device=device)
    every = [h.tolist() for h in ring.all_gather(header)]
    if refused is not None:
        raise refused
    bad = [r for r, h in enumerate(every) if h[-1]]
    if bad:
        raise ValueError(f"rank(s) {bad} of the group refused their arguments to "
                         f"context_parallel_attention (their error says why)")
    if any(h[:12] != every[0][:12] for h in every):
        listed = "; ".join(f"rank {r}: q {tuple(h[0:4])}, k {tuple(h[4:8])}, "
                           f"v {tuple(h[8:12])}" for r, h in enumerate(every))
        raise ValueError(f"q, k, v must have the same shapes on every rank of the group (each "
                         f"holds an equal shard of the sequence), got {listed}")
    if any(h != every[0] for h in every):
        raise ValueError("dtype, causal, layout and kv_lengths must be the same on every rank "
                         "of the group; they differ")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               group=None, causal: bool = False,
                               kv_lengths: torch.Tensor | None = None,
                               softcap: float | None = None, scale: float | None = None,
                               return_lse: bool = False, layout: str = "zigzag",
                               backend: str = "auto"):
    """`qkv.attention` over a sequence sharded across the ranks of `group`, exactly.

    Each rank passes its shard: q (B, Hq, Lq/N, D), k (B, Hk, Lk/N, D), v (B, Hk, Lk/N, Dv),
    cut from the whole sequence by `shard_sequence(x, 2, rank, N, layout=layout)` (N ranks in
    the group; Hq a multiple of Hk, K/V heads shared, never copied). It returns this rank's rows
    of qkv.attention(Q, K, V, ...) on the whole sequence: out (B, Hq, Lq/N, Dv) in q's dtype,
    and with `return_lse` also lse (B, Hq, Lq/N), float32 (float64 for float64 input).
    Gradients flow to q, k and v (dK/dV of every rank's queries reach the rank holding those
    keys) and through lse. Every rank of the group must call it, in the same order.

    layout: "zigzag" (rank r holds chunks r and 2N-1-r of 2N, which balances causal work) or
    "contiguous" (chunk r of N). causal: bottom-right as in qkv.attention; it needs Lq == Lk
    (self-attention). kv_lengths (B,): keys at or past kv_lengths[b] of the whole sequence are
    padding; the same tensor on every rank. softcap, scale and backend (for each block) mean
    what they mean for qkv.attention. Masks, bias, ALiBi, windows and dropout are not offered.

    Raises ValueError for a group of one process, shards that differ in shape between ranks,
    a shard length the layout cannot split, and what qkv.attention refuses.
    """
    ring = Ring(group)
    try:
        check_layout(layout)
        call = check_call(q, k, v, causal=causal, softcap=softcap, scale=scale,
                          return_lse=return_lse)
        kv_lengths = _check_kv_lengths(kv_lengths, call.B, call.Lk * ring.size, q)
        refused = None
    except ValueError as e:
        refused = e
    _check_group_agrees(ring, q, k, v, causal, layout, kv_lengths, refused)
    _check_shards(q, k, causal, layout)
    per = chunks_per_rank(layout)
    plan = _Plan(ring, layout, causal, call.scale, call.softcap, backend,
                 call.Lq // per, call.Lk // per,
                 None if kv_lengths is None else tuple(kv_lengths.tolist()))
    out, lse = _RingAttention.apply(q, k, v, kv_lengths, plan)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
