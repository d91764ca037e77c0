"""Context-parallel attention in 2 and 4 gloo processes equals qkv.attention in one, in float64:
forward, lse and gradients, causal and not, zigzag and contiguous, GQA, kv_lengths; a DecoderLM
on shards gives the loss and gradients of the whole sequences; and bad input fails clearly on
every rank. Each spawned run batches all its checks (process start-up is
the slow part)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import qkv
from qkv.distributed import ContextParallelLM, context_parallel_attention, shard_sequence
from qkv.nn import IGNORE_INDEX, DecoderLM, TransformerConfig

# (causal, layout, Hq, Hk, kv_lengths as fractions of Lk or None, Lk / Lq, other keywords)
CASES = [
    (True, "zigzag", 4, 2, (1.0, 0.5, 0.0), 1, {}),
    (False, "zigzag", 2, 2, None, 1, {"softcap": 2.0, "scale": 0.7}),
    (True, "contiguous", 2, 1, (0.25, 1.0, 0.0), 1, {}),
    (False, "contiguous", 4, 2, (1.0, 0.625, 0.0), 2, {}),  # cross-attention: Lk = 2 Lq
    (False, "zigzag", 4, 1, (0.3, 0.0, 1.0), 1, {}),
    (True, "zigzag", 2, 2, None, 1, {"softcap": 5.0}),
]


def _start(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)


def _check_case(rank, world_size, seed, causal, layout, Hq, Hk, fractions, k_factor,
                keywords) -> None:
    g = torch.Generator().manual_seed(seed)  # the same tensors on every rank
    B, L, D, Dv = 3, 8 * world_size, 8, 6
    Lk = L * k_factor
    q = torch.randn(B, Hq, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, Lk, Dv, generator=g, dtype=torch.float64)
    d_out = torch.randn(B, Hq, L, Dv, generator=g, dtype=torch.float64)
    d_lse = torch.randn(B, Hq, L, 1, generator=g, dtype=torch.float64)
    kv = None if fractions is None else torch.tensor([int(f * Lk) for f in fractions])

    def shard(t):
        return shard_sequence(t, 2, rank, world_size, layout=layout)

    def loss(out, lse, d_out, d_lse):  # rows that see no key have lse -inf and no gradient
        return (out * d_out).sum() + (torch.where(lse.isfinite(), lse, 0.0) * d_lse).sum()

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = qkv.attention(*full, causal=causal, kv_lengths=kv, return_lse=True,
                             backend="reference", **keywords)
    loss(out, lse, d_out, d_lse[..., 0]).backward()
    mine = [shard(t).requires_grad_() for t in (q, k, v)]
    out_r, lse_r = context_parallel_attention(*mine, causal=causal, kv_lengths=kv,
                                              return_lse=True, layout=layout, **keywords)
    loss(out_r, lse_r, shard(d_out), shard(d_lse)[..., 0]).backward()
    where = (causal, layout, Hq, Hk, fractions, k_factor, keywords, rank)
    assert lse_r.dtype == torch.float64 and not out_r.isnan().any(), where
    torch.testing.assert_close(out_r, shard(out), rtol=0, atol=1e-12, msg=str(where))
    torch.testing.assert_close(lse_r, shard(lse.unsqueeze(-1))[..., 0], rtol=0, atol=1e-12,
                               msg=str(where))
    for name, t_r, t in zip("qkv", mine, full, strict=True):
        torch.testing.assert_close(t_r.grad, shard(t.grad), rtol=0, atol=1e-12,
                                   msg=f"d{name} {where}")


def _errors(rank: int, world_size: int) -> None:
    """Each bad input raises ValueError naming the problem, on every rank, without a hang."""
    x = torch.zeros(1, 2, 4, 8, dtype=torch.float64)
    uneven = x if rank == 0 else torch.zeros(1, 2, 6, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"same shapes on every rank.*rank 1: q \(1, 2, 6, 8\)"):
        context_parallel_attention(uneven, uneven, uneven, causal=True)
    odd = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="zigzag layout cannot cut"):
        context_parallel_attention(odd, odd, odd)
    with pytest.raises(ValueError, match="causal needs q and k sharded alike"):
        context_parallel_attention(x, torch.cat([x, x], 2), torch.cat([x, x], 2), causal=True)
    bad_k = x if rank == 0 else x[..., :4]  # one rank's own check refuses; no rank hangs
    with pytest.raises(ValueError, match="head dim|refused their arguments"):
        context_parallel_attention(x, bad_k, x)
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk=8\]"):
        context_parallel_attention(x, x, x, kv_lengths=torch.tensor([9]))
    with pytest.raises(ValueError, match=r"must be divisible by 2 × world_size = 4"):
        shard_sequence(torch.zeros(1, 6), 1, rank, 2)
    alone = dist.new_group([0])
    if rank == 0:
        with pytest.raises(ValueError, match="at least 2 processes, got a group of 1"):
            context_parallel_attention(x, x, x, group=alone)


def _check_lm(world_size: int, positions: str, n_kv_heads: int) -> None:
    """ContextParallelLM's loss is the model's on the whole batch, and its gradients summed over
    the ranks are group-size × the model's; L = 7 is padded to the layout's multiple."""
    torch.manual_seed(0)  # the same model and batch on every rank
    config = TransformerConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2,
                               n_kv_heads=n_kv_heads, max_len=7, positions=positions)
    model = DecoderLM(config).double()
    idx = torch.randint(0, 11, (2, 7))
    targets = torch.randint(0, 11, (2, 7))
    targets[1, 4:] = IGNORE_INDEX
    _, loss = model(idx, targets)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    _, loss_cp = ContextParallelLM(model, None)(idx, targets)
    loss_cp.backward()
    assert abs(loss_cp.item() - loss.item()) < 1e-12, (positions, loss_cp.item(), loss.item())
    for p, g in zip(model.parameters(), expected, strict=True):
        total = p.grad.clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total / world_size, g, rtol=0, atol=1e-12, msg=positions)


def _worker(rank: int, world_size: int, init_file: str, errors: bool) -> None:
    _start(rank, world_size, init_file)
    try:
        for seed, case in enumerate(CASES):
            _check_case(rank, world_size, seed, *case)
        _check_lm(world_size, "learned", 2)
        _check_lm(world_size, "rope", 1)
        if errors:
            _errors(rank, world_size)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_and_refuse_bad_input(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), True), nprocs=2, join=True)


@pytest.mark.slow
def test_four_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(4, str(tmp_path / "rendezvous"), False), nprocs=4, join=True)
